"""On CUDA, generate(cache_implementation="zipage") runs the Triton kernels and matches the CPU path."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, left_padded_batch, tiny_model

import zipage
import zipage.cache as cache_mod

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def assert_same_until_a_tie(cpu, cuda, prompt_len: int, tol: float = 2e-3) -> int:
    """Greedy outputs agree token for token, except that a row may part ways at a near-tie of the
    CPU logits (fp32 sums in another order can flip those); before that, the logits agree.
    Returns how many rows parted at a tie."""
    seq_c, seq_g = cpu.sequences, cuda.sequences.cpu()
    log_c = torch.stack(cpu.logits, 1)
    log_g = torch.stack(cuda.logits, 1).cpu()
    ties = 0
    for b in range(seq_c.shape[0]):
        diff = (seq_c[b, prompt_len:] != seq_g[b, prompt_len:]).nonzero()
        t = int(diff[0]) if len(diff) else log_c.shape[1]
        torch.testing.assert_close(log_g[b, : t + 1], log_c[b, : t + 1], atol=tol, rtol=tol)
        if t < log_c.shape[1]:
            top2 = log_c[b, t].topk(2).values
            assert (top2[0] - top2[1]).item() < tol, f"row {b} parted at step {t} without a tie"
            ties += 1
    return ties


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("budget, page", [(96, 16), (16, 4)])
def test_cuda_matches_cpu_greedy_fp32(family, budget, page, monkeypatch):
    calls = []
    real = cache_mod.paged_decode_attention
    monkeypatch.setattr(cache_mod, "paged_decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_model(family)
    ids, mask = left_padded_batch(lengths=(20, 7, 13))
    kw = dict(max_new_tokens=60, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    cfg = {"budget": budget, "page_size": page, "buffer": page}
    cpu = model.generate(ids, attention_mask=mask, cache_implementation="zipage", cache_config=cfg, **kw)
    model_gpu = model.to("cuda")
    cuda = model_gpu.generate(ids.cuda(), attention_mask=mask.cuda(), cache_implementation="zipage",
                              cache_config=cfg, **kw)
    assert calls, "the CUDA decode steps did not go through the paged Triton attention"
    assert_same_until_a_tie(cpu, cuda, ids.shape[1])
    if budget >= 20 + 60:  # nothing evicted: also the same as plain generate() on the GPU
        ref = model_gpu.generate(ids.cuda(), attention_mask=mask.cuda(), **kw)
        assert_same_until_a_tie(ref, cuda, ids.shape[1])


def test_cuda_bf16_small_budget_runs_and_frees_pages():
    model = tiny_model("qwen3").to("cuda", torch.bfloat16)
    ids, mask = left_padded_batch()
    cache = zipage.ZipageCache(config=model.config, budget=32, page_size=16, buffer=16)
    out = model.generate(ids.cuda(), attention_mask=mask.cuda(), past_key_values=cache, max_new_tokens=300,
                         min_new_tokens=300, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 300
    assert cache.stored_length() <= 48 and cache.pool.num_used == 3 * -(-cache.stored_length() // 16)
