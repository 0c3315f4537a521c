"""FP8 (and INT8) KV pages, kernel by kernel: the references against dense math on the dequantized values, and
the Triton kernels against the references (in the interpreter on a CPU, compiled on a GPU)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import CUDA, requires_triton

from zipage.kernels import (
    compact_reference,
    compact_triton,
    dequantize_reference,
    lightning_redundancy_triton,
    paged_decode_attention_reference,
    paged_decode_attention_triton,
    paged_prefill_attention_reference,
    paged_prefill_attention_triton,
    quantize_reference,
    redundancy_scores_reference,
    slot_indices,
    store_kv,
    store_kv_reference,
    store_kv_triton,
    window_scores_reference,
    window_scores_triton,
)
from zipage.kernels.fp8 import FP8, FP8_MAX, INT8, INT8_MAX, MIN_SCALE
from zipage.kernels.paged_kv import read_slots

CODES = pytest.mark.parametrize("codes", [FP8, INT8], ids=["fp8", "int8"])

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
cpu_only = pytest.mark.skipif(CUDA, reason="interpreter case (the GPU runs the gpu cases)")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in kernel output"
    return ((out - ref).norm() / ref.norm().clamp(min=1e-12)).item()


TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def fp8_pages(P: int, page: int, H: int, D: int, device, spread: float = 3.0, codes: torch.dtype = FP8):
    """FP8 (or INT8) key and value pools with their scales; rows of very different magnitudes (scales matter)."""
    mag = torch.exp(torch.randn(P, page, H, 1, device=device) * spread / 3)
    k, ks = quantize_reference(torch.randn(P, page, H, D, device=device) * mag, codes)
    v, vs = quantize_reference(torch.randn(P, page, H, D, device=device) * mag, codes)
    return k, v, ks, vs


def dense_attention(q, k, v, scale, causal_from: int | None = None):
    """Plain softmax attention ``q`` [Q, H, D] over ``k``, ``v`` [S, H, D] (float32), the last query at
    the last key when ``causal_from`` is set (queries at positions causal_from..S-1)."""
    logits = torch.einsum("qhd,shd->hqs", q.double(), k.double()) * scale
    if causal_from is not None:
        qpos = torch.arange(causal_from, causal_from + q.shape[0])
        logits = logits.masked_fill(torch.arange(k.shape[0])[None, :] > qpos[:, None], float("-inf"))
    return torch.einsum("hqs,shd->qhd", torch.softmax(logits, dim=-1), v.double())


# ----------------------------------------------------------------------------- references
def test_quantize_is_per_row_and_within_e4m3_rounding(monkeypatch):
    """With the scale search off (``ZIPAGE_FP8_SCALE_STEPS=1``): one scale per row, ``max|x| / 448``, the
    largest element at +-448, every element within half an e4m3 step."""
    monkeypatch.setenv("ZIPAGE_FP8_SCALE_STEPS", "1")
    torch.manual_seed(0)
    x = torch.randn(5, 7, 3, 64) * torch.exp(torch.randn(5, 7, 3, 1) * 2)
    x[0, 0, 0] = 0.0  # an all-zero row
    codes, scales = quantize_reference(x)
    assert codes.dtype == FP8 and scales.dtype == torch.float32 and scales.shape == x.shape[:-1]
    torch.testing.assert_close(scales[1:], x[1:].abs().amax(-1) / FP8_MAX)
    assert scales[0, 0, 0] == MIN_SCALE and not codes[0, 0, 0].float().any()
    back = dequantize_reference(codes, scales)
    # e4m3 keeps 3 mantissa bits: half an ulp is 1/16 of the value (normals) or 2^-10 * scale (subnormals)
    bound = torch.maximum(x.abs() / 16, scales[..., None] * 2.0**-10) * (1 + 1e-5)
    assert ((back - x).abs() <= bound).all()
    # the largest element of every row is stored as +-448 exactly
    top = x.abs().argmax(-1, keepdim=True)
    assert (codes.float().gather(-1, top).abs()[1:] == FP8_MAX).all()


@pytest.mark.fp8_scale_search
def test_quantize_searches_the_scale_with_the_least_error():
    """The default FP8 quantization tries ``SCALE_STEPS`` scales ``max|x| / 448 * 2 ** (i / steps)`` per row
    and keeps the one whose codes read back closest to the row (squared error). Checked against a brute
    force over the same candidates with torch's own e4m3 cast, in float64."""
    from zipage.kernels.fp8 import SCALE_STEPS, round_to_e4m3

    torch.manual_seed(0)
    x = torch.randn(6, 5, 3, 64) * torch.exp(torch.randn(6, 5, 3, 1) * 2)
    x[0, 0, 0] = 0.0  # an all-zero row
    exact = torch.tensor([448.0, -224.0, 13.0, 0.0625] * 16)
    x[0, 0, 1] = exact * 0.375  # codes exact at the plain scale (a power-of-two multiple): that scale is kept
    codes, scales = quantize_reference(x)
    assert codes.dtype == FP8 and scales.dtype == torch.float32 and scales.shape == x.shape[:-1]
    assert scales[0, 0, 0] == MIN_SCALE and not codes[0, 0, 0].float().any()
    plain = x.abs().amax(-1) / FP8_MAX
    assert scales[0, 0, 1] == plain[0, 0, 1]
    assert torch.equal(codes[0, 0, 1].float(), exact)
    rows = x[1:].reshape(-1, 64).double()
    s_rows, back = scales[1:].reshape(-1), dequantize_reference(codes[1:], scales[1:]).reshape(-1, 64).double()
    base = plain[1:].reshape(-1)
    assert (s_rows >= base).all() and (s_rows < base * 2).all()
    # no code clips, and every element is within half an e4m3 step of its scale
    assert (codes.float().abs() <= FP8_MAX).all()
    bound = torch.maximum(rows.abs() / 16, s_rows[:, None].double() * 2.0**-10) * (1 + 1e-5)
    assert ((back - rows).abs() <= bound).all()
    # brute force: every candidate's squared error with torch's cast; the chosen one is the least (up to the
    # 2^-14-code resolution the search counts in)
    errs = []
    for i in range(SCALE_STEPS):
        s = (base * torch.tensor(2.0 ** (i / SCALE_STEPS), dtype=torch.float32)).double()
        c = (rows / s[:, None]).clamp(-FP8_MAX, FP8_MAX).float().to(FP8).double()
        errs.append(((c * s[:, None] - rows) ** 2).sum(-1))
    errs = torch.stack(errs, -1)
    got = ((back - rows) ** 2).sum(-1)
    assert (got <= errs.min(-1).values * (1 + 1e-3) + 1e-30).all()
    # and far less error than the plain max|x| / 448 scale (the candidate i = 0)
    assert (got / errs[:, 0]).mean() < 0.8
    # the CPU rounding the search uses is the cast's, ties to even and subnormals included
    c = torch.cat([(torch.randn(10000) * 100).clamp(-448, 448),
                   torch.tensor([0.0, -0.0, 448.0, -448.0, 2.0**-10, 3 * 2.0**-10, 2.0**-6, 17.0, 19.0, 1e-30])])
    assert torch.equal(round_to_e4m3(c), c.to(FP8).float())


