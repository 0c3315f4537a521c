"""Every Triton kernel against its PyTorch reference.

On a CPU machine these run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest)
with fp16/fp32 (the interpreter's ``tl.dot`` is wrong on bf16 operands); the ``gpu`` cases run
the compiled kernels in bf16 and fp16 at sizes of tens of thousands of tokens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA, requires_triton

from zipage.kernels import (
    compact_reference,
    compact_triton,
    lightning_redundancy_triton,
    paged_decode_attention_reference,
    paged_decode_attention_triton,
    paged_prefill_attention_reference,
    paged_prefill_attention_triton,
    redundancy_scores_reference,
    slot_indices,
    store_kv_reference,
    store_kv_triton,
    window_scores_reference,
    window_scores_triton,
)

pytestmark = requires_triton
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
cpu_only = pytest.mark.skipif(CUDA, reason="interpreter case (the GPU runs the gpu cases)")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in kernel output"
    return ((out - ref).norm() / ref.norm().clamp(min=1e-12)).item()


TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def random_pages(B: int, lens: list[int], page: int, H: int, D: int, dtype, device, extra_pages: int = 3):
    """A pool holding ``B`` sequences on shuffled, non-contiguous pages (last pages partly filled)."""
    per_row = max(-(-n // page) for n in lens)
    P = B * per_row + extra_pages
    perm = torch.randperm(P, device=device)
    table = perm[: B * per_row].view(B, per_row).to(torch.int32)
    k = torch.randn(P, page, H, D, device=device).to(dtype)
    v = torch.randn(P, page, H, D, device=device).to(dtype)
    return k, v, table


def _decode_case(device, dtype, B, Hq, Hkv, D, page, lens, starts=None, num_splits=None):
    torch.manual_seed(B * 1000 + D + page)
    k, v, table = random_pages(B, lens, page, Hkv, D, dtype, device)
    q = torch.randn(B, Hq, D, device=device).to(dtype)
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    kv_starts = torch.tensor(starts or [0] * B, dtype=torch.int32, device=device)
    scale = D**-0.5
    ref = paged_decode_attention_reference(q.float(), k.float(), v.float(), table, kv_lens, scale, kv_starts)
    out = paged_decode_attention_triton(q, k, v, table, kv_lens, scale, kv_starts, num_splits=num_splits)
    assert rel_err(out, ref) < TOL[dtype]


def _prefill_case(device, dtype, Hq, Hkv, D, page, lens, q_lens, starts=None, block=64):
    torch.manual_seed(sum(lens) + D)
    B = len(lens)
    k, v, table = random_pages(B, lens, page, Hkv, D, dtype, device)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=device)
    q = torch.randn(int(cu[-1]), Hq, D, device=device).to(dtype)
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    kv_starts = torch.tensor(starts or [0] * B, dtype=torch.int32, device=device)
    ref = paged_prefill_attention_reference(q.float(), k.float(), v.float(), table, cu, kv_lens, D**-0.5, kv_starts)
    out = paged_prefill_attention_triton(q, k, v, table, cu, kv_lens, D**-0.5, kv_starts, block_m=block, block_n=block)
    assert rel_err(out, ref) < TOL[dtype]


def _store_case(device, dtype, N, H, D, page):
    torch.manual_seed(N + H)
    P = -(-2 * N // page) + 2
    kc = torch.randn(P, page, H, D, device=device).to(dtype)
    vc = torch.randn(P, page, H, D, device=device).to(dtype)
    # a column slice of a wider slot table ([N, 1] with stride 2), as the cache hands it over
    slots = torch.randperm(P * page, device=device)[: 2 * N].view(N, 2)[:, 1:]
    k = torch.randn(1, H, N, D, device=device).to(dtype).permute(2, 0, 1, 3)  # [N, 1, H, D], strided
    v = torch.randn(N, 1, H, D, device=device).to(dtype)
    rk, rv = kc.clone(), vc.clone()
    store_kv_reference(rk, slots, k)
    store_kv_reference(rv, slots, v)
    store_kv_triton(kc, slots, k, vc, v)
    assert torch.equal(kc, rk) and torch.equal(vc, rv)


def _window_case(device, dtype, B, Hq, Hkv, w, D, S, pad=0, prev=False):
    torch.manual_seed(S + Hq)
    q = torch.randn(B, Hq, w, D, device=device).to(dtype)
    keys = torch.randn(B, Hkv, S, D, device=device).to(dtype)
    km = torch.ones(B, S, dtype=torch.bool, device=device)
    km[-1, :pad] = False
    qm = km[:, S - w :]
    pv = torch.rand(B, Hkv, S, device=device) * 0.05 if prev else None
    if prev == "strided":  # as the state pool's gather gives it: [B, S, Hkv] seen as [B, Hkv, S]
        pv = torch.rand(B, S, Hkv, device=device).transpose(1, 2) * 0.05
    for group, window in (("max", "mean"), ("mean", "sum")):
        ref = window_scores_reference(q.float(), keys.float(), km, qm, D**-0.5, group, window, pv, 0.8)
        out = window_scores_triton(q, keys, km, qm, D**-0.5, group, window, pv, 0.8)
        assert rel_err(out, ref) < TOL[dtype] * 2
        if pad:  # padding draws no attention: only the decayed previous score can remain
            expected = 0.8 * pv[-1, :, :pad] if prev else torch.zeros_like(out[-1, :, :pad])
            torch.testing.assert_close(out[-1, :, :pad], expected)


def _redundancy_case(device, dtype, B, H, S, D, block, pad=0):
    torch.manual_seed(S + block)
    keys = torch.randn(B, H, S, D, device=device)
    keys[:, :, 3] = keys[:, :, 1] * 2  # near-duplicates inside a page
    keys[:, :, S - 2] = keys[:, :, S - 5]
    keys = keys.to(dtype)
    km = torch.ones(B, S, dtype=torch.bool, device=device)
    km[0, :pad] = False
    ref = redundancy_scores_reference(keys.float(), km, block, 0.5, 0.4)
    out = lightning_redundancy_triton(keys, km, block, 0.5, 0.4)
    assert rel_err(out, ref) < TOL[dtype] * 2
    assert torch.allclose(out.sum(-1), torch.ones(B, H, device=device), atol=1e-4)


def _compact_case(device, dtype, B, H, D, page, S, k):
    torch.manual_seed(S * 7 + k)
    per_row = -(-S // page)
    P = B * per_row + 4
    table = torch.randperm(P, device=device)[: B * per_row].view(B, per_row)
    slots = slot_indices(table, 0, S, page)
    keys = torch.randn(P, page, H, D, device=device).to(dtype)
    values = torch.randn(P, page, H, D, device=device).to(dtype)
    state = torch.rand(P, page, H, device=device)
    keep = torch.stack([torch.stack([torch.randperm(S, device=device)[:k] for _ in range(H)]) for _ in range(B)])
    keep = keep.sort(dim=-1).values
    want = [keys.clone(), values.clone(), state.clone()]
    got = [keys.clone(), values.clone(), state.clone()]
    compact_reference(want, slots, keep)
    compact_triton(got, slots, keep)
    for w_, g_ in zip(want, got):
        assert torch.equal(w_, g_)


# --------------------------------------------------------------------------- interpreter cases (CPU)
@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("page, num_splits", [(16, 1), (16, 3), (32, 2)])
def test_decode_interpreter(dtype, page, num_splits):
    _decode_case("cpu", dtype, 3, 8, 2, 32, page, [5, 70, 33], starts=[0, 4, 0], num_splits=num_splits)


@pytest.mark.parametrize("fp8", [False, True])
def test_one_split_stores_what_the_merge_would(fp8):
    """With one split (and no sinks) the split pass writes the output itself and no merge runs: bit for bit what the
    split pass into float32 partials plus the merge give, on 16-bit and 8-bit pages (an empty row included)."""
    from zipage.kernels.fp8 import quantize_reference
    from zipage.kernels.paged_attention import LOG2E, _launch_decode_split, _merge_splits, _scale_args

    dev, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float16)
    torch.manual_seed(7)
    k, v, table = random_pages(3, [40, 0, 33], 16, 2, 32, dtype, dev)
    q = torch.randn(3, 8, 32, device=dev).to(dtype)
    lens = torch.tensor([40, 0, 33], dtype=torch.int32, device=dev)
    starts = torch.zeros(3, dtype=torch.int32, device=dev)
    kw = {}
    if fp8:
        (k, ks), (v, vs) = quantize_reference(k), quantize_reference(v)
        kw = dict(k_scale=ks, v_scale=vs, fp8_kernel=dict(convert="general"))
    out = paged_decode_attention_triton(q, k, v, table, lens, 0.25, starts, num_splits=1, block_n=32, **kw)
    ks_, vs_, sp, st, is8 = _scale_args(k, v, kw.get("k_scale"), kw.get("v_scale"))
    mid_o = torch.empty(3, 8, 1, 32, dtype=torch.float32, device=dev)
    mid_lse = torch.empty(3, 8, 1, dtype=torch.float32, device=dev)
    _launch_decode_split(q, k, v, ks_, vs_, table, lens, starts, mid_o, mid_lse, 0.25, sp, st, 4, 16, 32, 1, is8,
                         None, None, 4, 2)
    want = torch.empty_like(q)
    _merge_splits(mid_o, mid_lse, want, None, 1)
    assert torch.equal(out, want) and not out[1].any()


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_interpreter(dtype):
    _prefill_case("cpu", dtype, 4, 2, 32, 16, lens=[9, 40, 23], q_lens=[9, 17, 1], starts=[2, 0, 0], block=16)


@cpu_only
def test_store_interpreter():
    _store_case("cpu", torch.float16, 37, 2, 16, 8)


@cpu_only
@pytest.mark.parametrize("prev", [False, True, "strided"])
def test_window_score_interpreter(prev):
    _window_case("cpu", torch.float32, 2, 8, 2, 16, 32, 75, pad=9, prev=prev)


@cpu_only
@pytest.mark.parametrize("block", [16, 32])
def test_lightning_redundancy_interpreter(block):
    _redundancy_case("cpu", torch.float32, 2, 2, 70, 16, block, pad=5)


@cpu_only
def test_compact_interpreter():
    _compact_case("cpu", torch.float16, 2, 3, 8, 4, 37, 13)


def _strided_views(*tensors):
    """The same values with other strides: a page table stored column-major, vectors as every other
    element of a wider buffer."""
    out = []
    for t in tensors:
        if t.dim() == 2:
            out.append(t.t().contiguous().t())
        else:
            wide = torch.stack([t, torch.full_like(t, 10**6)], -1)  # (a neighbour that would be read by mistake)
            out.append(wide[..., 0])
    assert all(torch.equal(a, b) and not a.is_contiguous() for a, b in zip(out, tensors))
    return out


def test_kernels_read_index_tensors_of_any_strides():
    """A page table, lengths, starts, query offsets, sinks and compaction slots that are strided views give
    what contiguous ones give (the kernels index them as contiguous: the wrappers make them so)."""
    _on_the_test_device(_strides_case, seed=0)


def _on_the_test_device(case, seed: int) -> None:
    """``case(device)`` with tensors made on the GPU when there is one (compiled kernels), else the CPU."""
    torch.manual_seed(seed)
    dev = "cuda" if CUDA else "cpu"
    torch.set_default_device(dev)
    try:
        case(dev)
    finally:
        torch.set_default_device(None)


def _strides_case(dev):
    from zipage.kernels.paged_prefill import PrefillConfig, paged_prefill_attention_v2

    lens, page, Hkv, G, D = [9, 14, 5], 4, 2, 2, 32
    k, v, table = random_pages(3, lens, page, Hkv, D, torch.float32, dev)
    kl, ks = torch.tensor(lens, dtype=torch.int32), torch.tensor([0, 2, 1], dtype=torch.int32)
    sinks = torch.randn(Hkv * G)
    q = torch.randn(3, Hkv * G, D)
    ref = paged_decode_attention_reference(q, k, v, table, kl, D**-0.5, ks, sinks=sinks)
    t2, kl2, ks2, sinks2 = _strided_views(table, kl, ks, sinks)
    for splits in (None, 2):
        out = paged_decode_attention_triton(q, k, v, t2, kl2, D**-0.5, ks2, num_splits=splits, sinks=sinks2)
        assert rel_err(out, ref) < TOL[torch.float32]
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    qp = torch.randn(9, Hkv * G, D)
    ref = paged_prefill_attention_reference(qp, k, v, table, cu, kl, D**-0.5, ks, sinks=sinks)
    (cu2,) = _strided_views(cu)
    out = paged_prefill_attention_triton(qp, k, v, t2, cu2, kl2, D**-0.5, ks2, block_m=16, block_n=16, sinks=sinks2)
    assert rel_err(out, ref) < TOL[torch.float32]
    cfg = PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
    assert rel_err(paged_prefill_attention_v2(qp, k, v, t2, cu2, kl2, D**-0.5, ks2, config=cfg, sinks=sinks2),
                   ref) < TOL[torch.float32]
    # compaction in place through column-major slots
    P, S, kk, H = 12, 10, 6, 2
    slots = slot_indices(torch.randperm(P)[:6].view(2, 3), 0, S, page)
    keep = torch.stack([torch.stack([torch.randperm(S)[:kk].sort().values for _ in range(H)]) for _ in range(2)])
    cache = torch.randn(P, page, H, 8)
    want, got = [cache.clone()], [cache.clone()]
    compact_reference(want, slots, keep)
    compact_triton(got, _strided_views(slots)[0], keep)
    assert torch.equal(want[0], got[0])


def test_a_nan_stays_nan_through_attention_and_the_8bit_store():
    """NaN in a key: dense math, the kernels and the PyTorch path (the CPU's) all give NaN for the heads that
    read it (the reference once turned them into zeros); rows with nothing allowed still give zeros. A row
    with a NaN or an infinity stored as 8-bit codes reads back as NaN from the kernel as from the reference."""
    _on_the_test_device(_nan_case, seed=1)


def _nan_case(dev):
    from zipage.kernels import dequantize_reference, quantize_reference
    from zipage.kernels.fp8 import FP8, INT8

    lens, page, Hkv, G, D = [10], 4, 1, 2, 16
    k, v, table = random_pages(1, lens, page, Hkv, D, torch.float32, dev)
    k[table[0, 1], 2, 0, 5] = float("nan")
    q, kl = torch.randn(1, Hkv * G, D), torch.tensor(lens, dtype=torch.int32)
    for out in (paged_decode_attention_reference(q, k, v, table, kl, D**-0.5),
                paged_decode_attention_triton(q, k, v, table, kl, D**-0.5)):
        assert torch.isnan(out).all()
    empty = paged_decode_attention_reference(q, k, v, table, kl, D**-0.5, torch.tensor([10], dtype=torch.int32))
    assert torch.equal(empty, torch.zeros_like(empty))  # (every key before the start: nothing allowed)
    x = torch.randn(3, 2, 8)
    x[0, 1, 3] = float("nan")
    x[2, 0, 0] = float("inf")
    for codes_dtype in (FP8, INT8):
        cache = torch.zeros(2, 4, 2, 8, dtype=codes_dtype)
        scale = torch.zeros(2, 4, 2)
        store_kv_triton(cache, torch.tensor([1, 2, 6]), x, scale=scale)
        got = dequantize_reference(cache.view(8, 2, 8)[[1, 2, 6]], scale.view(8, 2)[[1, 2, 6]])
        want = dequantize_reference(*quantize_reference(x, codes_dtype))
        bad = torch.isnan(want)
        assert torch.equal(bad, torch.isnan(got)) and bad[0, 1].all() and bad[2, 0].all() and not bad[1].any()
        # through a NaN scale over zero codes: no NaN code reaches the pool (kernels may read stale slots' codes)
        ref_codes, ref_scales = quantize_reference(x, codes_dtype)
        stored = cache.view(8, 2, 8)[[1, 2, 6]]
        for row in ((0, 1), (2, 0)):
            assert torch.isnan(ref_scales[row]) and torch.isnan(scale.view(8, 2)[[1, 2, 6]][row])
            assert torch.equal(ref_codes[row].view(torch.uint8), torch.zeros(8, dtype=torch.uint8))
            assert torch.equal(stored[row].view(torch.uint8), torch.zeros(8, dtype=torch.uint8))
        assert torch.isfinite(cache.float()).all()
        # the other rows as the reference stores them (compiled, a code may round the other way at a tie)
        assert ((got[~bad] - want[~bad]).norm() / want[~bad].norm()).item() < 2e-2


# --------------------------------------------------------------------------- GPU cases
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("page", [16, 64, 256])
def test_decode_gpu(dtype, D, page):
    _decode_case("cuda", dtype, 5, 32, 8, D, page, [1, 300, 4097, 20000, 33000], starts=[0, 7, 0, 100, 0])


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page", [16, 256])
def test_prefill_gpu(dtype, page):
    _prefill_case("cuda", dtype, 32, 8, 128, page, lens=[700, 12000, 3000, 65], q_lens=[700, 1500, 1, 64],
                  starts=[0, 0, 5, 3])


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_store_gpu(dtype):
    _store_case("cuda", dtype, 20000, 8, 128, 16)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S", [2064, 30000])
def test_window_score_gpu(dtype, S):
    _window_case("cuda", dtype, 2, 32, 8, 16, 128, S, pad=33, prev=True if S > 3000 else "strided")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [16, 64, 256])
def test_lightning_redundancy_gpu(dtype, block):
    _redundancy_case("cuda", dtype, 2, 8, 20000, 128, block, pad=17)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page, S, k", [(16, 2304, 2048), (256, 40000, 2048), (64, 30000, 29000)])
def test_compact_gpu_in_place(dtype, page, S, k):
    _compact_case("cuda", dtype, 3, 8, 128, page, S, k)


@gpu
@needs_cuda
def test_decode_is_cuda_graph_safe():
    """Captured once, replayed with new queries and new lengths: no host syncs, no data-dependent shapes."""
    torch.manual_seed(0)
    B, page, D = 8, 64, 128
    k, v, table = random_pages(B, [4096] * B, page, 8, D, torch.bfloat16, "cuda")
    q = torch.randn(B, 32, D, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((B,), 1000, dtype=torch.int32, device="cuda")
    starts = torch.zeros(B, dtype=torch.int32, device="cuda")
    run = lambda: paged_decode_attention_triton(q, k, v, table, lens, D**-0.5, starts, num_splits=8)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for trial in range(3):
        q.copy_(torch.randn_like(q))
        lens.copy_(torch.randint(1, 4097, (B,), device="cuda", dtype=torch.int32))
        starts.copy_(torch.randint(0, 5, (B,), device="cuda", dtype=torch.int32))
        graph.replay()
        ref = paged_decode_attention_reference(q.float(), k.float(), v.float(), table, lens, D**-0.5, starts)
        assert rel_err(out, ref) < TOL[torch.bfloat16]
