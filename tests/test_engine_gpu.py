"""The engine on CUDA (float32): the same equivalences as on the CPU, with prefix caching on."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_engine import prompts_of, reference

from zipage import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("budget", [None, 16])
def test_engine_on_cuda_matches_generate(family, budget):
    """Every feature on: CUDA graphs, prefix caching and (with a budget) asynchronous compression."""
    model = tiny_model(family, scale=1.0).cuda()
    shared = prompts_of((17,), seed=3)[0]
    prompts = prompts_of((12, 30, 7, 50), seed=1) + prompts_of((5, 9), seed=2, prefix=shared)
    cfg = {} if budget is None else {"budget": budget, "page_size": 4, "buffer": 4}
    llm = LLM(model, page_size=4, num_pages=256, enable_prefix_caching=True, max_num_seqs=3, enforce_eager=False,
              async_compression=budget is not None,
              **({"budget": None} if budget is None else {k: v for k, v in cfg.items() if k != "page_size"}))
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    kw = {} if budget is None else {"cache_implementation": "zipage", "cache_config": cfg}
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == reference(model, torch.tensor(prompt).tolist(), 60, **kw)
    stats = llm.stats()
    assert stats["free_pages"] == stats["total_pages"]
    assert llm.runner.graphs, "decode steps did not use CUDA graphs"
    if budget is not None:
        assert stats["compressions"] > 0 and llm.side_stream is not None
