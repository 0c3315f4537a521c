"""Slot addressing, KV store and KV gather on a paged pool.

A pool tensor has shape ``[num_pages, page_size, H, ...]``. Token ``j`` of a
sequence whose page table is ``table`` lives in flat slot
``table[j // page_size] * page_size + j % page_size``.

An FP8 pool (``kernels/fp8.py``) comes with a scale pool ``[num_pages, page_size, H]``: the store
quantizes each new token and head and writes its codes and its scale in the same kernel.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from ._triton import HAS_TRITON, interpreting, next_pow2, use_triton
from .fp8 import (ERROR_BITS, INT8, WEIGHT_BITS, WEIGHTED_ERROR_BITS, WEIGHTED_WEIGHT_BITS, check_scales, check_weights,
                  dim_major, quantize_reference, scale_steps, scale_steps_table)

if HAS_TRITON:
    import triton
    import triton.language as tl


class StoreLaunch(NamedTuple):
    """How the quantizing store is launched (``ZIPAGE_STORE_LAUNCH``, for measuring): ``heads`` KV heads a
    program (0: as many as fit 2,048 elements, every head of a token at Qwen3-8B's shapes), ``split`` keys and
    values in programs of their own (else one program stores both, one after the other), ``warps`` a program.
    The default, two heads with keys and values apart in two warps, was the fastest of seven launches for the
    engine's FP8 case on an H200 at 490 requests (``benchmarks/store_bench.py``: 38.2 us a layer against 40.3 for
    the earlier default, a token's heads in one program of 4 warps, ``heads=0,split=0,warps=4``); in the engine the
    store kernel took 40.9 against 45.5 us a layer, while an 8,192-token prompt's store took 294 against 277 us
    (``benchmarks/results/issue15/s41/``)."""

    heads: int = 2
    split: bool = True
    warps: int = 2


_launch: StoreLaunch | None = None  # (read once: every store call asks, and an environment lookup is not free)


def store_launch() -> StoreLaunch:
    """The store's launch from ``ZIPAGE_STORE_LAUNCH`` (``heads=N,split=0|1,warps=N``; unset: the default), read
    at the first store of the process; :func:`set_store_launch` changes it later (benchmarks, tests)."""
    global _launch
    if _launch is None:
        _launch = _parse_launch(os.environ.get("ZIPAGE_STORE_LAUNCH", "").strip())
    return _launch


def set_store_launch(raw: str | None) -> StoreLaunch:
    """Launch the store as ``raw`` says (``ZIPAGE_STORE_LAUNCH``'s form; None: read the variable again)."""
    global _launch
    _launch = None if raw is None else _parse_launch(raw.strip())
    return store_launch()


@functools.lru_cache(maxsize=None)
def _parse_launch(raw: str) -> StoreLaunch:
    launch = StoreLaunch()
    for part in filter(None, (x.strip() for x in raw.split(","))):
        key, _, value = part.partition("=")
        if key not in StoreLaunch._fields:
            raise ValueError(f"ZIPAGE_STORE_LAUNCH: unknown key {key!r} (heads, split, warps)")
        if not value.isdigit():
            raise ValueError(f"ZIPAGE_STORE_LAUNCH: {key}={value!r} must be a whole number")
        number = int(value)
        if (key == "split" and number not in (0, 1)) or (key == "warps" and number not in (1, 2, 4, 8)) or (
                key == "heads" and number & (number - 1)):
            raise ValueError(f"ZIPAGE_STORE_LAUNCH: {key}={value} is invalid (heads: 0 or a power of two; split: 0 "
                             "or 1; warps: 1, 2, 4 or 8)")
        launch = launch._replace(**{key: bool(number) if key == "split" else number})
    return launch


def slot_indices(page_table: torch.Tensor, start: int, end: int, page_size: int) -> torch.Tensor:
    """Flat slot ids of token positions ``start..end-1`` for each row of ``page_table`` ([B, P]) -> [B, end-start]."""
    pos = torch.arange(start, end, device=page_table.device)
    pages = page_table[:, pos // page_size]
    return pages * page_size + (pos % page_size)


def _flat(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(cache.shape[0] * cache.shape[1], *cache.shape[2:])


def read_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``cache``'s tokens at flat ``slots`` (``[..., H, ...]`` per slot), for any pool layout: a flat view
    where the pool has one (token-major), pages and slots indexed apart where it has not (dimension-major
    values, ``kernels/fp8.py``'s ``value_pool``)."""
    if dim_major(cache):
        page = cache.shape[1]
        return cache[slots // page, slots % page]
    return _flat(cache)[slots]


def write_slots(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """``cache``'s tokens at flat ``slots`` set to ``values``, in place, for any pool layout."""
    if dim_major(cache):
        page = cache.shape[1]
        cache[slots // page, slots % page] = values
    else:
        _flat(cache)[slots] = values


def store_kv_reference(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor,
                       scale: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> None:
    """Write ``values`` (``[..., H, ...]`` with leading dims matching ``slots``) into ``cache`` at ``slots``;
    into an FP8 ``cache``, their codes, and their per-token, per-head scales into ``scale`` (``weights``: the
    query weights of the scale search, ``fp8.query_weights``)."""
    check_scales("store_kv", cache, scale)
    if slots.device.type == "cpu" and slots.numel() and int(slots.min()) < 0:  # (-1 would wrap to the last slot)
        raise IndexError(f"store_kv: slot {int(slots.min())} is negative")
    if scale is None:
        write_slots(cache, slots, values.to(cache.dtype))
        return
    codes, s = quantize_reference(values, cache.dtype, weights)
    write_slots(cache, slots, codes)
    _flat(scale)[slots] = s


def gather_kv_reference(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Read the tokens at ``slots`` ([B, S]) -> [B, S, H, ...]."""
    return read_slots(cache, slots)


if HAS_TRITON:

    @triton.jit
    def _store_kernel(
        DST_A, SRC_A, DST_B, SRC_B, SLOTS,
        stride_src_a, stride_src_b,
        ROW: tl.constexpr, BLOCK: tl.constexpr, HAS_B: tl.constexpr,
    ):
        n = tl.program_id(0)
        blk = tl.program_id(1)
        slot = tl.load(SLOTS + n).to(tl.int64)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        m = offs < ROW
        a = tl.load(SRC_A + n * stride_src_a + offs, mask=m)
        tl.store(DST_A + slot * ROW + offs, a.to(DST_A.dtype.element_ty), mask=m)
        if HAS_B:
            b = tl.load(SRC_B + n * stride_src_b + offs, mask=m)
            tl.store(DST_B + slot * ROW + offs, b.to(DST_B.dtype.element_ty), mask=m)

    @triton.jit
    def _round_to_e4m3(x):
        """``x`` (float32) rounded to the nearest e4m3 value, so that the cast after it is exact.
        Only under the interpreter, whose float32 -> fp8 cast drops the carry into the exponent
        (127.6 becomes 64, checked with triton 3.9); compiled kernels cast directly."""
        e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        ulp = ((tl.maximum(e, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)  # e4m3: 3 mantissa bits
        y = tl.abs(x) / ulp  # exact (a power of two)
        r = tl.floor(y + 0.5)
        r = tl.where((r - y == 0.5) & (r - 2.0 * tl.floor(r / 2.0) != 0.0), r - 1.0, r)  # ties to even
        neg = x.to(tl.int32, bitcast=True) < 0  # the sign bit: -0.0 and negatives that round to 0 stay negative
        return tl.where(neg, -r * ulp, r * ulp)

    @triton.jit
    def _e4m3_value(c, ROUND_FIRST: tl.constexpr):
        """``c`` (float32, within +-448) rounded to e4m3, kept in float32."""
        if ROUND_FIRST:
            return _round_to_e4m3(c)
        return c.to(tl.float8e4nv).to(tl.float32)

    @triton.jit
    def _candidate_error(q, c, weight, qu, qv, HAS_QW: tl.constexpr, ERROR_UNIT: tl.constexpr,
                         QW_UNIT: tl.constexpr, QW_SHIFT: tl.constexpr):
        """One candidate scale's error per head, in int64 as ``fp8._search`` counts it: ``sum(e^2)``, or with
        query weights ``sum(v e^2) + (sum(u e))^2`` in coarser units; times the candidate's weight. (The
        weighted terms ``u e``, ``v e^2`` and ``sum(u e)`` fit int32, fp8.py's bounds; only their sums and the
        square need int64.)"""
        if HAS_QW:
            e = ((q - c) * QW_UNIT).to(tl.int32)  # q - c is exact; then truncated
            r = tl.sum(qu * e, 1).to(tl.int64)
            return (tl.sum((qv * e * e).to(tl.int64), 1) + r * r) * (weight >> QW_SHIFT)
        e = ((q - c) * ERROR_UNIT).to(tl.int32).to(tl.int64)
        return tl.sum(e * e, 1) * weight

    @triton.jit
    def _quantize_rows(DST, SCALE, SRC, stride_h, slot, h, d, dst_p, dst_t, dst_h, dst_d, MULT, WEIGHT, RECIP, QW,
                       PAGE: tl.constexpr, H: tl.constexpr, D: tl.constexpr, ROUND_FIRST: tl.constexpr,
                       INT8: tl.constexpr, STEPS: tl.constexpr, ERROR_UNIT: tl.constexpr, HAS_QW: tl.constexpr,
                       QW_UNIT: tl.constexpr, QW_SHIFT: tl.constexpr):
        """Heads ``h`` of one token: scale = max|x| / 448 per head (INT8: / 127), codes = x / scale
        (INT8: rounded to the nearest integer, halves away from zero), both stored. FP8 with ``STEPS > 1``:
        the scale is the one of ``max|x| / 448 * MULT[i]`` (its codes ``(x / (max|x| / 448)) * RECIP[i]``)
        whose codes have the least squared error (with
        ``HAS_QW``, the least error weighted by the queries' moments ``QW`` ``[2, H, D]``), counted exactly
        in integers as ``fp8.quantize_reference`` counts it (so both pick the same)."""
        hmask = h < H
        m = hmask[:, None] & (d[None, :] < D)
        x = tl.load(SRC + h[:, None] * stride_h + d[None, :], mask=m, other=0.0).to(tl.float32)
        top = 127.0 if INT8 else 448.0  # INT8_MAX, FP8_MAX
        # IEEE divisions (``/`` compiles to an approximate one), so codes and scales match the reference
        amax = tl.max(tl.abs(x), 1)
        s = tl.maximum(tl.math.div_rn(amax, tl.full(amax.shape, top, tl.float32)), 1e-12)  # MIN_SCALE
        # a NaN or an infinity: the row reads back as NaN, as the reference's does, through a NaN scale over zero
        # codes (the max and the clamps below would drop a NaN and store the rest as finite codes under a finite
        # scale); no NaN code ever reaches a pool, so kernels may read a stale slot's codes (fp8.quantize_reference)
        bad = tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), 1) > 0
        if INT8 or STEPS == 1:
            c = tl.minimum(tl.maximum(tl.math.div_rn(x, s[:, None] + tl.zeros_like(x)), -top), top)
            if INT8:
                c = tl.where(c < 0, -tl.floor(0.5 - c), tl.floor(c + 0.5))
            elif ROUND_FIRST:
                c = _round_to_e4m3(c)
            s = tl.where(bad, float("nan"), s)
            c = tl.where(bad[:, None], 0.0, c)
        else:
            base = s
            c0 = tl.minimum(tl.maximum(tl.math.div_rn(x, base[:, None] + tl.zeros_like(x)), -top), top)
            c = c0
            q = _e4m3_value(c, ROUND_FIRST)
            qu = None
            qv = None
            if HAS_QW:
                w = h[:, None] * D + d[None, :]
                qu = tl.load(QW + w, mask=m, other=0).to(tl.int32)
                qv = tl.load(QW + H * D + w, mask=m, other=0).to(tl.int32)
            best_err = _candidate_error(q, c, tl.load(WEIGHT), qu, qv, HAS_QW, ERROR_UNIT, QW_UNIT, QW_SHIFT)
            for i in tl.static_range(1, STEPS):
                si = base * tl.load(MULT + i)
                # candidate i's codes as a product, not a division: ``fp8._search`` takes the same product (and
                # the clamp keeps the compiler from fusing the product into the subtraction in the error)
                ci = tl.minimum(tl.maximum(c0 * tl.load(RECIP + i), -top), top)
                qi = _e4m3_value(ci, ROUND_FIRST)
                err = _candidate_error(qi, ci, tl.load(WEIGHT + i), qu, qv, HAS_QW, ERROR_UNIT, QW_UNIT, QW_SHIFT)
                better = err < best_err  # the first of equal errors stays
                best_err = tl.where(better, err, best_err)
                s = tl.where(better, si, s)
                q = tl.where(better[:, None], qi, q)
            s = tl.where(bad, float("nan"), s)
            c = tl.where(bad[:, None], 0.0, q)
        row = (slot // PAGE) * dst_p + (slot % PAGE) * dst_t  # (the pool's strides: values may be dimension-major)
        tl.store(DST + row + h[:, None] * dst_h + d[None, :] * dst_d, c.to(DST.dtype.element_ty), mask=m)
        tl.store(SCALE + slot * H + h, s, mask=hmask)

    @triton.jit
    def _store_fp8_kernel(
        DST_A, SCALE_A, SRC_A, DST_B, SCALE_B, SRC_B, SLOTS, MULT, WEIGHT, RECIP, QW,
        stride_at, stride_ah, stride_bt, stride_bh,
        a_p, a_t, a_h, a_d, b_p, b_t, b_h, b_d,
        PAGE: tl.constexpr, H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_B: tl.constexpr, ROUND_FIRST: tl.constexpr, INT8: tl.constexpr, STEPS: tl.constexpr,
        ERROR_UNIT: tl.constexpr, HAS_QW: tl.constexpr, QW_UNIT: tl.constexpr, QW_SHIFT: tl.constexpr,
        SPLIT: tl.constexpr = False,
    ):
        n = tl.program_id(0)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        slot = tl.load(SLOTS + n).to(tl.int64)
        if SPLIT:  # (the grid's third axis: program 0 stores the keys, 1 the values)
            if tl.program_id(2) == 0:
                _quantize_rows(DST_A, SCALE_A, SRC_A + n * stride_at, stride_ah, slot, h, d, a_p, a_t, a_h, a_d, MULT,
                               WEIGHT, RECIP, QW, PAGE, H, D, ROUND_FIRST, INT8, STEPS, ERROR_UNIT, HAS_QW, QW_UNIT, QW_SHIFT)
            else:
                _quantize_rows(DST_B, SCALE_B, SRC_B + n * stride_bt, stride_bh, slot, h, d, b_p, b_t, b_h, b_d, MULT,
                               WEIGHT, RECIP, QW, PAGE, H, D, ROUND_FIRST, INT8, STEPS, ERROR_UNIT, False, QW_UNIT, QW_SHIFT)
        else:
            _quantize_rows(DST_A, SCALE_A, SRC_A + n * stride_at, stride_ah, slot, h, d, a_p, a_t, a_h, a_d, MULT,
                           WEIGHT, RECIP, QW, PAGE, H, D, ROUND_FIRST, INT8, STEPS, ERROR_UNIT, HAS_QW, QW_UNIT, QW_SHIFT)
            if HAS_B:  # (values: never query-weighted)
                _quantize_rows(DST_B, SCALE_B, SRC_B + n * stride_bt, stride_bh, slot, h, d, b_p, b_t, b_h, b_d, MULT,
                               WEIGHT, RECIP, QW, PAGE, H, D, ROUND_FIRST, INT8, STEPS, ERROR_UNIT, False, QW_UNIT, QW_SHIFT)


def _store_fp8_triton(cache, slots, values, scale, cache_b, values_b, scale_b, weights=None) -> None:
    """The quantizing store: one program per token and group of heads, storing its keys and then its values
    (``ZIPAGE_STORE_LAUNCH``'s ``split``: keys and values in programs of their own; :func:`store_launch`)
    (``weights``: the query weights of ``cache``'s search, :func:`fp8.query_weights`)."""
    H, D = cache.shape[2], cache.shape[3]
    if cache_b is not None and cache_b.dtype != cache.dtype:
        raise ValueError(f"store_kv: keys and values must share one page type, got {cache.dtype} and {cache_b.dtype}")
    if cache.dim() != 4 or not scale.is_contiguous() or (scale_b is not None and not scale_b.is_contiguous()):
        raise ValueError("store_kv: FP8 pools must be [num_pages, page_size, H, D] with contiguous scales")
    flat_slots = slots.reshape(-1).contiguous()
    n = flat_slots.numel()
    if n == 0:
        return
    src_a = values.reshape(n, H, D)
    src_b = values_b.reshape(n, H, D) if values_b is not None else src_a
    if src_a.stride(-1) != 1:
        src_a = src_a.contiguous()
    if src_b.stride(-1) != 1:
        src_b = src_b.contiguous()
    block_d = next_pow2(D)
    launch = store_launch()
    block_h = min(next_pow2(H), launch.heads or max(1, 2048 // block_d))
    has_b = cache_b is not None
    split = launch.split and has_b
    for c in (cache, cache_b) if has_b else (cache,):
        if not (c.is_contiguous() or dim_major(c)):
            raise ValueError("store_kv: 8-bit pools must be contiguous or dimension-major (fp8.value_pool)")
    other = cache_b if has_b else cache
    steps = 1 if cache.dtype == INT8 else scale_steps()
    mult, weight, recip = scale_steps_table(steps, cache.device)
    has_qw = weights is not None and steps > 1
    if has_qw:
        check_weights("store_kv", weights, (H, D), cache.device)
        weights = weights.contiguous()
    _store_fp8_kernel[(n, triton.cdiv(H, block_h), 2 if split else 1)](
        cache, scale, src_a, other, scale_b if has_b else scale, src_b, flat_slots, mult, weight, recip,
        weights if has_qw else weight, src_a.stride(0), src_a.stride(1), src_b.stride(0), src_b.stride(1),
        *cache.stride(), *other.stride(), PAGE=cache.shape[1], H=H, D=D, BLOCK_H=block_h, BLOCK_D=block_d,
        HAS_B=has_b, ROUND_FIRST=interpreting(),
        INT8=cache.dtype == INT8, STEPS=steps, ERROR_UNIT=float(2**ERROR_BITS), HAS_QW=has_qw,
        QW_UNIT=float(2**WEIGHTED_ERROR_BITS), QW_SHIFT=WEIGHT_BITS - WEIGHTED_WEIGHT_BITS, SPLIT=split,
        num_warps=launch.warps,
    )


def _check_values(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """``values`` ``[*slots.shape, H, ...]`` exactly (the kernels read them flat: another layout of as many
    elements would be stored scrambled)."""
    want = (*slots.shape, *cache.shape[2:])
    if values is None or tuple(values.shape) != want:
        raise ValueError(f"store_kv: values must be {want} (slots {tuple(slots.shape)}, a pool's token "
                         f"{tuple(cache.shape[2:])}), got {None if values is None else tuple(values.shape)}")


def store_kv_triton(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor,
                    cache_b: torch.Tensor | None = None, values_b: torch.Tensor | None = None,
                    scale: torch.Tensor | None = None, scale_b: torch.Tensor | None = None,
                    key_weights: torch.Tensor | None = None) -> None:
    """Store ``values`` (and, in the same launch, ``values_b`` into ``cache_b``: keys with values);
    FP8 pools are quantized on the way, their scales written to ``scale`` / ``scale_b`` (``key_weights``:
    the query weights of ``cache``'s scale search, ``fp8.query_weights``)."""
    check_scales("store_kv", cache, scale)
    _check_values(cache, slots, values)
    if cache_b is not None:
        check_scales("store_kv", cache_b, scale_b)
        _check_values(cache_b, slots, values_b)
    if scale is not None:
        _store_fp8_triton(cache, slots, values, scale, cache_b, values_b, scale_b, key_weights)
        return
    if not cache.is_contiguous() or (cache_b is not None and not cache_b.is_contiguous()):
        raise ValueError("store_kv: pools must be contiguous")
    row = cache[0, 0].numel()
    flat_slots = slots.reshape(-1).contiguous()  # a column slice of a slot table reshapes to a strided view
    n = flat_slots.numel()
    if n == 0:
        return
    src_a = values.reshape(n, row)
    src_b = values_b.reshape(n, row) if values_b is not None else src_a
    if src_a.stride(-1) != 1:
        src_a = src_a.contiguous()
    if src_b.stride(-1) != 1:
        src_b = src_b.contiguous()
    block = min(next_pow2(row), 1024)
    _store_kernel[(n, triton.cdiv(row, block))](
        cache, src_a, cache_b if cache_b is not None else cache, src_b, flat_slots,
        src_a.stride(0), src_b.stride(0),
        ROW=row, BLOCK=block, HAS_B=cache_b is not None, num_warps=4,
    )


def store_kv_span_reference(cache: torch.Tensor, start: int, values: torch.Tensor,
                            scale: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> None:
    """``store_kv_reference`` for slots that are ``start .. start + n - 1`` of every page (``values``
    ``[num_pages, n, H, ...]``): the same writes as a slice copy, without an index tensor."""
    check_scales("store_kv", cache, scale)
    n = values.shape[1]
    if scale is None:
        cache.narrow(1, start, n).copy_(values)
        return
    codes, s = quantize_reference(values, cache.dtype, weights)
    cache.narrow(1, start, n).copy_(codes)
    scale.narrow(1, start, n).copy_(s)


def store_kv(cache: torch.Tensor, slots: torch.Tensor | None, values: torch.Tensor,
             cache_b: torch.Tensor | None = None, values_b: torch.Tensor | None = None,
             scale: torch.Tensor | None = None, scale_b: torch.Tensor | None = None,
             *, span_start: int | None = None, key_weights: torch.Tensor | None = None) -> None:
    """Write new tokens into their slots (keys and values in one launch on CUDA); FP8 pools take
    the tokens' codes and their scales ``scale`` / ``scale_b`` take the per-token, per-head scales.
    ``key_weights`` (FP8 ``cache`` only): the query weights its scale search compares errors by
    (``fp8.query_weights``); ``cache_b`` (the values) is searched by the plain squared error.

    ``span_start``: a hint that ``slots`` are ``[b * page_size + span_start + i]`` for every page ``b``
    of the pool (``values`` ``[num_pages, n, H, ...]``, token ``i`` of page ``b`` at ``[b, i]``), as a
    ``generate()`` cache's rows are. The PyTorch path then copies into that slice of every page, the
    same writes as indexing (``slots`` may be None there); the Triton path still takes ``slots``."""
    if span_start is not None and (slots is None or not use_triton(cache, slots, values)):
        store_kv_span_reference(cache, span_start, values, scale, key_weights)
        if cache_b is not None:
            store_kv_span_reference(cache_b, span_start, values_b, scale_b)
        return
    if use_triton(cache, slots, values):
        store_kv_triton(cache, slots, values, cache_b, values_b, scale, scale_b, key_weights)
        return
    store_kv_reference(cache, slots, values, scale, key_weights)
    if cache_b is not None:
        store_kv_reference(cache_b, slots, values_b, scale_b)


def gather_kv(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Dense copy of the tokens at ``slots`` (a single indexing kernel in PyTorch, on any device)."""
    return gather_kv_reference(cache, slots)
