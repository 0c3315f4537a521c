"""The paged attention kernels' optional features: a sliding window, learned sink logits, softcapping.

The references are checked against dense attention written the way GPT-OSS's and Gemma 2/3's own
eager attention computes it (explicit position masks, ``cap * tanh(logits / cap)``, the sink logit
concatenated to each row);
the Triton kernels (interpreter on a CPU, compiled on a GPU) against the references.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA, requires_triton

from zipage.kernels import (
    paged_decode_attention_reference,
    paged_decode_attention_triton,
    paged_prefill_attention_reference,
    paged_prefill_attention_triton,
)


def _pool(lens: list[int], page: int, H: int, D: int, dtype=torch.float32, device="cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    per_row = max(-(-n // page) for n in lens)
    P = len(lens) * per_row + 2
    table = torch.randperm(P, generator=g)[: len(lens) * per_row].view(len(lens), per_row).to(torch.int32)
    k = torch.randn(P, page, H, D, generator=g).to(device, dtype)
    v = torch.randn(P, page, H, D, generator=g).to(device, dtype)
    return k, v, table.to(device)


def _dense(k, v, table, b, n):
    page = k.shape[1]
    pos = torch.arange(n)
    slots = table[b, pos // page].long().cpu() * page + pos % page
    return k.reshape(-1, *k.shape[2:])[slots].float().cpu(), v.reshape(-1, *v.shape[2:])[slots].float().cpu()


def _dense_attention(q, k, v, qpos, start, window, sinks, scale, softcap=None):
    """``q`` [nq, Hq, D] at positions ``qpos`` over keys ``k`` [n, Hkv, D]: eager attention with a
    causal (and sliding) mask, the sink logit as an extra column dropped after the softmax."""
    Hq, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    kpos = torch.arange(k.shape[0])
    allowed = (kpos[None] <= qpos[:, None]) & (kpos[None] >= start)
    if window:
        allowed &= kpos[None] > qpos[:, None] - window
    logits = logits.masked_fill(~allowed[None], float("-inf"))
    if sinks is not None:
        logits = torch.cat([logits, sinks.float().view(Hq, 1, 1).expand(Hq, q.shape[0], 1)], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    return torch.einsum("hqk,khd->qhd", probs.nan_to_num(0.0), v)


CASES = [(None, None, None), (5, None, None), (None, "sinks", None), (7, "sinks", None), (64, "sinks", None),
         (5, None, 1.5), (None, "sinks", 2.0)]


@pytest.mark.parametrize("window,with_sinks,softcap", CASES)
def test_decode_reference_matches_dense_attention(window, with_sinks, softcap):
    lens, starts, page, Hq, Hkv, D = [1, 9, 23, 40], [0, 2, 0, 3], 8, 4, 2, 16
    k, v, table = _pool(lens, page, Hkv, D)
    q = torch.randn(len(lens), Hq, D, generator=torch.Generator().manual_seed(1))
    sinks = torch.randn(Hq, generator=torch.Generator().manual_seed(2)) * 2 if with_sinks else None
    out = paged_decode_attention_reference(q, k, v, table, torch.tensor(lens), 0.3, torch.tensor(starts),
                                           window=window, sinks=sinks, softcap=softcap)
    for b, n in enumerate(lens):
        kk, vv = _dense(k, v, table, b, n)
        want = _dense_attention(q[b : b + 1], kk, vv, torch.tensor([n - 1]), starts[b], window, sinks, 0.3,
                                softcap)[0]
        torch.testing.assert_close(out[b], want, rtol=1e-5, atol=1e-5)
    if with_sinks:  # a sink takes a share of every row: the output is no convex mix of the values any more
        plain = paged_decode_attention_reference(q, k, v, table, torch.tensor(lens), 0.3, torch.tensor(starts),
                                                 window=window, softcap=softcap)
        assert not torch.allclose(out, plain, atol=1e-3)


@pytest.mark.parametrize("window,with_sinks,softcap", CASES)
def test_prefill_reference_matches_dense_attention(window, with_sinks, softcap):
    lens, q_lens, starts, page, Hq, Hkv, D = [12, 30, 17], [12, 9, 1], [0, 4, 0], 8, 4, 2, 16
    k, v, table = _pool(lens, page, Hkv, D, seed=3)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), Hq, D, generator=torch.Generator().manual_seed(4))
    sinks = torch.randn(Hq, generator=torch.Generator().manual_seed(5)) * 2 if with_sinks else None
    out = paged_prefill_attention_reference(q, k, v, table, cu, torch.tensor(lens), 0.25, torch.tensor(starts),
                                            window=window, sinks=sinks, softcap=softcap)
    for b, (n, nq) in enumerate(zip(lens, q_lens)):
        kk, vv = _dense(k, v, table, b, n)
        qpos = torch.arange(n - nq, n)
        want = _dense_attention(q[int(cu[b]) : int(cu[b + 1])], kk, vv, qpos, starts[b], window, sinks, 0.25,
                                softcap)
        torch.testing.assert_close(out[int(cu[b]) : int(cu[b + 1])], want, rtol=1e-5, atol=1e-5)


def _triton_cases(device, dtype, lens, q_lens, starts, page, Hq, Hkv, D, window, with_sinks, block, tol,
                  softcap=None):
    k, v, table = _pool(lens, page, Hkv, D, dtype, device, seed=len(lens) + D)
    g = torch.Generator().manual_seed(7)
    sinks = (torch.randn(Hq, generator=g) * 2).to(device) if with_sinks else None
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    kv_starts = torch.tensor(starts, dtype=torch.int32, device=device)
    qd = torch.randn(len(lens), Hq, D, generator=g).to(device, dtype)
    ref = paged_decode_attention_reference(qd.float(), k.float(), v.float(), table, kv_lens, D**-0.5, kv_starts,
                                           window=window, sinks=sinks, softcap=softcap)
    for splits in (1, 4):
        out = paged_decode_attention_triton(qd, k, v, table, kv_lens, D**-0.5, kv_starts, num_splits=splits,
                                            block_n=block, window=window, sinks=sinks, softcap=softcap)
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    qp = torch.randn(int(cu[-1]), Hq, D, generator=g).to(device, dtype)
    ref = paged_prefill_attention_reference(qp.float(), k.float(), v.float(), table, cu, kv_lens, D**-0.5, kv_starts,
                                            window=window, sinks=sinks, softcap=softcap)
    out = paged_prefill_attention_triton(qp, k, v, table, cu, kv_lens, D**-0.5, kv_starts, block_m=block,
                                         block_n=block, window=window, sinks=sinks, softcap=softcap)
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@requires_triton
@pytest.mark.skipif(CUDA, reason="interpreter case (the GPU runs the gpu case)")
@pytest.mark.parametrize("window,with_sinks,softcap", [CASES[0], CASES[3], CASES[5], CASES[6]])
def test_triton_window_and_sinks_interpreted(window, with_sinks, softcap):
    _triton_cases("cpu", torch.float32, [3, 40, 21], [3, 17, 1], [0, 0, 2], 8, 4, 2, 16, window, with_sinks,
                  block=16, tol=1e-4, softcap=softcap)


@requires_triton
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window,with_sinks,softcap", [(128, "sinks", None), (1000, None, None),
                                                     (None, "sinks", None), (4096, None, 2.0)])
def test_triton_window_and_sinks_gpu(dtype, window, with_sinks, softcap):
    _triton_cases("cuda", dtype, [5, 3000, 1500, 129], [5, 700, 1, 129], [0, 0, 3, 0], 16, 64, 8, 64, window,
                  with_sinks, block=64, tol=3e-2, softcap=softcap)
