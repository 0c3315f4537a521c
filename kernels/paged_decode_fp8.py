"""Decode attention over 8-bit pages (FP8 or INT8 codes), tuned apart from the bf16 kernel.

The general split kernel (``paged_attention._decode_split_kernel``) reads FP8 codes the way it
reads bf16 ones and converts each tile with Triton's e4m3 -> bf16 cast. On the H200 that path
moved only 0.35-0.47 of the copy bandwidth (bf16: 1.0), so FP8 pages read half the bytes and
still decoded slower. This kernel keeps the same split-K structure and the same results (the
same reference, ``paged_decode_attention_reference``) and exposes the choices that decide its
speed, so ``benchmarks/fp8_decode_tune.py`` can time them side by side:

* ``convert``: how codes become dot operands.
  ``"bf16"``: Triton's cast (e4m3 -> f16 -> bf16). ``"fp16"``: the codes become fp16 (one
  hardware conversion per pair of codes; e4m3 is exact in fp16) and the queries are cast to fp16
  once per program, so both dots run on fp16 tensor cores (a bf16 query element beyond fp16's range,
  65,504, would become inf there and its head's output NaN; no model measured comes near it, and
  scaling each head's query first would cost a multiply per logit in the loop, not measured yet). ``"bits"``: the code's bits are moved
  into a bf16's (sign to the top bit, exponent and mantissa shifted by 4): that bf16 is exactly
  the code times 2^-120 (e4m3's subnormals land on bf16 subnormals), and 2^120 is folded into the
  scales: integer shifts instead of float conversions. ``"fp8mma"``: no key or value is
  converted at all; the dots run on FP8 tensor cores on the codes as stored, with the query (once
  per program) and the probabilities (per tile, 16 x ``block_n`` values instead of the tile's
  ``2 x block_n x D`` codes) each split into two e4m3 parts, ``hi + lo``, so together they keep
  about the 7-8 significant bits a bf16 operand has.
* ``head_fast``: the grid's fastest axis. The scales of one token sit together for all KV heads
  (``[num_pages, page_size, H_kv]``), so the programs of one sequence's heads read the same
  sectors; running them next to each other keeps those sectors in L2.
* ``load``: how a tile's codes are fetched. ``"gather"``: one page-table read and one 64-bit address
  per token and column (any page size). ``"page"``: the tile lies in one page (``page_size`` a
  multiple of ``block_n``), so one page-table read per tile and a scalar base plus fixed offsets.
  ``"tma"``: the same tile through a tensor descriptor (the Hopper copy engine; compute capability
  9.0 or newer, contiguous pools, a power-of-two head dim); rows outside the sequence's range are
  then other slots' bytes, which ``v_edge`` clears (below).
* ``v_edge`` (``load="tma"``): a partial tile's outside value rows zeroed as bytes before conversion
  (``"bytes"``), after it (``"operand"``), or left in place (``"none"``: their probabilities and value
  scales are 0, INT8 codes are all finite, and FP8 value codes are converted in PTX with e4m3's two NaN
  codes read as +-448, so no stale byte reaches the output; ``"plain"``: left in place and converted as any
  other, for pools that hold no NaN code, as the engine's: zeroed when made, and zipage's stores write a row with a
  NaN or an infinity as zero codes under a NaN scale, ``fp8.quantize_reference``). ``"plain"`` drops the
  NaN check's 5 integer operations per 4 value codes (934 -> 786 instructions in the compiled tile loop); on
  the H200 the engine's step at 490 requests ran its decode kernel in 325 us against 336 (``benchmarks/results/issue15/s42/``).
* Values stored dimension-major (``fp8.value_pool``: each page ``[H_kv, D, page]``, seen through strides as
  the usual ``[page, H_kv, D]``), detected from the pool's strides: tensor-descriptor tiles then read values
  as ``[D, block_n]``, already in the layout the value dot's operand needs (two consecutive tokens of one
  dimension per register). Token-major value tiles had to be converted and sent through shared memory again
  as 16-bit values (``bytes``, ``operand``) or loaded a byte at a time (``none``). With ``v_edge="none"``
  that was 18% faster on the H200 at 256 and 512 requests (512 x 2,176 tokens: 0.65 against 0.79 ms, 0.85
  of the copy bandwidth, FP8 and INT8 alike, ``benchmarks/results/issue15/s31/call1/``), and it is what the
  engine runs.
* ``block_n``, ``num_warps``, ``num_stages``: the tile and the launch.

Tried and removed: the key tile (and the value tile) as the dots' first operand, the logits computed
as ``k @ q^T`` (and the output as ``v^T @ p^T``) so the 128-token tile fills the tensor cores' M side
instead of a query group padded to 16 rows. On the H200 it was 7-15% slower than this kernel at 256
and 512 requests (512 x 2,176 tokens: 0.89-0.92 ms against 0.80 ms,
``benchmarks/results/issue15/s26/call1/``; the variant is commit de2706b).

Also tried and removed: each tile's page read from the page table one tile ahead (commit 16c3e73). Read in
the tile's own iteration, the page is a load feeding the tile copy's address, and Triton's pipeliner then
gives the tensor-descriptor tiles one buffer per pool at any ``num_stages`` (the compiled TTGIR of Triton 3.6
and 3.9); carried one tile ahead, ``num_stages=3`` got two. It was no faster on the H200 (512 requests:
0.808 ms both ways; more stages, one program per multiprocessor: 1.15 ms), since the copies' latency is
already hidden across the three programs a multiprocessor holds. Nsight Compute places the time in the
tile's chain of dependent work instead (``benchmarks/results/issue15/s30/``): ~830 instructions per warp
and tile at ~9 cycles each, waiting on shared memory (the value tile's fp16 copy, the row maxima across
warps, the probabilities moved to the second dot's layout), with 12 warps per multiprocessor (168
registers and 75 KB of shared memory a program).

INT8 pages take the ``"fp16"`` and ``"bf16"`` conversions (every int8 code is exact in both).
:func:`default_choice` is what the engine uses on a GPU: fp16 dots, heads side by side, 128-token
tiles through tensor descriptors where they apply (else from one page), two warps a program where the tiles
come through tensor descriptors and values are stored dimension-major (four until session 42: on the H200 two
were 3-9% faster at 490-512 requests, the engine's step 24.21 against 24.71 ms of device time with
``v_edge="plain"``, ``benchmarks/results/issue15/s42/``; the other launches keep four, which compiled for sm_90
spill no registers where two would); the launch leaves stale value rows in place when values are stored
dimension-major (``v_edge=None``: ``"plain"``, since such a pool is the engine's own, :func:`default_v_edge`),
whoever chose the rest. Token-major,
that moved 0.69 of the copy bandwidth on the H200
at 512 requests against 0.48 for the general kernel (``benchmarks/results/issue15/fp8_decode_tma.json``);
dimension-major, 0.85.
* The scale pools' layout is read from their strides, so a benchmark can time a head-major
  layout (``[num_pages, H_kv, page_size]`` viewed as ``[num_pages, page_size, H_kv]``: one head's
  scales contiguous along the page) against the pools' token-major one.

The values are scaled per tile so the probabilities fed to the value dot stay in [0, 1] (fp16
keeps its precision there): ``p * vs / max(vs)`` in the dot, ``max(vs)`` applied to its result.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, interpreting, next_pow2
from .fp8 import dim_major

if HAS_TRITON:
    import triton
    import triton.language as tl

    try:  # triton >= 3.4
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # pragma: no cover - older triton: load="tma" is refused
        TensorDescriptor = None

CONVERTS = ("bf16", "fp16", "bits", "fp8mma")
INT8_CONVERTS = ("bf16", "fp16")  # int8 codes are exact in both; "bits" and "fp8mma" are e4m3's
LOADS = ("gather", "page", "tma")
V_EDGES = ("bytes", "none", "operand", "plain")  # load="tma": how a partial tile's outside value rows are cleared
TWO_POW_120 = 2.0 ** 120  # "bits": a code's bf16 image is the code times 2^-120

if HAS_TRITON:

    @triton.jit
    def _split_setup(Q, LENS, STARTS, b, hk, split, stride_qb, stride_qh, G: tl.constexpr, BLOCK_G: tl.constexpr,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                     WINDOW: tl.constexpr):
        """A decode split program's key range ``lo .. hi`` (in whole ``BLOCK_N`` tiles from the first
        stored key, or from the window's first key) and its GQA group's queries ``[BLOCK_G, BLOCK_D]``;
        shared by the general split kernel and the FP8 one (``paged_decode_fp8.py``)."""
        seq_len = tl.load(LENS + b).to(tl.int32)
        start = tl.load(STARTS + b).to(tl.int32)
        if WINDOW > 0:  # a sliding window: only the last WINDOW keys (the splits cover just those)
            start = tl.maximum(start, seq_len - WINDOW)
        base = (start // BLOCK_N) * BLOCK_N
        n_blocks = tl.cdiv(seq_len - base, BLOCK_N)
        per_split = tl.cdiv(n_blocks, NUM_SPLITS)
        lo = base + split * per_split * BLOCK_N
        hi = tl.minimum(lo + per_split * BLOCK_N, seq_len)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        gmask = g < G
        dmask = d < D
        heads = hk * G + g
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)
        return start, lo, hi, heads, gmask, d, dmask, q

    @triton.jit
    def _int8_to_fp16_ptx(x):
        """INT8 codes -> fp16, four at a time: one XOR biases the four bytes (``c + 128``), two byte
        permutes set each beside 0x64 (the fp16 ``1024 + c + 128``) and two paired subtractions take
        1152 (0x6480) back off: 5 instructions per 4 codes, where the same steps written per element
        compile to ~12."""
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, c;
            xor.b32 t, $2, 0x80808080;
            prmt.b32 $0, t, 0x64646464, 0x4140;
            prmt.b32 $1, t, 0x64646464, 0x4342;
            mov.b32 c, 0x64806480;
            sub.f16x2 $0, $0, c;
            sub.f16x2 $1, $1, c;
            }""",
            constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=4)

    @triton.jit
    def _e4m3_finite_to_fp16_ptx(x):
        """e4m3 codes -> fp16, four at a time, the two NaN codes (0x7F, 0xFF) read as +-448: a code whose low
        7 bits are all ones loses its last bit (``((c & 0x7F) + 1) & 0x80`` marks it, shifted down to 1), then
        two paired conversions. A stale slot's bytes then give a finite value, which a zero probability clears."""
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, a;
            .reg .b16 lo, hi;
            and.b32 t, $2, 0x7F7F7F7F;
            add.u32 t, t, 0x01010101;
            and.b32 t, t, 0x80808080;
            shr.u32 t, t, 7;
            sub.u32 a, $2, t;
            mov.b32 {lo, hi}, a;
            cvt.rn.f16x2.e4m3x2 $0, lo;
            cvt.rn.f16x2.e4m3x2 $1, hi;
            }""",
            constraints="=r,=r,r", args=[x.to(tl.uint8, bitcast=True)], dtype=tl.float16, is_pure=True, pack=4)

    @triton.jit
    def _fp8_finite_operand(x, PTX: tl.constexpr):
        """e4m3 codes -> fp16 with the NaN codes read as +-448 (``_e4m3_finite_to_fp16_ptx``; the interpreter:
        the same steps per element)."""
        if PTX:
            return _e4m3_finite_to_fp16_ptx(x)
        u = x.to(tl.uint8, bitcast=True)
        u = u - ((((u & 0x7F) + 1) & 0x80) >> 7).to(tl.uint8)
        return u.to(tl.float8e4nv, bitcast=True).to(tl.float16)

    @triton.jit
    def _fp8_operand(x, CONVERT: tl.constexpr, INT8_CODES: tl.constexpr = False, PTX: tl.constexpr = False):
        """8-bit codes -> a dot operand: bf16 (exact), fp16 (exact) or bf16 bits (code * 2^-120).
        INT8 codes become fp16 without an integer-to-float conversion: ``c + 128`` in the low byte
        of fp16 1024 (bits 0x6400) is the fp16 ``1152 + c``, and subtracting 1152 is exact (``PTX``:
        the same steps on packed registers, compiled code only; the interpreter takes the per-element form)."""
        if CONVERT == 1:
            if INT8_CODES:
                if PTX:
                    return _int8_to_fp16_ptx(x)
                u = (x.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.uint16) | 0x6400
                return u.to(tl.float16, bitcast=True) - 1152.0
            return x.to(tl.float16)
        elif CONVERT == 2:
            u = x.to(tl.uint8, bitcast=True).to(tl.uint16)
            return (((u & 0x80) << 8) | ((u & 0x7F) << 4)).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(tl.bfloat16)

    @triton.jit
    def _decode_split_fp8_kernel(
        Q, K, V, KS, VS, KD, VD, PT, LENS, STARTS, MID_O, MID_LSE,
        scale_log2, code_scale,
        stride_qb, stride_qh,
        stride_kp, stride_kt, stride_kh,
        stride_vp, stride_vt, stride_vh, stride_vd,
        stride_sp, stride_st, stride_sh,
        stride_ptb,
        stride_ob, stride_oh, stride_os,
        B, HKV: tl.constexpr, HQ: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
        BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
        CONVERT: tl.constexpr, HEAD_FAST: tl.constexpr, LOAD: tl.constexpr = 0, INT8_CODES: tl.constexpr = False,
        WINDOW: tl.constexpr = 0,
        SOFTCAP_LOG2: tl.constexpr = 0.0, INT8_PTX: tl.constexpr = False, V_EDGE: tl.constexpr = 0,
        V_DIM_MAJOR: tl.constexpr = False, FP8_PTX: tl.constexpr = False,
    ):
        if HEAD_FAST:  # the KV heads of one (sequence, split) side by side: they share the scale sectors
            hk = tl.program_id(0)
            b = tl.program_id(1)
        else:
            b = tl.program_id(0)
            hk = tl.program_id(1)
        split = tl.program_id(2)
        start, lo, hi, heads, gmask, d, dmask, q = _split_setup(
            Q, LENS, STARTS, b, hk, split, stride_qb, stride_qh, G, BLOCK_G, D, BLOCK_D, BLOCK_N, NUM_SPLITS, WINDOW)
        if CONVERT == 3:  # the query as two e4m3 parts (hi + lo), each with a per-head scale
            qf = q.to(tl.float32)
            sq_hi = tl.maximum(tl.max(tl.abs(qf), 1) / 448.0, 1e-30)
            q_hi = (qf / sq_hi[:, None]).to(tl.float8e4nv)
            rest = qf - q_hi.to(tl.float32) * sq_hi[:, None]
            sq_lo = tl.maximum(tl.max(tl.abs(rest), 1) / 448.0, 1e-30)
            q_lo = (rest / sq_lo[:, None]).to(tl.float8e4nv)
        if CONVERT == 1:
            q = q.to(tl.float16)
        else:
            q = q.to(tl.bfloat16)
        op_dtype = q.dtype

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        for t0 in range(lo, hi, BLOCK_N):
            t = t0 + offs_n
            in_range = t < hi
            valid = in_range & (t >= start)
            m2 = valid[:, None] & dmask[None, :]
            if LOAD == 2:  # the tile is rows page * PAGE + slot0.. of the pool seen as [slots, H_kv * D]
                page1 = tl.load(PT + b * stride_ptb + t0 // PAGE).to(tl.int32)  # (descriptor coordinates: 32-bit)
                row = page1 * PAGE + t0 % PAGE
                k = KD.load([row, hk * D])
                if V_DIM_MAJOR:  # values stored [pages, H_kv, D, PAGE]: the tile read as [D, BLOCK_N]
                    v = tl.trans(VD.load([(page1 * HKV + hk) * D, t0 % PAGE]))
                else:
                    v = VD.load([row, hk * D])
                if V_EDGE == 0:
                    if (t0 < start) | (t0 + BLOCK_N > hi):  # rows outside [start, hi) hold other slots' bytes
                        vb = v.to(tl.uint8, bitcast=True)
                        v = tl.where(valid[:, None], vb, tl.zeros_like(vb)).to(v.dtype, bitcast=True)
                s_off = page1.to(tl.int64) * stride_sp + (t0 % PAGE + offs_n) * stride_st + hk * stride_sh
            elif LOAD == 1:  # the tile in one page: one page-table read, a scalar base and fixed offsets
                page1 = tl.load(PT + b * stride_ptb + t0 // PAGE).to(tl.int64)
                slot0 = t0 % PAGE
                rows = offs_n[:, None]
                k = tl.load(K + (page1 * stride_kp + slot0 * stride_kt + hk * stride_kh) + rows * stride_kt
                            + d[None, :], mask=m2, other=0.0)
                v = tl.load(V + (page1 * stride_vp + slot0 * stride_vt + hk * stride_vh) + rows * stride_vt
                            + d[None, :] * stride_vd, mask=m2, other=0.0)
                s_off = page1 * stride_sp + (slot0 + offs_n) * stride_st + hk * stride_sh
            else:
                page = tl.load(PT + b * stride_ptb + t // PAGE, mask=in_range, other=0).to(tl.int64)
                slot = t % PAGE
                k = tl.load(K + page[:, None] * stride_kp + slot[:, None] * stride_kt + hk * stride_kh
                            + d[None, :], mask=m2, other=0.0)
                v = tl.load(V + page[:, None] * stride_vp + slot[:, None] * stride_vt + hk * stride_vh
                            + d[None, :] * stride_vd, mask=m2, other=0.0)
                s_off = page * stride_sp + slot * stride_st + hk * stride_sh
            ks = tl.load(KS + s_off, mask=valid, other=0.0) * code_scale
            vs = tl.load(VS + s_off, mask=valid, other=0.0) * code_scale

            if CONVERT == 3:  # FP8 tensor cores on the codes as stored: nothing converted per key
                kt = tl.trans(k)
                qk = tl.dot(q_hi, kt) * sq_hi[:, None] + tl.dot(q_lo, kt) * sq_lo[:, None]
                qk = qk * (ks[None, :] * scale_log2)
            else:
                qk = tl.dot(q, tl.trans(_fp8_operand(k, CONVERT, INT8_CODES, INT8_PTX))) * (ks[None, :] * scale_log2)
            if SOFTCAP_LOG2 > 0:
                qk = SOFTCAP_LOG2 * (1.0 - 2.0 / (tl.math.exp(2.0 * qk / SOFTCAP_LOG2) + 1.0))
            qk = tl.where(valid[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            vs_max = tl.maximum(tl.max(vs, 0), 1e-30)  # p * vs / vs_max stays in [0, 1]
            if CONVERT == 3:  # p * vs / vs_max in [0, 1], times 256, as two e4m3 parts (lo: the rest x 8)
                pw = p * (vs * (256.0 / vs_max))[None, :]
                p_hi = pw.to(tl.float8e4nv)
                p_lo = ((pw - p_hi.to(tl.float32)) * 8.0).to(tl.float8e4nv)  # (|rest| <= one ulp of hi: <= 32)
                pv = (tl.dot(p_hi, v) + tl.dot(p_lo, v) * 0.125) * (1.0 / 256.0)
            else:
                if V_EDGE == 1 and not INT8_CODES:  # stale rows left in place: their NaN codes read as finite
                    vop = _fp8_finite_operand(v, FP8_PTX)
                else:
                    vop = _fp8_operand(v, CONVERT, INT8_CODES, INT8_PTX)
                if LOAD == 2 and V_EDGE == 2:  # the edge tile's outside rows zeroed after conversion
                    if (t0 < start) | (t0 + BLOCK_N > hi):
                        vop = tl.where(valid[:, None], vop, tl.zeros_like(vop))
                pv = tl.dot((p * (vs / vs_max)[None, :]).to(op_dtype), vop)
            acc = acc * alpha[:, None] + pv * vs_max
            m_i = m_new

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        o_ptr = MID_O + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
        tl.store(o_ptr, out.to(MID_O.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])  # (one split: the output)
        tl.store(MID_LSE + (b * HQ + heads) * NUM_SPLITS + split, lse, mask=gmask)


def launch_decode_split_fp8(q, k_cache, v_cache, k_scale, v_scale, page_table, kv_lens, kv_starts, mid_o, mid_lse,
                            scale_log2: float, *, num_splits: int, block_n: int, convert: str = "bf16",
                            head_fast: bool = False, load: str = "gather", window: int = 0,
                            softcap_log2: float = 0.0, num_warps: int = 4, num_stages: int = 2,
                            int8_ptx: bool = True, v_edge: str | None = None, maxnreg: int | None = None) -> None:
    """The split pass over FP8 pages into ``mid_o`` / ``mid_lse`` (``paged_attention``'s merge kernel
    finishes it). ``q`` is bf16 or fp16 (float32 queries take the general kernel's exact path).
    ``int8_ptx``: INT8 codes to fp16 four at a time in PTX (compiled launches; the interpreter and
    ``int8_ptx=False`` use the per-element form, which gives the same operands).

    ``v_edge`` (``load="tma"``, whose partial tiles hold rows of other slots; None: :func:`default_v_edge`):
    ``"bytes"`` zeroes those rows' codes before conversion; ``"operand"`` zeroes them after conversion; ``"none"``
    leaves them: their probabilities and value scales are 0, every INT8 code is finite, and FP8 value codes are
    converted with e4m3's two NaN codes read as +-448 (``convert="fp16"`` only), so a stale slot's bytes never
    reach the output; ``"plain"`` leaves them and converts them as any other code, exact only where the pools
    hold no NaN code (the engine's: zeroed when made, and zipage's stores never write one); a NaN code in a stale
    row would make the output NaN.

    ``maxnreg``: a register cap per thread for the compiled kernel (more programs per multiprocessor, possibly
    spilling); the interpreter ignores it."""
    if convert not in CONVERTS:
        raise ValueError(f"convert={convert!r} is invalid: expected one of {CONVERTS}")
    if k_cache.dtype == torch.int8 and convert not in INT8_CONVERTS:
        raise ValueError(f"convert={convert!r} reads e4m3 codes; INT8 pages take {INT8_CONVERTS}")
    if load not in LOADS:
        raise ValueError(f"load={load!r} is invalid: expected one of {LOADS}")
    if v_edge is None:
        v_edge = default_v_edge(load, convert, k_cache, v_cache)
    if v_edge not in V_EDGES:
        raise ValueError(f"v_edge={v_edge!r} is invalid: expected one of {V_EDGES}")
    if v_edge == "none" and k_cache.dtype != torch.int8 and convert != "fp16":
        raise ValueError(f"v_edge='none' on FP8 pages needs convert='fp16' (its value codes read NaN as finite), "
                         f"got convert={convert!r}")
    page_size = k_cache.shape[1]
    if load != "gather" and page_size % block_n:
        raise ValueError(f"load={load!r} needs whole tiles in a page: page_size {page_size} is not a multiple of "
                         f"block_n {block_n}")
    if load == "tma":
        problem = tma_problem(k_cache, v_cache)
        if problem:
            raise ValueError(f"load='tma': {problem}")
    if k_scale.stride() != v_scale.stride():
        raise ValueError("the FP8 decode kernel needs k_scale and v_scale in one layout")
    if convert == "fp8mma" and block_n < 32:
        raise ValueError(f"convert='fp8mma' needs block_n >= 32 (FP8 dots take K >= 32), got block_n={block_n}")
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the FP8 decode kernel takes bf16 or fp16 queries, got {q.dtype}")
    B, Hq, D = q.shape
    Hkv, page = k_cache.shape[2], k_cache.shape[1]
    G = Hq // Hkv
    grid = (Hkv, B, num_splits) if head_fast else (B, Hkv, num_splits)
    kd = vd = k_cache
    v_dim_major = dim_major(v_cache)
    if load == "tma":
        kd = TensorDescriptor.from_tensor(k_cache.view(-1, Hkv * D), [block_n, D])
        vd = (TensorDescriptor.from_tensor(v_cache.permute(0, 2, 3, 1).view(-1, page), [D, block_n]) if v_dim_major
              else TensorDescriptor.from_tensor(v_cache.view(-1, Hkv * D), [block_n, D]))
    _decode_split_fp8_kernel[grid](
        q, k_cache, v_cache, k_scale, v_scale, kd, vd, page_table, kv_lens, kv_starts, mid_o, mid_lse,
        scale_log2, TWO_POW_120 if convert == "bits" else 1.0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
        page_table.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        B, HKV=Hkv, HQ=Hq, G=G, BLOCK_G=max(16, next_pow2(G)), D=D, BLOCK_D=next_pow2(D), PAGE=page,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, CONVERT=CONVERTS.index(convert), HEAD_FAST=bool(head_fast),
        LOAD=LOADS.index(load), INT8_CODES=k_cache.dtype == torch.int8, WINDOW=int(window),
        SOFTCAP_LOG2=float(softcap_log2), INT8_PTX=int8_ptx and k_cache.dtype == torch.int8 and not interpreting(),
        V_EDGE=V_EDGES.index(v_edge), V_DIM_MAJOR=load == "tma" and v_dim_major,
        FP8_PTX=k_cache.dtype != torch.int8 and not interpreting(),
        num_warps=num_warps, num_stages=num_stages,
        **({"maxnreg": int(maxnreg)} if maxnreg and not interpreting() else {}),
    )


def default_v_edge(load: str, convert: str, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str:
    """The launch's ``v_edge`` when none is given: the measured-fastest exact choice for the pools' layout,
    ``"plain"`` for dimension-major values through tensor descriptors (INT8 codes, or FP8 with fp16 dots: what
    was timed), ``"bytes"`` otherwise. A dimension-major value pool is the engine's own layout
    (``fp8.value_pool``: zeroed when made; zipage's stores write no NaN code and compaction moves stored codes),
    so its stale rows hold finite codes. A pool of other origin whose free
    slots may hold NaN codes takes ``v_edge="none"`` (FP8 with fp16 dots) or ``"bytes"``."""
    leave = load == "tma" and dim_major(v_cache) and (k_cache.dtype == torch.int8 or convert == "fp16")
    return "plain" if leave else "bytes"


def tma_problem(k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    """Why tensor-descriptor tiles cannot read these pools, or None when they can."""
    D = k_cache.shape[-1]
    if not HAS_TRITON or TensorDescriptor is None:
        return "this Triton has no tensor descriptors"
    if not k_cache.is_cuda or torch.cuda.get_device_capability(k_cache.device)[0] < 9:
        return "tensor descriptors need a GPU of compute capability 9.0 or newer"
    if D != next_pow2(D) or D < 16:
        return f"head dim {D} is not a power of two >= 16"
    if not (k_cache.is_contiguous() and (v_cache.is_contiguous() or dim_major(v_cache))):
        return "the pools must be contiguous (values: or dimension-major, fp8.value_pool)"
    return None


DEFAULT_BLOCK_N = 128


def default_choice(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> dict | None:
    """This kernel's launch for 8-bit pages on a GPU, or None where the general kernel should read
    them (CPU, float32 queries, pages that do not hold whole 128-token tiles)."""
    if not (HAS_TRITON and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)):
        return None
    if k_cache.shape[1] % DEFAULT_BLOCK_N:
        return None
    load = "tma" if tma_problem(k_cache, v_cache) is None else "page"
    # two warps where they were timed (tensor-descriptor tiles, values dimension-major: the engine's pools on Hopper);
    # compiled for sm_90 the other launches spill registers with two (per-page loads: 560 bytes against 24)
    warps = 2 if load == "tma" and dim_major(v_cache) else 4
    return dict(convert="fp16", head_fast=1, load=load, block_n=DEFAULT_BLOCK_N, num_warps=warps, num_stages=3)
