"""The FP8 decode kernel's launch choices (``kernels/paged_decode_fp8.py``): every conversion and grid
order gives the reference's attention on FP8 pages (interpreter on a CPU, compiled on a GPU).

Triton's interpreter computes bf16 dots wrongly (numpy has no bf16; the library's other CPU kernel
tests use float32 and fp16 for that reason), so the choices that feed bf16 operands to the dots
("bf16", "bits") run on the GPU only; "fp16" runs everywhere."""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA, requires_triton

from zipage.kernels import paged_decode_attention_reference, paged_decode_attention_triton, quantize_reference
from zipage.kernels._triton import HAS_TRITON
from zipage.kernels.fp8 import dim_major
from zipage.kernels.paged_attention import fp8_decode_choice

DEVICE = "cuda" if CUDA else "cpu"
bf16_dots = pytest.mark.skipif(not CUDA, reason="bf16 dots: GPU only (the interpreter computes them wrongly)")


def _needs_gpu(convert: str, dtype=torch.float16):
    marks = [pytest.mark.gpu, bf16_dots] if convert in ("bf16", "bits") or dtype == torch.bfloat16 else []
    return marks
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in kernel output"
    return ((out - ref).norm() / ref.norm().clamp(min=1e-12)).item()


def _case(dtype, choice, *, Hq=8, Hkv=2, D=32, page=8, lens=(37, 5, 64), starts=None, window=None, softcap=None,
          sinks=False, tiny=False, poison=False, codes=torch.float8_e4m3fn):
    torch.manual_seed(len(lens) + D + Hq)
    B = len(lens)
    per_row = max(-(-n // page) for n in lens)
    P = B * per_row + 2
    mag = torch.exp(torch.randn(P, page, Hkv, 1) * 1.5)  # rows of very different sizes: the scales matter
    if tiny:  # codes in e4m3's subnormal range next to large ones in the same tile
        mag = mag * torch.where(torch.rand(P, page, Hkv, 1) < 0.5, 1.0, 1e-3)
    k, ks = quantize_reference(torch.randn(P, page, Hkv, D) * mag, codes)
    v, vs = quantize_reference(torch.randn(P, page, Hkv, D) * mag, codes)
    if tiny:  # force some codes to subnormals (|code| < 2^-6) in every row
        k[..., : D // 4] = (torch.rand(P, page, Hkv, D // 4) * 0.015).to(k.dtype)
        v[..., : D // 4] = (torch.rand(P, page, Hkv, D // 4) * 0.015).to(v.dtype)
    table = torch.randperm(P)[: B * per_row].view(B, per_row).to(torch.int32)
    if poison:  # every slot no sequence reads holds NaN codes (0x7f; "finite": e4m3's largest, +-448) and a NaN scale
        used = torch.zeros(P, page, dtype=torch.bool)
        for b, n in enumerate(lens):
            s0 = (starts or [0] * B)[b]
            pos = torch.arange(s0, n)
            used[table[b, pos // page].long(), pos % page] = True
        for t in (k, v):
            t.view(torch.uint8)[~used] = 0x7F if poison != "finite" else 0x7E
            if poison == "finite":
                t.view(torch.uint8)[~used, :, ::2] = 0xFE
        ks[~used] = float("nan")
        vs[~used] = float("nan")
    k, v, ks, vs, table = (t.to(DEVICE) for t in (k, v, ks, vs, table))
    q = torch.randn(B, Hq, D, device=DEVICE).to(dtype)
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    kv_starts = torch.tensor(starts or [0] * B, dtype=torch.int32, device=DEVICE)
    sink = torch.randn(Hq, device=DEVICE) if sinks else None
    features = dict(window=window, softcap=softcap, sinks=sink)
    ref = paged_decode_attention_reference(q.float(), k, v, table, kv_lens, D**-0.5, kv_starts, ks, vs, **features)
    choice = dict(choice)
    if choice.pop("v_dim_major", False):  # the same pool, each page stored [H_kv, D, page] (fp8.value_pool)
        v = v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        assert dim_major(v)
    out = paged_decode_attention_triton(q, k, v, table, kv_lens, D**-0.5, kv_starts, k_scale=ks, v_scale=vs,
                                        fp8_kernel=choice or None, **features)
    assert out.dtype == dtype
    bf16_operands = dtype == torch.bfloat16 or choice.get("convert") in ("bf16", "bits")  # (the dots' precision)
    assert rel_err(out, ref) < TOL[torch.bfloat16 if bf16_operands else torch.float16]


if HAS_TRITON:
    import triton
    import triton.language as tl

    from zipage.kernels.paged_decode_fp8 import _fp8_finite_operand

    @triton.jit
    def _finite_convert(X, Y, PTX: tl.constexpr):
        i = tl.arange(0, 256)
        tl.store(Y + i, _fp8_finite_operand(tl.load(X + i), PTX))


VARIANTS = [pytest.param(dtype, dict(convert=c, head_fast=h, block_n=32 if c == "fp8mma" else 16),
                         id=f"{str(dtype)[6:]}-{c}-hf{h}",
                         marks=_needs_gpu(c, dtype))
            for dtype in (torch.float16, torch.bfloat16) for c in ("bf16", "fp16", "bits", "fp8mma") for h in (0, 1)]


@requires_triton
@pytest.mark.parametrize("dtype,choice", VARIANTS)
def test_every_variant_matches_the_reference(dtype, choice):
    _case(dtype, choice, starts=[3, 0, 17])


@requires_triton
@pytest.mark.parametrize("convert", [pytest.param(c, marks=_needs_gpu(c)) for c in ("fp16", "bits", "fp8mma")])
def test_subnormal_codes_and_splits(convert):
    """Codes in e4m3's subnormal range read back exactly (the "bits" image is a bf16 subnormal)."""
    _case(torch.float16, dict(convert=convert, head_fast=1, block_n=32, num_warps=4), tiny=True, lens=(90, 33))


@requires_triton
@pytest.mark.parametrize("convert", [pytest.param(c, marks=_needs_gpu(c)) for c in ("bf16", "fp16", "bits", "fp8mma")])
def test_window_sinks_softcap(convert):
    _case(torch.float16, dict(convert=convert, head_fast=1, block_n=32), window=20, softcap=30.0, sinks=True,
          Hq=4, Hkv=4, lens=(50, 9))


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=_needs_gpu("bf16"))])
def test_page_loads(dtype):
    """load="page": one page-table read per tile (tiles of 16 in pages of 32), with splits, tiles
    that start before ``kv_starts`` and end past the length, and a window (and a register cap: ignored by the
    interpreter, a compiled kernel's ptxas limit on a GPU)."""
    for window in (None, 40):
        _case(dtype, dict(convert="fp16", head_fast=1, block_n=16, load="page", maxnreg=128 if window else None),
              page=32, lens=(150, 1, 33, 97), starts=[5, 0, 17, 0], window=window)


@requires_triton
@pytest.mark.parametrize("codes", [torch.float8_e4m3fn, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize("choice", [dict(convert="fp16", head_fast=1, block_n=16, load="gather"),
                                    dict(convert="fp16", head_fast=1, block_n=16, load="page"),
                                    dict(convert="fp16", head_fast=1, block_n=16, load="page", v_edge="none"),
                                    dict(convert="general", block_n=16)],
                         ids=["gather", "page", "page-none", "general"])
def test_values_stored_dimension_major_everywhere(choice, codes):
    """Values stored dimension-major (``fp8.value_pool``: each page ``[H_kv, D, page]``) read through their
    strides by every decode load and by the general kernel, over tiles that start before ``kv_starts`` and
    end past the length, slots outside every sequence poisoned."""
    _case(torch.float16, dict(choice, v_dim_major=True), page=32, lens=(150, 1, 33, 97), starts=[5, 0, 17, 0],
          poison=True, codes=codes)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("load", ["page", "tma"])
@pytest.mark.parametrize("convert,codes", [("fp16", torch.float8_e4m3fn), ("bf16", torch.float8_e4m3fn),
                                           ("fp8mma", torch.float8_e4m3fn), ("fp16", torch.int8)],
                         ids=["fp16", "bf16", "fp8mma", "int8-fp16"])
def test_page_and_tma_loads_on_the_gpu(load, convert, codes):
    """Tensor-descriptor tiles read other slots' bytes past the range (possibly NaN codes): the
    partial tiles' values must be zeroed, so poison the pools' unused rows with NaN codes."""
    _case(torch.bfloat16, dict(convert=convert, head_fast=1, block_n=128, num_stages=3, load=load), Hq=32, Hkv=8,
          D=128, page=256, lens=(3000, 1, 257, 2304), starts=[0, 0, 7, 100], poison=True, codes=codes)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("v_edge", ["operand", "none", "plain"])
@pytest.mark.parametrize("codes", [torch.float8_e4m3fn, torch.int8], ids=["fp8", "int8"])
def test_stale_value_rows_never_reach_the_output(v_edge, codes):
    """Tensor-descriptor tiles whose outside value rows are zeroed after conversion (``operand``) or left
    in place (``none``: INT8 codes are finite, FP8 NaN codes read as +-448, their probabilities are 0;
    ``plain``: converted as any other, for pools without NaN codes), with every slot outside the sequences
    poisoned with NaN scales and NaN codes (``plain``: e4m3's largest codes, +-448)."""
    _case(torch.bfloat16, dict(convert="fp16", head_fast=1, block_n=128, num_stages=3, load="tma", v_edge=v_edge),
          Hq=32, Hkv=8, D=128, page=256, lens=(3000, 1, 257, 2304), starts=[0, 0, 7, 100],
          poison="finite" if v_edge == "plain" else True, codes=codes)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("v_edge", ["bytes", "none", "plain", None])
@pytest.mark.parametrize("num_warps", [2, 4])
@pytest.mark.parametrize("codes", [torch.float8_e4m3fn, torch.int8], ids=["fp8", "int8"])
def test_values_stored_dimension_major(v_edge, num_warps, codes):
    """Values stored ``[pages, H_kv, D, page]`` (``v_dim_major``, read as ``[D, block_n]`` tiles): the
    reference's attention, with partial tiles over poisoned slots (NaN codes; where stale rows are converted as
    any other, ``plain`` and the default here, e4m3's largest codes, as no zipage pool holds a NaN code)."""
    _case(torch.bfloat16, dict(convert="fp16", head_fast=1, block_n=128, num_stages=3, load="tma", v_edge=v_edge,
                               num_warps=num_warps, v_dim_major=True),
          Hq=32, Hkv=8, D=128, page=256, lens=(3000, 1, 257, 2304), starts=[0, 0, 7, 100],
          poison=True if v_edge in ("bytes", "none") else "finite", codes=codes)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("codes", [torch.float8_e4m3fn, torch.int8], ids=["fp8", "int8"])
def test_the_default_on_the_gpu(codes, monkeypatch):
    """With no choice and no ZIPAGE_FP8_DECODE, 8-bit pages of 256 tokens take this kernel's default
    (tensor-descriptor tiles on Hopper), with a window too."""
    from zipage.kernels.paged_decode_fp8 import default_choice

    monkeypatch.delenv("ZIPAGE_FP8_DECODE", raising=False)
    q = torch.zeros(1, 32, 128, device="cuda", dtype=torch.bfloat16)
    pool = torch.zeros(2, 256, 8, 128, device="cuda", dtype=codes)
    choice = default_choice(q, pool, pool)
    assert choice is not None and choice["convert"] == "fp16"
    # two warps only where they were timed: tensor-descriptor tiles over dimension-major values (the engine's pools)
    assert choice["load"] == "tma" and choice["num_warps"] == 4
    from zipage.kernels.fp8 import value_pool
    assert default_choice(q, pool, value_pool(tuple(pool.shape), codes, "cuda"))["num_warps"] == 2
    for window in (None, 300):
        _case(torch.bfloat16, {}, Hq=32, Hkv=8, D=128, page=256, lens=(3000, 1, 257, 2304), starts=[0, 0, 7, 100],
              poison=True, codes=codes, window=window)


def test_bad_load_is_named():
    from zipage.kernels.paged_decode_fp8 import tma_problem

    with pytest.raises(ValueError, match="load='bulk'"):
        _case(torch.float16, dict(convert="fp16", block_n=16, load="bulk"))
    with pytest.raises(ValueError, match="page_size 8 is not a multiple of block_n 16"):
        _case(torch.float16, dict(convert="fp16", block_n=16, load="page"), page=8)
    if not CUDA:
        assert "compute capability" in tma_problem(torch.zeros(1, 8, 1, 16), torch.zeros(1, 8, 1, 16))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("convert", ["bf16", "fp16", "bits", "fp8mma"])
def test_qwen3_shapes_on_the_gpu(convert):
    """The benchmark's shapes: GQA 32/8, head dim 128, 256-token pages, 128-token tiles, several splits."""
    _case(torch.bfloat16, dict(convert=convert, head_fast=1, block_n=128, num_stages=3), Hq=32, Hkv=8, D=128,
          page=256, lens=(3000, 1, 257, 2304), starts=[0, 0, 7, 100])


def test_choice_from_the_environment(monkeypatch):
    monkeypatch.setenv("ZIPAGE_FP8_DECODE", "convert=fp16, head_fast=1,block_n=128,num_stages=3")
    assert fp8_decode_choice() == dict(convert="fp16", head_fast=1, block_n=128, num_stages=3)
    monkeypatch.setenv("ZIPAGE_FP8_DECODE", "convert=fp16,load=tma,int8_ptx=0")  # INT8 codes per element
    assert fp8_decode_choice() == dict(convert="fp16", load="tma", int8_ptx=0)
    monkeypatch.setenv("ZIPAGE_FP8_DECODE", "convert=fp16,load=tma,v_edge=bytes,maxnreg=128")  # rows zeroed, a cap
    assert fp8_decode_choice() == dict(convert="fp16", load="tma", v_edge="bytes", maxnreg=128)
    monkeypatch.setenv("ZIPAGE_FP8_DECODE", "")
    assert fp8_decode_choice() is None
    monkeypatch.setenv("ZIPAGE_FP8_DECODE", "convert=fp16,tiles=4")
    with pytest.raises(ValueError, match="unknown key 'tiles'"):
        fp8_decode_choice()
    monkeypatch.setenv("ZIPAGE_FP8_DECODE", "convert=fp16,block_n=big")
    with pytest.raises(ValueError, match="block_n='big' must be a whole number"):
        fp8_decode_choice()


@requires_triton
def test_bad_convert_is_named():
    with pytest.raises(ValueError, match="convert='fp4'"):
        _case(torch.float16, dict(convert="fp4", block_n=16))
    with pytest.raises(ValueError, match="block_n >= 32"):
        _case(torch.float16, dict(convert="fp8mma", block_n=16))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("load", ["gather", "tma"])
def test_int8_codes_on_packed_registers_match_the_per_element_form(load):
    """INT8 codes become fp16 four at a time in PTX (``int8_ptx``, the default on a GPU): the same fp16
    operands as the per-element form, so the same output bit for bit, over every code (-128..127)."""
    torch.manual_seed(0)
    B, Hq, Hkv, D, page = 3, 32, 8, 128, 256
    lens = torch.tensor([700, 256, 1], dtype=torch.int32, device="cuda")
    P = 3 * 3
    k = torch.randint(-128, 128, (P, page, Hkv, D), dtype=torch.int8, device="cuda")
    v = torch.randint(-128, 128, (P, page, Hkv, D), dtype=torch.int8, device="cuda")
    k[0, 0, 0] = torch.arange(-128, 0, dtype=torch.int8)
    v[0, 0, 0] = torch.arange(0, 128, dtype=torch.int8)
    ks = torch.rand(P, page, Hkv, device="cuda") * 0.02 + 0.001
    vs = torch.rand(P, page, Hkv, device="cuda") * 0.02 + 0.001
    table = torch.randperm(P, device="cuda", dtype=torch.int32).view(B, 3)
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    outs = []
    for ptx in (True, False):
        choice = dict(convert="fp16", head_fast=1, load=load, block_n=128, num_stages=3, int8_ptx=ptx)
        outs.append(paged_decode_attention_triton(q, k, v, table, lens, D**-0.5, k_scale=ks, v_scale=vs,
                                                  fp8_kernel=choice))
    assert torch.equal(outs[0], outs[1])
    ref = paged_decode_attention_reference(q.float(), k, v, table, lens, D**-0.5, None, ks, vs)
    assert rel_err(outs[0], ref) < TOL[torch.bfloat16]


@requires_triton
@pytest.mark.skipif(CUDA, reason="compiles for sm_90 without a GPU (a GPU runs the kernels themselves)")
def test_8bit_decode_kernel_compiles_for_hopper_without_a_gpu():
    """The interpreter never reads the PTX the INT8 conversion writes by hand, nor builds tensor-descriptor
    tiles: benchmarks/decode_compile.py compiles the engine's default launch for sm_90 here (ptxas included)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_compile.py"
    engine = "fp16/tma/128/2/3/plain/vdim"  # (default_choice on the engine's pools: two warps, stale rows plain)
    r = subprocess.run([sys.executable, str(script), "--launches", f"fp16/tma/128/4/3,{engine}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {(line.split()[0], line.split()[1]): line.split() for line in r.stdout.splitlines()
            if line.startswith("fp16/tma")}
    assert set(rows) == {(launch, codes) for launch in ("fp16/tma/128/4/3", engine)
                         for codes in ("fp8", "int8")}, r.stdout
    for (launch, _), row in rows.items():
        assert int(row[5]) > 0 and int(row[6]) >= 1, r.stdout  # shared memory, and at least one tile buffer
        if launch == engine:  # no register spilled, no 16-bit round trip, no byte loads for the values
            assert int(row[4]) == 0 and row[7] == "no" and int(row[8]) == 0, r.stdout
    bad = subprocess.run([sys.executable, str(script), "--launches", "fp16/tma/128"], capture_output=True, text=True)
    assert bad.returncode == 2 and "convert/load/block_n/warps/stages" in bad.stderr


@requires_triton
def test_fp8_value_codes_read_nan_as_finite():
    """``v_edge="none"`` on FP8 pages: the value codes' conversion reads e4m3's two NaN codes (0x7F, 0xFF) as
    +-448 and every other code exactly (interpreter: the per-element form; GPU: the PTX form too)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(DEVICE)
    want = codes.float()
    want[127], want[255] = 448.0, -448.0
    assert torch.isnan(codes.float()[[127, 255]]).all() and torch.isfinite(want).all()
    for ptx in (False, True) if CUDA else (False,):
        out = torch.empty(256, dtype=torch.float16, device=DEVICE)
        _finite_convert[(1,)](codes, out, PTX=ptx)
        assert torch.equal(out.float(), want), ptx


def test_bad_v_edge_is_named():
    from zipage.kernels.paged_decode_fp8 import launch_decode_split_fp8

    q = torch.zeros(1, 2, 16, dtype=torch.float16)
    pool = torch.zeros(1, 16, 1, 16, dtype=torch.float8_e4m3fn)
    s = torch.ones(1, 16, 1)
    args = (q, pool, pool, s, s, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
            torch.zeros(1, dtype=torch.int32), None, None, 1.0)
    with pytest.raises(ValueError, match="v_edge='zero' is invalid"):
        launch_decode_split_fp8(*args, num_splits=1, block_n=16, convert="fp16", v_edge="zero")
    with pytest.raises(ValueError, match="needs convert='fp16'"):
        launch_decode_split_fp8(*args, num_splits=1, block_n=16, convert="bits", v_edge="none")


def test_default_v_edge_follows_the_value_layout():
    """With no ``v_edge``, stale value rows are left in place and converted as any other only where that is exact
    and measured fastest: dimension-major values (the engine's own pools, which hold no NaN code) through tensor
    descriptors, INT8 codes or FP8 with fp16 dots."""
    from zipage.kernels.fp8 import value_pool
    from zipage.kernels.paged_decode_fp8 import default_v_edge

    for codes in (torch.float8_e4m3fn, torch.int8):
        k = torch.zeros(2, 16, 1, 16, dtype=codes)
        v_dm, v_tm = value_pool(tuple(k.shape), codes, "cpu"), torch.zeros_like(k)
        assert default_v_edge("tma", "fp16", k, v_dm) == "plain"
        assert default_v_edge("tma", "fp16", k, v_tm) == "bytes"
        assert default_v_edge("page", "fp16", k, v_dm) == "bytes"  # (only tensor-descriptor tiles read v_edge)
    k8 = torch.zeros(2, 16, 1, 16, dtype=torch.float8_e4m3fn)
    assert default_v_edge("tma", "bits", k8, value_pool(tuple(k8.shape), k8.dtype, "cpu")) == "bytes"
