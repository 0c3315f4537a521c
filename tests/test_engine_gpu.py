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
        assert stats["compressions"] > 0 and llm.core.compressions.side_stream is not None


@pytest.mark.parametrize("budget", [None, 16])
def test_async_scheduling_on_cuda_gives_the_same_tokens(budget):
    """CUDA graphs fed from the device with the host a step behind: the same tokens, stops and
    finish reasons as the synchronous engine (greedy, seeded sampling, stop ids, max_tokens=1)."""
    model = tiny_model("qwen3", scale=1.0).cuda()
    prompts = prompts_of((12, 30, 7, 50, 9), seed=4)
    refs = [reference(model, p, 40) for p in prompts]
    params = [
        SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[refs[1][9]]),
        SamplingParams(max_tokens=35, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[refs[4][2]]),
    ]
    cfg = {"budget": None} if budget is None else {"budget": budget, "buffer": 4, "async_compression": True}
    runs = {}
    for mode in (False, True):
        llm = LLM(model, page_size=4, num_pages=256, max_num_seqs=4, async_scheduling=mode, **cfg)
        runs[mode] = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.stats()
        assert stats["free_pages"] == stats["total_pages"] and llm.runner.graphs
    for sync, overlapped in zip(runs[False], runs[True]):
        assert overlapped.token_ids == sync.token_ids and overlapped.finish_reason == sync.finish_reason
    if budget is None:
        assert runs[True][0].token_ids == refs[0]
    assert runs[True][1].finish_reason == "stop" and runs[True][4].finish_reason == "stop"


@pytest.mark.parametrize("budget", [None, 16])
@pytest.mark.parametrize("async_scheduling", [True, False])
def test_failed_steps_on_cuda_are_rolled_back(monkeypatch, budget, async_scheduling):
    """CUDA graphs, the sampler on the device and (with a budget) compressions on the side stream:
    the sampler and the eager forward failing on many steps; retrying gives the undisturbed tokens
    and every page comes back."""
    from test_engine_failures import Faults, assert_pool_clean, drive

    model = tiny_model("qwen3", scale=1.0).cuda()
    prompts = prompts_of((12, 30, 7, 50), seed=5)
    extra = {"budget": None} if budget is None else {"budget": budget, "buffer": 4, "async_compression": True}
    cfg = dict(page_size=4, num_pages=256, max_num_seqs=3, enforce_eager=False, async_scheduling=async_scheduling,
               **extra)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected, _ = drive(LLM(model, **cfg), prompts, params=params)
    llm = LLM(model, **cfg)
    faults = Faults(llm, monkeypatch, forward=range(2, 80, 7), sample=range(1, 80, 4))
    outs, _ = drive(llm, prompts, faults, params=params)
    assert len(faults.raised) >= 10, faults.raised
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    assert llm.runner.graphs, "decode steps did not use CUDA graphs"
    if budget is not None:
        assert llm.stats()["compressions"] > 0 and llm.core.compressions.side_stream is not None
    assert_pool_clean(llm)