def test_int8_quantize_rounds_to_the_nearest_code():
    """INT8 codes: one scale per row (max|x| / 127), every element within half a step of its value,
    the largest at +-127, halves rounded away from zero."""
    torch.manual_seed(0)
    x = torch.randn(5, 7, 3, 64) * torch.exp(torch.randn(5, 7, 3, 1) * 2)
    x[0, 0, 0] = 0.0
    codes, scales = quantize_reference(x, INT8)
    assert codes.dtype == INT8 and scales.dtype == torch.float32 and scales.shape == x.shape[:-1]
    torch.testing.assert_close(scales[1:], x[1:].abs().amax(-1) / INT8_MAX)
    assert scales[0, 0, 0] == MIN_SCALE and not codes[0, 0, 0].any()
    back = dequantize_reference(codes, scales)
    assert ((back - x).abs() <= scales[..., None] * (0.5 + 1e-5)).all()
    top = x.abs().argmax(-1, keepdim=True)
    assert (codes.float().gather(-1, top).abs()[1:] == INT8_MAX).all()
    half = torch.tensor([[2.5, -2.5, 0.5, -0.5, 1.49, -1.51, 127.0]])
    c, s = quantize_reference(half, INT8)
    assert s.item() == 1.0 and c.tolist() == [[3, -3, 1, -1, 1, -2, 127]]
    # far less rounding than e4m3 for the same bytes (the reason INT8 pages exist)
    err8 = (dequantize_reference(*quantize_reference(x, FP8)) - x).norm()
    assert (back - x).norm() < err8 / 3
    with pytest.raises(ValueError, match="codes are"):
        quantize_reference(x, torch.int16)


def test_store_reference_quantizes_at_the_slots_only():
    torch.manual_seed(1)
    cache = torch.zeros(4, 8, 2, 16, dtype=FP8)
    scale = torch.zeros(4, 8, 2)
    slots = torch.tensor([[3, 17], [30, 8]])
    values = torch.randn(2, 2, 2, 16) * 5
    store_kv_reference(cache, slots, values, scale)
    flat, flat_s = cache.view(32, 2, 16), scale.view(32, 2)
    codes, s = quantize_reference(values)
    assert torch.equal(flat[slots].view(torch.uint8), codes.view(torch.uint8)) and torch.equal(flat_s[slots], s)
    others = torch.ones(32, dtype=torch.bool)
    others[slots.reshape(-1)] = False
    assert not flat[others].float().any() and not flat_s[others].any()


@pytest.mark.parametrize("codes", [None, FP8, INT8])
@pytest.mark.parametrize("head_major", [False, True])
def test_store_span_hint_writes_what_the_slots_do(codes, head_major):
    """``store_kv(..., span_start=a)`` (slots ``a .. a + n - 1`` of every page, a ``generate()`` cache's
    rows) copies into that slice: the very bytes the indexed store writes, whatever the pool's strides."""
    torch.manual_seed(3)
    B, cap, H, D, a, n = 3, 10, 2, 16, 4, 3

    def pool(dtype):
        if head_major:  # [B, H, cap, D] memory seen as [B, cap, H, D], as ZipageCache holds it on the CPU
            return torch.zeros(B, H, cap, D, dtype=dtype).transpose(1, 2)
        return torch.zeros(B, cap, H, D, dtype=dtype)

    dtype = torch.float32 if codes is None else codes
    want_k, want_v, got_k, got_v = pool(dtype).contiguous(), pool(dtype).contiguous(), pool(dtype), pool(dtype)
    scales = [torch.zeros(B, cap, H) if codes is not None else None for _ in range(4)]
    keys, values = torch.randn(B, n, H, D) * 3, torch.randn(B, n, H, D)
    slots = (torch.arange(B) * cap)[:, None] + torch.arange(a, a + n)
    store_kv_reference(want_k, slots, keys, scales[0])
    store_kv_reference(want_v, slots, values, scales[1])
    store_kv(got_k, None, keys, got_v, values, scales[2], scales[3], span_start=a)
    as_bits = (lambda t: t) if codes is None else (lambda t: t.contiguous().view(torch.uint8))  # noqa: E731
    assert torch.equal(as_bits(want_k), as_bits(got_k)) and torch.equal(as_bits(want_v), as_bits(got_v))
    if codes is not None:
        assert torch.equal(scales[0], scales[2]) and torch.equal(scales[1], scales[3])


