"""On CUDA, generate(cache_implementation="zipage") runs the Triton kernels and matches the CPU path."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, left_padded_batch, tiny_model

import zipage
import zipage.cache as cache_mod

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("budget, page", [(96, 16), (16, 4)])
def test_cuda_matches_cpu_greedy_fp32(family, budget, page, monkeypatch):
    calls = []
    real = cache_mod.paged_decode_attention
    monkeypatch.setattr(cache_mod, "paged_decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_model(family)
    ids, mask = left_padded_batch(lengths=(20, 7, 13))
    kw = dict(attention_mask=mask, max_new_tokens=60, do_sample=False, pad_token_id=0)
    cfg = {"budget": budget, "page_size": page, "buffer": page}
    cpu = model.generate(ids, cache_implementation="zipage", cache_config=cfg, **kw)
    model_gpu = model.to("cuda")
    cuda = model_gpu.generate(
        ids.cuda(), cache_implementation="zipage", cache_config=cfg, **{**kw, "attention_mask": mask.cuda()}
    )
    assert calls, "the CUDA decode steps did not go through the paged Triton attention"
    assert torch.equal(cuda.cpu(), cpu)
    if budget >= 20 + 60:
        ref = model_gpu.generate(ids.cuda(), **{**kw, "attention_mask": mask.cuda()})
        assert torch.equal(cuda, ref)


def test_cuda_bf16_small_budget_runs_and_frees_pages():
    model = tiny_model("qwen3").to("cuda", torch.bfloat16)
    ids, mask = left_padded_batch()
    cache = zipage.ZipageCache(config=model.config, budget=32, page_size=16, buffer=16)
    out = model.generate(ids.cuda(), attention_mask=mask.cuda(), past_key_values=cache, max_new_tokens=300,
                         min_new_tokens=300, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 300
    assert cache.stored_length() <= 48 and cache.pool.num_used == 3 * -(-cache.stored_length() // 16)
