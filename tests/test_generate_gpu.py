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
    seq_c, seq_g = cpu.sequences.cpu(), cuda.sequences.cpu()
    log_c = torch.stack(cpu.logits, 1).cpu()
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


def _run(model, ids, mask, device, cfg=None):
    kw = dict(max_new_tokens=60, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    if cfg is not None:
        kw.update(cache_implementation="zipage", cache_config=cfg)
    return model.to(device).generate(ids.to(device), attention_mask=mask.to(device), **kw)


def _max_logit_gap(a, b, prompt_len):
    """Largest logit difference over the steps where both runs fed the same tokens."""
    la, lb = torch.stack(a.logits, 1).cpu(), torch.stack(b.logits, 1).cpu()
    same = (a.sequences.cpu()[:, prompt_len:] == b.sequences.cpu()[:, prompt_len:]).cumprod(dim=1)
    same = torch.cat([torch.ones_like(same[:, :1]), same[:, :-1]], dim=1).bool()  # step t saw equal inputs
    return (la - lb).abs().amax(dim=-1)[same].max().item()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("budget, page", [(96, 16), (16, 4)])
def test_cuda_matches_cpu_greedy_fp32(family, budget, page, monkeypatch):
    calls = []
    real = cache_mod.paged_decode_attention
    monkeypatch.setattr(cache_mod, "paged_decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_model(family, scale=1.0)
    ids, mask = left_padded_batch(lengths=(20, 7, 13))
    cfg = {"budget": budget, "page_size": page, "buffer": page}
    P = ids.shape[1]
    cpu_plain, cuda_plain = _run(model, ids, mask, "cpu"), _run(model, ids, mask, "cuda")
    cpu, cuda = _run(model, ids, mask, "cpu", cfg), _run(model, ids, mask, "cuda", cfg)
    assert calls, "the CUDA decode steps did not go through the paged Triton attention"
    drift = _max_logit_gap(cpu_plain, cuda_plain, P)  # what fp32 on another device costs anyway
    gap = _max_logit_gap(cpu, cuda, P)
    print(f"{family} budget={budget}: CPU vs CUDA logit gap plain {drift:.2e}, zipage {gap:.2e}")
    assert gap < max(1e-3, 20 * drift)
    assert_same_until_a_tie(cpu, cuda, P, tol=max(1e-3, 20 * drift))
    if budget >= 20 + 60:  # nothing evicted: the same as plain generate() on the same device
        assert _max_logit_gap(cuda_plain, cuda, P) < 1e-3
        assert_same_until_a_tie(cuda_plain, cuda, P)


def test_cuda_bf16_small_budget_runs_and_frees_pages():
    model = tiny_model("qwen3").to("cuda", torch.bfloat16)
    ids, mask = left_padded_batch()
    cache = zipage.ZipageCache(config=model.config, budget=32, page_size=16, buffer=16)
    out = model.generate(ids.cuda(), attention_mask=mask.cuda(), past_key_values=cache, max_new_tokens=300,
                         min_new_tokens=300, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 300
    assert cache.stored_length() <= 48 and cache.stats()["pages_in_use"] == 3 * -(-cache.stored_length() // 16)
    assert cache.stats()["capacity_tokens"] == 48  # rows hold budget + buffer, a multiple of the kernels' page


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_cuda_16bit_rows_attend_densely_as_the_paged_kernel_would(family, monkeypatch):
    """bf16 rows on CUDA: head-major, attended by the model's SDPA with cuDNN held off (never the paged
    kernel), through compressions and left padding; the logits those steps give are the paged kernel's
    (ZIPAGE_GENERATE_ATTENTION=paged) up to bf16 rounding, and the SDPA calls ran with cuDNN off and
    left it on afterwards."""
    import zipage.capture as capture_mod

    calls, cudnn_during = [], []
    real = cache_mod.paged_decode_attention
    monkeypatch.setattr(cache_mod, "paged_decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa(*a, **k):
        cudnn_during.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real_sdpa(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    model = tiny_model(family, scale=1.0).to(torch.bfloat16)
    ids, mask = left_padded_batch(lengths=(20, 7, 13))
    cfg = {"budget": 16, "page_size": 4, "buffer": 4}
    P = ids.shape[1]
    dense = _run(model, ids, mask, "cuda", cfg)
    assert not calls and cudnn_during and torch.backends.cuda.cudnn_sdp_enabled()
    decode_calls = cudnn_during[2 * model.config.num_hidden_layers:]  # after the prefill
    assert decode_calls and not any(decode_calls[-model.config.num_hidden_layers:])
    assert capture_mod.pending_layer(dense.past_key_values) is None
    monkeypatch.setenv("ZIPAGE_GENERATE_ATTENTION", "paged")
    paged = _run(model, ids, mask, "cuda", cfg)
    assert calls
    assert dense.past_key_values.num_compressions > 0
    gap = _max_logit_gap(dense, paged, P)
    print(f"{family}: bf16 dense vs paged logit gap {gap:.3e}")
    assert gap < 0.1
    monkeypatch.setenv("ZIPAGE_GENERATE_ATTENTION", "sometimes")
    with pytest.raises(ValueError, match="ZIPAGE_GENERATE_ATTENTION='sometimes'"):
        _run(model, ids, mask, "cuda", cfg)