def test_scales_are_checked():
    cache = torch.zeros(2, 4, 2, 8, dtype=FP8)
    values = torch.randn(1, 2, 8)
    with pytest.raises(ValueError, match="need their per-token scales"):
        store_kv_reference(cache, torch.tensor([0]), values)
    with pytest.raises(ValueError, match="scales must be"):
        store_kv_reference(cache, torch.tensor([0]), values, torch.zeros(2, 4, 2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="FP8 or INT8 KV only"):
        store_kv_reference(torch.zeros(2, 4, 2, 8), torch.tensor([0]), values, torch.zeros(2, 4, 2))


def test_paged_attention_references_match_dense_attention_on_dequantized_values():
    torch.manual_seed(2)
    P, page, Hq, Hkv, D = 10, 4, 4, 2, 16
    k, v, ks, vs = fp8_pages(P, page, Hkv, D, "cpu")
    table = torch.randperm(P)[:8].view(2, 4).int()
    lens, starts = [13, 16], [0, 3]
    kd, vd = dequantize_reference(k, ks), dequantize_reference(v, vs)
    q = torch.randn(2, Hq, D)
    out = paged_decode_attention_reference(q, k, v, table, torch.tensor(lens), 0.3, torch.tensor(starts),
                                           k_scale=ks, v_scale=vs)
    qp = torch.randn(7, Hq, D)
    cu = torch.tensor([0, 5, 7])
    outp = paged_prefill_attention_reference(qp, k, v, table, cu, torch.tensor(lens), 0.3, torch.tensor(starts),
                                             k_scale=ks, v_scale=vs)
    for b in range(2):
        slots = slot_indices(table[b : b + 1].long(), starts[b], lens[b], page)[0]
        kb = kd.view(-1, Hkv, D)[slots].repeat_interleave(2, dim=1)
        vb = vd.view(-1, Hkv, D)[slots].repeat_interleave(2, dim=1)
        torch.testing.assert_close(out[b], dense_attention(q[b : b + 1], kb, vb, 0.3)[0].float(), rtol=1e-5, atol=1e-5)
        q0, q1 = int(cu[b]), int(cu[b + 1])
        n = lens[b] - starts[b]
        want = dense_attention(qp[q0:q1], kb, vb, 0.3, causal_from=n - (q1 - q0))
        torch.testing.assert_close(outp[q0:q1], want.float(), rtol=1e-5, atol=1e-5)


def test_window_and_redundancy_references_read_dequantized_keys():
    torch.manual_seed(3)
    B, Hq, Hkv, w, S, D = 2, 4, 2, 4, 21, 16
    kx = torch.randn(B, Hkv, S, D) * torch.exp(torch.randn(B, Hkv, S, 1))
    codes, scales = quantize_reference(kx)
    dense = dequantize_reference(codes, scales)
    q = torch.randn(B, Hq, w, D)
    km = torch.ones(B, S, dtype=torch.bool)
    km[1, :2] = False
    qm = km[:, S - w:]
    got = window_scores_reference(q, codes, km, qm, 0.25, "mean", "mean", key_scales=scales)
    torch.testing.assert_close(got, window_scores_reference(q, dense, km, qm, 0.25, "mean", "mean"))
    for block in (8, None):
        got = redundancy_scores_reference(codes, km, block, key_scales=scales)
        torch.testing.assert_close(got, redundancy_scores_reference(dense, km, block))


def test_compaction_moves_codes_with_their_scales():
    """Reference compaction of FP8 pools (codes moved as bytes) and their scale pools: every kept
    token reads back exactly as before, in place and into fresh pages."""
    torch.manual_seed(4)
    P, page, H, D, S, k = 8, 4, 2, 8, 14, 6
    keys, values, ks, vs = fp8_pages(P, page, H, D, "cpu")
    table = torch.randperm(P)[:4].view(1, 4)
    slots = slot_indices(table, 0, S, page)
    keep = torch.stack([torch.randperm(S)[:k] for _ in range(H)])[None].sort(dim=-1).values
    before_k, before_v = dequantize_reference(keys, ks).view(-1, H, D), dequantize_reference(values, vs).view(-1, H, D)
    for dst in (None, torch.tensor([[28, 29, 30, 31, 24, 25]])):
        pools = [keys.clone(), values.clone(), ks.clone(), vs.clone()]
        compact_reference(pools, slots, keep, dst)
        after_k = dequantize_reference(pools[0], pools[2]).view(-1, H, D)
        after_v = dequantize_reference(pools[1], pools[3]).view(-1, H, D)
        target = (dst if dst is not None else slots)[0, :k]
        for h in range(H):
            src = slots[0, keep[0, h]]
            assert torch.equal(after_k[target, h], before_k[src, h])
            assert torch.equal(after_v[target, h], before_v[src, h])


# ----------------------------------------------------------------------------- Triton against the references
def _store_case(device, dtype, N, H, D, page, codes=FP8, weighted=False):
    """``weighted``: the keys' scale search weighted by queries' moments (``fp8.query_weights``)."""
    from zipage.kernels.fp8 import query_weights

    torch.manual_seed(N + H)
    P = -(-2 * N // page) + 2
    kc, vc, kss, vss = fp8_pages(P, page, H, D, device, codes=codes)
    slots = torch.randperm(P * page, device=device)[: 2 * N].view(N, 2)[:, 1:]  # a strided column
    k = (torch.randn(1, H, N, D, device=device) * 4).to(dtype).permute(2, 0, 1, 3)  # [N, 1, H, D], strided
    v = torch.randn(N, 1, H, D, device=device).to(dtype)
    v[0, 0, 0] = 0  # an all-zero row: every candidate scale has no error; the first (MIN_SCALE) is kept
    w = None
    if weighted:
        q = torch.randn(64, H, D, device=device) + torch.randn(H, D, device=device) * 2
        w = query_weights(q.sum(0), (q * q).sum(0), 64)
    want = [kc.clone(), vc.clone(), kss.clone(), vss.clone()]
    store_kv_reference(want[0], slots, k, want[2], w)
    store_kv_reference(want[1], slots, v, want[3])
    store_kv_triton(kc, slots, k, vc, v, kss, vss, key_weights=w)
    written = slots.flatten()  # (shares of the rows stored, not of the whole pool)
    # the same bytes on either device: the kernel and the reference take the same IEEE operations (a division an
    # element for the first candidate, then products) and count the candidates' errors exactly in integers
    for got, ref in ((kss, want[2]), (vss, want[3])):
        got, ref = got.view(-1, H)[written], ref.view(-1, H)[written]
        assert torch.equal(got, ref), f"{(got != ref).float().mean().item():.3%} of the scales differ"
    for got, ref in ((kc, want[0]), (vc, want[1])):
        got, ref = read_slots(got, written), read_slots(ref, written)
        differ = (got.view(torch.uint8) != ref.view(torch.uint8)).any(-1).float().mean().item()
        assert differ == 0, f"{differ:.3%} of the rows' codes differ"


def _decode_case(device, dtype, B, Hq, Hkv, D, page, lens, starts=None, num_splits=None, codes=FP8):
    torch.manual_seed(B * 1000 + D + page)
    per_row = max(-(-n // page) for n in lens)
    P = B * per_row + 3
    k, v, ks, vs = fp8_pages(P, page, Hkv, D, device, codes=codes)
    table = torch.randperm(P, device=device)[: B * per_row].view(B, per_row).to(torch.int32)
    q = torch.randn(B, Hq, D, device=device).to(dtype)
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    kv_starts = torch.tensor(starts or [0] * B, dtype=torch.int32, device=device)
    ref = paged_decode_attention_reference(q.float(), k, v, table, kv_lens, D**-0.5, kv_starts, ks, vs)
    out = paged_decode_attention_triton(q, k, v, table, kv_lens, D**-0.5, kv_starts, num_splits=num_splits,
                                        k_scale=ks, v_scale=vs)
    assert rel_err(out, ref) < TOL[dtype]


def _prefill_case(device, dtype, Hq, Hkv, D, page, lens, q_lens, starts=None, block=64, codes=FP8):
    torch.manual_seed(sum(lens) + D)
    B = len(lens)
    per_row = max(-(-n // page) for n in lens)
    P = B * per_row + 3
    k, v, ks, vs = fp8_pages(P, page, Hkv, D, device, codes=codes)
    table = torch.randperm(P, device=device)[: B * per_row].view(B, per_row).to(torch.int32)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=device)
    q = torch.randn(int(cu[-1]), Hq, D, device=device).to(dtype)
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    kv_starts = torch.tensor(starts or [0] * B, dtype=torch.int32, device=device)
    ref = paged_prefill_attention_reference(q.float(), k, v, table, cu, kv_lens, D**-0.5, kv_starts, ks, vs)
    out = paged_prefill_attention_triton(q, k, v, table, cu, kv_lens, D**-0.5, kv_starts, block_m=block,
                                         block_n=block, k_scale=ks, v_scale=vs)
    assert rel_err(out, ref) < TOL[dtype]


def _window_case(device, dtype, B, Hq, Hkv, w, D, S, pad=0, codes=FP8):
    torch.manual_seed(S + Hq)
    q = torch.randn(B, Hq, w, D, device=device).to(dtype)
    stored, scales = quantize_reference(torch.randn(B, S, Hkv, D, device=device) * 3, codes)
    keys, key_scales = stored.transpose(1, 2), scales.transpose(1, 2)  # strided, as a gather of the pools gives
    km = torch.ones(B, S, dtype=torch.bool, device=device)
    km[-1, :pad] = False
    qm = km[:, S - w:]
    pv = torch.rand(B, Hkv, S, device=device) * 0.05
    for group, window, prev in (("max", "mean", None), ("mean", "sum", pv)):
        ref = window_scores_reference(q.float(), keys, km, qm, D**-0.5, group, window, prev, 0.8, key_scales)
        out = window_scores_triton(q, keys, km, qm, D**-0.5, group, window, prev, 0.8, key_scales=key_scales)
        assert rel_err(out, ref) < TOL[dtype] * 2


def _redundancy_case(device, B, H, S, D, block, pad=0, codes=FP8):
    torch.manual_seed(S + block)
    x = torch.randn(B, H, S, D, device=device)
    x[:, :, 3] = x[:, :, 1] * 2  # near-duplicates inside a page, at another scale
    x[:, :, S - 2] = x[:, :, S - 5] * 0.1
    stored, scales = quantize_reference(x, codes)
    km = torch.ones(B, S, dtype=torch.bool, device=device)
    km[0, :pad] = False
    ref = redundancy_scores_reference(stored, km, block, 0.5, 0.4, key_scales=scales)
    out = lightning_redundancy_triton(stored, km, block, 0.5, 0.4, key_scales=scales)
    assert rel_err(out, ref) < 3e-3


def _compact_case(device, B, H, D, page, S, k, codes=FP8):
    torch.manual_seed(S * 7 + k)
    per_row = -(-S // page)
    P = B * per_row + 4
    table = torch.randperm(P, device=device)[: B * per_row].view(B, per_row)
    slots = slot_indices(table, 0, S, page)
    pools = list(fp8_pages(P, page, H, D, device, codes=codes))
    keep = torch.stack([torch.stack([torch.randperm(S, device=device)[:k] for _ in range(H)]) for _ in range(B)])
    keep = keep.sort(dim=-1).values
    want = [p.clone() for p in pools]
    got = [p.clone() for p in pools]
    compact_reference(want, slots, keep)
    compact_triton(got, slots, keep)
    for w_, g_ in zip(want, got):
        assert torch.equal(w_.view(torch.uint8), g_.view(torch.uint8))


@pytest.mark.fp8_scale_search
def test_the_search_gives_the_same_bytes_in_any_batch(monkeypatch):
    """The reference's scale search per row does not depend on what it is batched with: a large call (the
    CPU's rounding arithmetic, several chunks of rows) gives the bytes of row-by-row calls (the cast)."""
    import zipage.kernels.fp8 as fp8

    torch.manual_seed(5)
    x = torch.randn(40, 3, 128) * torch.exp(torch.randn(40, 3, 1) * 3)
    x[0, 0] = 0.0
    x[1, 1, :5] = torch.tensor([1e-30, -1e-30, 3e-39, 0.0, -0.0])
    monkeypatch.setattr(fp8, "SEARCH_CHUNK_ELEMENTS", 16 * 128 * 7)  # 7 rows a chunk: 18 chunks
    codes, scales = quantize_reference(x)
    for i in range(x.shape[0]):
        for h in range(x.shape[1]):
            c, s = quantize_reference(x[i, h : h + 1])
            assert torch.equal(c.view(torch.uint8), codes[i, h : h + 1].view(torch.uint8))
            assert torch.equal(s, scales[i, h : h + 1])


@cpu_only
@requires_triton
@pytest.mark.fp8_scale_search
@pytest.mark.parametrize("dtype, D", [(torch.bfloat16, 128), (torch.float32, 256), (torch.float16, 80)])
def test_store_kernel_searches_as_the_reference_on_hard_rows(dtype, D):
    """The store kernel's scale search against the reference's, byte for byte: rows of every size (tiny,
    huge, with e4m3 subnormals beside normals), an all-zero row, 16-bit inputs, a head dim that is not a power
    of two, values in the dimension-major layout the engine uses."""
    from zipage.kernels.fp8 import value_pool

    torch.manual_seed(D)
    N, H, page = 12, 3, 8
    mag = torch.tensor([1e-30, 1e-6, 1.0, 3e4, 1e30, 1.0])[torch.arange(N * H) % 6].view(N, 1, H, 1)
    k = torch.randn(N, 1, H, D) * mag
    k[2, 0, 1, : D // 2] *= 1e-4  # subnormal codes beside normal ones
    v = torch.randn(N, 1, H, D)
    v[3, 0, 2] = 0.0
    if dtype != torch.float32:
        k, v = k.clamp(-6e4, 6e4).to(dtype), v.to(dtype)
    slots = torch.randperm(4 * page)[:N].view(N, 1)
    kc, kss = torch.zeros(4, page, H, D, dtype=FP8), torch.zeros(4, page, H)
    vc, vss = value_pool((4, page, H, D), FP8, "cpu"), torch.zeros(4, page, H)
    want = [kc.clone(), vc.clone(), kss.clone(), vss.clone()]
    store_kv_reference(want[0], slots, k, want[2])
    store_kv_reference(want[1], slots, v, want[3])
    store_kv_triton(kc, slots, k, vc, v, kss, vss)
    for got, ref in ((kc, want[0]), (vc, want[1]), (kss, want[2]), (vss, want[3])):
        assert torch.equal(got.contiguous().view(torch.uint8), ref.contiguous().view(torch.uint8))


@cpu_only
@requires_triton
@CODES
@pytest.mark.parametrize("steps", ["", "1", "3", "weighted"])
def test_store_interpreter(codes, steps, monkeypatch):
    """The quantizing store kernel writes the reference's codes and scales byte for byte: FP8 with the
    default scale search, with none (``ZIPAGE_FP8_SCALE_STEPS=1``), with 3 candidates, and the default search
    of keys weighted by queries' moments."""
    monkeypatch.setenv("ZIPAGE_FP8_SCALE_STEPS", "" if steps == "weighted" else steps)
    _store_case("cpu", torch.float32, 9, 3, 20, 4, codes, weighted=steps == "weighted")
    _store_case("cpu", torch.float16, 5, 2, 16, 8, codes, weighted=steps == "weighted")


@cpu_only
@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@CODES
def test_decode_interpreter(dtype, codes):
    _decode_case("cpu", dtype, 3, 4, 2, 32, 16, [40, 17, 33], starts=[0, 5, 0], num_splits=2, codes=codes)


@cpu_only
@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@CODES
def test_prefill_interpreter(dtype, codes):
    _prefill_case("cpu", dtype, 4, 2, 16, 16, [40, 17, 33], [9, 17, 1], starts=[0, 3, 0], block=16, codes=codes)


@cpu_only
@requires_triton
@CODES
def test_window_score_interpreter(codes):
    _window_case("cpu", torch.float16, 2, 4, 2, 4, 16, 37, pad=3, codes=codes)


@cpu_only
@requires_triton
@CODES
def test_lightning_redundancy_interpreter(codes):
    _redundancy_case("cpu", 2, 2, 40, 16, 16, pad=3, codes=codes)


@cpu_only
@requires_triton
@CODES
def test_compact_interpreter(codes):
    _compact_case("cpu", 2, 2, 8, 4, 14, 9, codes)


@requires_triton
def test_the_8bit_decode_kernel_on_int8_pages():
    """The 8-bit decode kernel reads INT8 pages with fp16 dots (exact codes) and refuses its
    e4m3-only conversions on them by name (before any launch)."""
    k, v, ks, vs = fp8_pages(4, 8, 2, 16, "cpu", codes=INT8)
    q = torch.randn(2, 4, 16).half()
    table = torch.arange(4, dtype=torch.int32).view(2, 2)
    lens = torch.tensor([10, 16], dtype=torch.int32)
    for convert in ("bits", "fp8mma"):
        with pytest.raises(ValueError, match=f"convert='{convert}' reads e4m3 codes; INT8 pages take"):
            paged_decode_attention_triton(q, k, v, table, lens, 0.25, k_scale=ks, v_scale=vs,
                                          fp8_kernel={"convert": convert, "block_n": 32})
    ref = paged_decode_attention_reference(q.float(), k, v, table, lens, 0.25, None, ks, vs)
    for load in ("gather", "page"):
        out = paged_decode_attention_triton(q, k, v, table, lens, 0.25, k_scale=ks, v_scale=vs,
                                            fp8_kernel={"convert": "fp16", "head_fast": 1, "block_n": 8, "load": load})
        assert ((out.float() - ref).norm() / ref.norm()).item() < 3e-3


# ----------------------------------------------------------------------------- on the GPU (compiled, bf16)
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D, page", [(64, 16), (128, 256), (128, 64)])
@CODES
def test_fp8_decode_gpu(dtype, D, page, codes):
    _decode_case("cuda", dtype, 5, 32, 8, D, page, [3000, 1, 257, 2048 + 256, 20000], starts=[0, 0, 7, 0, 100],
                 codes=codes)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page", [16, 256])
@CODES
def test_fp8_prefill_gpu(dtype, page, codes):
    _prefill_case("cuda", dtype, 32, 8, 128, page, [4096, 700, 1300], [4096, 1, 513], starts=[0, 0, 9], codes=codes)


@cpu_only
@requires_triton
@pytest.mark.parametrize("launch", ["heads=1", "heads=2,split=1,warps=1", "split=1,warps=8", "heads=0,split=0,warps=4"])
def test_store_launches_write_the_same_bytes(launch, monkeypatch):
    """``ZIPAGE_STORE_LAUNCH`` changes how the store's programs are cut (heads a program, keys and values apart,
    warps), never what it writes: the reference's codes and scales, byte for byte, weighted keys included."""
    from zipage.kernels.paged_kv import set_store_launch

    monkeypatch.setenv("ZIPAGE_FP8_SCALE_STEPS", "")
    set_store_launch(launch)
    try:
        _store_case("cpu", torch.float32, 9, 3, 20, 4, FP8, weighted=True)
        _store_case("cpu", torch.float16, 5, 2, 16, 8, INT8)
    finally:
        set_store_launch(None)


def _division_search(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale search as it first was: candidate ``i``'s codes ``x / (base * 2 ** (i / 16))``, an IEEE division
    for every candidate (the store now takes the first candidate's quotients times ``2 ** (-i / 16)``)."""
    from zipage.kernels.fp8 import ERROR_BITS, scale_steps_table

    mult, weight, _ = scale_steps_table(16, rows.device)
    base = (rows.abs().amax(-1) / torch.full_like(rows[:, 0], FP8_MAX)).clamp(min=MIN_SCALE)
    s = base[:, None] * mult
    c = (rows[:, None, :] / s[..., None]).clamp(-FP8_MAX, FP8_MAX)
    q = c.to(FP8).float()
    e = ((q - c) * 2.0**ERROR_BITS).to(torch.int64)
    best = ((e * e).sum(-1) * weight).argmin(-1)
    return q[torch.arange(len(rows)), best].to(FP8), s[torch.arange(len(rows)), best]


@cpu_only
@requires_triton
def test_store_takes_the_products_the_reference_takes(monkeypatch):
    """Rows whose codes differ between dividing by every candidate's scale and multiplying the first candidate's
    quotients: the store kernel (under the interpreter) writes the reference's bytes, so a kernel that still
    divided, or a reference that did, fails here and not only on a GPU (a few rows in 80,000 Gaussian ones tell them apart)."""
    from zipage.kernels.fp8 import quantize_reference

    monkeypatch.setenv("ZIPAGE_FP8_SCALE_STEPS", "")
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(80000, 128, generator=gen).to(torch.bfloat16).float()
    want_codes, want_scales = quantize_reference(rows)
    old_codes, old_scales = _division_search(rows)
    apart = ((want_codes.view(torch.uint8) != old_codes.view(torch.uint8)).any(-1) | (want_scales != old_scales))
    rows = rows[apart][:8]
    assert len(rows) >= 2, "too few rows tell the two searches apart"
    H, n = 2, len(rows) // 2
    kc, vc = torch.zeros(n, 16, H, 128, dtype=FP8), torch.zeros(n, 16, H, 128, dtype=FP8)
    ks, vs = torch.zeros(n, 16, H), torch.zeros(n, 16, H)
    x = rows[: 2 * n].view(n, H, 128)
    slots = torch.arange(n) * 16 + 3
    store_kv_triton(kc, slots, x, vc, x.clone(), ks, vs)
    ref_codes, ref_scales = quantize_reference(x)
    got = kc.view(-1, H, 128)[slots]
    assert torch.equal(got.view(torch.uint8), ref_codes.view(torch.uint8))
    assert torch.equal(ks.view(-1, H)[slots], ref_scales)
    div_codes, _ = _division_search(x.reshape(-1, 128))
    assert not torch.equal(got.view(torch.uint8), div_codes.view(-1, H, 128).view(torch.uint8))


@pytest.mark.parametrize("raw, message", [("heads=3", "heads=3 is invalid"), ("split=2", "split=2 is invalid"),
                                          ("warps=x", "warps='x' must be a whole number"),
                                          ("blocks=2", "unknown key 'blocks'")])
def test_store_launch_refuses_a_bad_setting_by_name(raw, message, monkeypatch):
    from zipage.kernels.paged_kv import StoreLaunch, set_store_launch

    try:
        assert StoreLaunch() == StoreLaunch(heads=2, split=True, warps=2)  # (the default, measured in session 41)
        monkeypatch.setenv("ZIPAGE_STORE_LAUNCH", "heads=4, split=0")
        assert set_store_launch(None) == StoreLaunch(heads=4, split=False, warps=2)  # (the variable, read again)
        monkeypatch.setenv("ZIPAGE_STORE_LAUNCH", raw)
        with pytest.raises(ValueError, match=f"ZIPAGE_STORE_LAUNCH: {re.escape(message)}"):
            set_store_launch(None)
        with pytest.raises(ValueError, match=f"ZIPAGE_STORE_LAUNCH: {re.escape(message)}"):
            set_store_launch(raw)
    finally:
        monkeypatch.delenv("ZIPAGE_STORE_LAUNCH")
        set_store_launch(None)


@gpu
@needs_cuda
@pytest.mark.parametrize("launch", ["", "heads=0,split=0,warps=4", "heads=1,split=1,warps=1"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@CODES
@pytest.mark.parametrize("steps", ["", "1", "weighted"])
def test_fp8_store_gpu(dtype, codes, steps, launch, monkeypatch):
    # FP8: the default scale search, none, and the search weighted by queries' moments (keys); the default launch
    # and programs of two heads with keys and values apart
    from zipage.kernels.paged_kv import set_store_launch

    monkeypatch.setenv("ZIPAGE_FP8_SCALE_STEPS", "" if steps == "weighted" else steps)
    set_store_launch(launch)
    try:
        _store_case("cuda", dtype, 4096, 8, 128, 256, codes, weighted=steps == "weighted")
        _store_case("cuda", dtype, 300, 3, 64, 16, codes, weighted=steps == "weighted")
    finally:
        set_store_launch(None)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S", [2064, 30000])
@CODES
def test_fp8_window_score_gpu(dtype, S, codes):
    _window_case("cuda", dtype, 3, 32, 8, 16, 128, S, pad=5, codes=codes)


@gpu
@needs_cuda
@pytest.mark.parametrize("block", [16, 256])
@CODES
def test_fp8_lightning_redundancy_gpu(block, codes):
    _redundancy_case("cuda", 3, 8, 4000, 128, block, pad=7, codes=codes)


@gpu
@needs_cuda
@pytest.mark.parametrize("page, S, k", [(16, 2304, 2048), (256, 40000, 2048)])
@CODES
def test_fp8_compact_gpu(page, S, k, codes):
    _compact_case("cuda", 2, 8, 128, page, S, k, codes)


@gpu
@needs_cuda
def test_fp8_decode_is_cuda_graph_safe():
    """The FP8 decode kernel replayed from a CUDA graph after the pages changed gives the fresh answer."""
    torch.manual_seed(5)
    k, v, ks, vs = fp8_pages(40, 16, 2, 64, "cuda")
    table = torch.arange(40, device="cuda", dtype=torch.int32).view(4, 10)
    lens = torch.tensor([150, 3, 160, 77], dtype=torch.int32, device="cuda")
    q = torch.randn(4, 8, 64, device="cuda", dtype=torch.bfloat16)
    run = lambda: paged_decode_attention_triton(q, k, v, table, lens, 0.125, num_splits=4,  # noqa: E731
                                                k_scale=ks, v_scale=vs)
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    nk, nv, nks, nvs = fp8_pages(40, 16, 2, 64, "cuda")
    for dst, src in ((k, nk), (v, nv), (ks, nks), (vs, nvs)):
        dst.copy_(src)
    graph.replay()
    ref = paged_decode_attention_reference(q.float(), k, v, table, lens, 0.125, k_scale=ks, v_scale=vs)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


def test_int8_rotation(monkeypatch):
    """INT8 pages' rotation: an orthonormal, symmetric Hadamard matrix (its own inverse), for int8 and
    power-of-two head dims only; ZIPAGE_INT8_ROTATION=0 turns it off; rotate() keeps dot products."""
    from zipage.kernels.fp8 import kv_rotation, rotate

    monkeypatch.delenv("ZIPAGE_INT8_ROTATION", raising=False)
    monkeypatch.delenv("ZIPAGE_FP8_ROTATION", raising=False)
    h = kv_rotation("int8", 64, "cpu")
    assert h.shape == (64, 64) and torch.equal(h, h.T)
    assert torch.allclose(h @ h, torch.eye(64), atol=1e-6)
    assert torch.allclose(h.abs(), torch.full((64, 64), 64 ** -0.5))
    assert kv_rotation("fp8", 64, "cpu") is None and kv_rotation("auto", 64, "cpu") is None
    assert kv_rotation("int8", 80, "cpu") is None  # (not a power of two: stored as it is)
    q, k = torch.randn(3, 64), torch.randn(5, 64)
    assert torch.allclose(rotate(q, h) @ rotate(k, h).T, q @ k.T, atol=1e-5)
    assert torch.allclose(rotate(rotate(k, h), h), k, atol=1e-6)
    assert rotate(k, None) is k
    # an outlier channel: rotated, int8 rounding error in a logit is far smaller
    k = torch.randn(256, 64)
    k[:, 3] += 40.0
    qv = torch.randn(64)
    qv[3] = 5.0
    plain = dequantize_reference(*quantize_reference(k, INT8))
    turned = rotate(dequantize_reference(*quantize_reference(rotate(k, h), INT8)), h)
    assert (turned @ qv - k @ qv).abs().mean() < 0.25 * (plain @ qv - k @ qv).abs().mean()
    monkeypatch.setenv("ZIPAGE_INT8_ROTATION", "0")
    assert kv_rotation("int8", 64, "cpu") is None
    monkeypatch.setenv("ZIPAGE_FP8_ROTATION", "1")  # FP8 pages: rotated only when asked
    assert torch.equal(kv_rotation("fp8", 64, "cpu"), h) and kv_rotation("fp8", 80, "cpu") is None
    monkeypatch.setenv("ZIPAGE_INT8_ROTATION", "yes")  # neither 1 nor 0: refused by name
    with pytest.raises(ValueError, match="ZIPAGE_INT8_ROTATION='yes'"):
        kv_rotation("int8", 64, "cpu")


def _dim_major(v: torch.Tensor) -> torch.Tensor:
    """The same logical pool, each page stored ``[H, D, page]`` (what ``fp8.value_pool`` allocates)."""
    from zipage.kernels.fp8 import dim_major

    out = v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert dim_major(out) and torch.equal(out.view(torch.uint8), v.view(torch.uint8))
    return out


@requires_triton
@pytest.mark.parametrize("codes", [FP8, INT8], ids=["fp8", "int8"])
def test_dimension_major_values_through_every_kernel(codes):
    """Values stored dimension-major (the engine's 8-bit value pools): the quantizing store, compaction, the
    dequantizing copy and both prefill kernels give bit for bit what they give on token-major pools (the same
    arithmetic, other addresses); the PyTorch store and compaction too."""
    from zipage.kernels import compact_reference, compact_triton, paged_prefill_attention_triton, store_kv_reference
    from zipage.kernels.paged_kv import read_slots, store_kv_triton
    from zipage.kernels.paged_prefill import PrefillConfig, dequantize_pages, paged_prefill_attention_v2

    torch.manual_seed(3)
    dev = "cuda" if CUDA else "cpu"
    P, page, H, D = 12, 16, 2, 32
    k = torch.zeros(P, page, H, D, dtype=codes, device=dev)
    ks = torch.zeros(P, page, H, device=dev)
    v_tm, v_dm = torch.zeros_like(k), _dim_major(torch.zeros_like(k))
    vs_tm, vs_dm = torch.zeros_like(ks), torch.zeros_like(ks)
    slots = torch.randperm(P * page, device=dev)[:70]
    kn, vn = torch.randn(70, H, D, device=dev), torch.randn(70, H, D, device=dev) * 3
    store_kv_triton(k, slots, kn, v_tm, vn, ks, vs_tm)
    k2, ks2 = torch.zeros_like(k), torch.zeros_like(ks)
    store_kv_triton(k2, slots, kn, v_dm, vn, ks2, vs_dm)
    assert torch.equal(v_dm.view(torch.uint8), v_tm.view(torch.uint8)) and torch.equal(vs_dm, vs_tm)
    v_ref, vs_ref = _dim_major(torch.zeros_like(k)), torch.zeros_like(ks)
    store_kv_reference(v_ref, slots, vn, vs_ref)
    assert torch.equal(read_slots(v_ref, slots).view(torch.uint8), read_slots(v_tm, slots).view(torch.uint8))

    # compaction (the kernel and PyTorch) moves the same bytes
    table = slots[:64].view(2, 32)
    keep = torch.sort(torch.randperm(32, device=dev)[:20].repeat(2, H, 1), dim=-1).values
    pools = {}
    for name, fn in (("triton", compact_triton), ("torch", compact_reference)):
        for layout, v in (("tm", v_tm.clone()), ("dm", _dim_major(v_tm))):
            s = vs_tm.clone()
            fn([v, s], table, keep)
            pools[name, layout] = (v.contiguous().view(torch.uint8), s)
    for key, (v, s) in pools.items():
        assert torch.equal(v, pools["torch", "tm"][0]) and torch.equal(s, pools["torch", "tm"][1]), key

    # the dequantizing copy and both prefill kernels
    page_table = torch.randperm(P, device=dev)[:8].view(2, 4).to(torch.int32)
    for dtype in (torch.float16,):
        a = dequantize_pages(k, v_tm, ks, vs_tm, page_table, dtype)
        b = dequantize_pages(k, _dim_major(v_tm), ks, vs_tm, page_table, dtype)
        assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    lens = torch.tensor([50, 37], dtype=torch.int32, device=dev)
    cu = torch.tensor([0, 20, 27], dtype=torch.int32, device=dev)
    q = torch.randn(27, 4, D, device=dev, dtype=torch.float16)
    for fn, kw in ((paged_prefill_attention_triton, dict(block_m=16, block_n=16)),
                   (paged_prefill_attention_v2, dict(config=PrefillConfig(block_m=16, block_n=16, num_warps=4,
                                                                          dequantize=False))),
                   (paged_prefill_attention_v2, dict(config=PrefillConfig(block_m=16, block_n=16, num_warps=4)))):
        outs = [fn(q, k, v, page_table, cu, lens, D**-0.5, k_scale=ks, v_scale=vs_tm, max_q_len=20, **kw)
                for v in (v_tm, _dim_major(v_tm))]
        assert torch.isfinite(outs[0].float()).all() and torch.equal(outs[0], outs[1]), fn.__name__


@cpu_only
@requires_triton
def test_small_values_keep_fp16_precision():
    """fp16 queries over 8-bit values ~1e-3 (value scales ~2e-6): the probabilities times the value scales fall
    below fp16's normal range, so the kernels that fold the scales into the probabilities divide them by the
    tile's largest scale first (before: 3.6e-3 of relative error for the general decode kernel, ~10x this)."""
    import zipage.kernels.paged_prefill as pp

    torch.manual_seed(7)
    lens, q_lens, page, Hkv, D = [120, 75], [40, 75], 16, 2, 16
    P = 2 * 8 + 2
    k, v, ks, vs = fp8_pages(P, page, Hkv, D, "cpu", spread=0.0)
    vs = vs * 1e-3
    table = torch.randperm(P)[:16].view(2, 8).to(torch.int32)
    kv_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(2, 4, D).half()
    ref = paged_decode_attention_reference(q.float(), k, v, table, kv_lens, D**-0.5, k_scale=ks, v_scale=vs)
    out = paged_decode_attention_triton(q, k, v, table, kv_lens, D**-0.5, k_scale=ks, v_scale=vs, num_splits=1,
                                        fp8_kernel={"convert": "general"})
    assert rel_err(out, ref) < 1.5e-3
    cu = torch.tensor([0, 40, 115], dtype=torch.int32)
    q = torch.randn(115, 4, D).half()
    ref = paged_prefill_attention_reference(q.float(), k, v, table, cu, kv_lens, D**-0.5, k_scale=ks, v_scale=vs)
    out = paged_prefill_attention_triton(q, k, v, table, cu, kv_lens, D**-0.5, block_m=16, block_n=16, k_scale=ks,
                                         v_scale=vs)
    assert rel_err(out, ref) < 1.5e-3
    out = pp.paged_prefill_attention_v2(q, k, v, table, cu, kv_lens, D**-0.5, k_scale=ks, v_scale=vs,
                                        config=pp.parse_config("m32n16w4s1-codes"))
    assert rel_err(out, ref) < 1.5e-3
