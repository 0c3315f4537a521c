"""A decoding row's exact tail, attended and merged with the paged kernel's part, in one launch.

With exact tails (``ZipageConfig.exact_tail``) a decoding row reads its pages but the last ``count`` tokens
through the paged decode kernel (``paged_decode_attention(..., return_lse=True)``) and those tokens from its
query slot's ring of exact keys and values: ``tail`` rows from ``first``, position ``t`` at row
``first + t % tail``, so row ``r`` holds one of the row's last ``count`` positions when
``(pos - r) mod tail < count`` (``pos``: the row's own position, stored already). :func:`exact_tail_merge`
takes the paged part's output and log-sum-exp and returns the row's attention output: the softmax over the
valid ring rows (``softcap``, positive or None, applied to their logits), merged with the paged part and the sink logits
(``sinks``, once). The Triton kernel runs one program per row and KV head, the query heads of the group
together (padded to 16 rows), over the ring rows as tiles of up to 64 with two dots (tensor cores for 16-bit
inputs); the reference is ``merge_attention([(out, lse), exact_attention(...)], sinks)`` from
``paged_attention.py``, which also serves CPUs (``ZIPAGE_EXACT_TAIL_KERNEL=torch`` picks it on a GPU too).
:func:`exact_merge` is the same kernel over generate()'s exact tails: keys and values ``[B, H_kv, n, D]`` with a
validity mask ``[B, n]`` (padding).
"""

from __future__ import annotations

import os

import torch

from ._triton import HAS_TRITON, dot_precision, next_pow2, use_triton
from .paged_attention import check_features, exact_attention, merge_attention

MAX_BLOCK_ROWS = 64  # ring or tail rows one tile reads (longer tails: several tiles)
# The launch (``benchmarks/merge_tune.py`` sweeps it): on the H200, 490 rows x 8 KV heads, 2 warps took 22 us at a tail
# of 16 against 24.6 with 4, and the same 31-33 / 48-50 us at 32 / 64 (``benchmarks/results/issue15/s36/call5``).
LAUNCH = dict(num_warps=2, max_block_rows=MAX_BLOCK_ROWS)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _exact_tail_merge_kernel(
        Q, O, LSE, RK, RV, FIRST, POS, COUNT, VALID, SINKS, OUT,
        stride_qb, stride_qh, stride_ob, stride_oh, stride_lb, stride_lh,
        stride_kb, stride_kr, stride_kh, stride_vb, stride_vr, stride_vh, stride_valid, stride_xb, stride_xh,
        scale, softcap,
        TAIL: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, D: tl.constexpr,
        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, HAS_SINKS: tl.constexpr, SOFTCAP: tl.constexpr,
        HAS_VALID: tl.constexpr,
    ):
        """Row ``b``'s keys: ``RK + b * stride_kb + (FIRST[b] + r) * stride_kr`` for ``r < TAIL``; valid where
        ``VALID[b, r]`` (``HAS_VALID``), else where ``(POS[b] - r) mod TAIL < COUNT[b]`` (a ring). The rows are
        read ``BLOCK_R`` at a time as one tile (one tile for tails up to ``BLOCK_R``), the group's query heads
        padded to ``BLOCK_G >= 16`` rows so that both products are dots (on tensor cores for 16-bit inputs)."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        gm, dm = g < G, d < D
        heads = h * G + g
        qm = gm[:, None] & dm[None, :]
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=qm, other=0.0)
        if HAS_VALID:
            first = 0
        else:
            first = tl.load(FIRST + b).to(tl.int64)
            pos = tl.load(POS + b).to(tl.int64)
            count = tl.load(COUNT + b).to(tl.int64)
        m = tl.full([BLOCK_G], -1.0e30, tl.float32)  # (finite: invalid rows weigh 0 through the mask, not -inf)
        den = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for r0 in range(0, TAIL, BLOCK_R):  # (long tails, full KV's: several tiles, an online softmax)
            r = r0 + tl.arange(0, BLOCK_R)
            if HAS_VALID:
                valid = tl.load(VALID + b * stride_valid + r, mask=r < TAIL, other=0) != 0
            else:
                valid = (r < TAIL) & (((pos - r) % TAIL + TAIL) % TAIL < count)
            tm = valid[:, None] & dm[None, :]  # (rows not read stay 0: a ring row never written may hold NaN)
            k = tl.load(RK + b * stride_kb + (first + r)[:, None] * stride_kr + h * stride_kh + d[None, :], mask=tm,
                        other=0.0)
            v = tl.load(RV + b * stride_vb + (first + r)[:, None] * stride_vr + h * stride_vh + d[None, :], mask=tm,
                        other=0.0)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK_R]
            if SOFTCAP:  # softcap * tanh(s / softcap), tanh through exp
                s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
            s = tl.where(valid[None, :], s, -1.0e30)
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.where(valid[None, :], tl.exp(s - m_new[:, None]), 0.0)
            den = den * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        lse_x = m + tl.log(den)  # (-inf where nothing was valid: that part then weighs 0)
        lse_p = tl.load(LSE + b * stride_lb + heads * stride_lh, mask=gm, other=float("-inf")).to(tl.float32)
        top = tl.maximum(lse_p, lse_x)
        if HAS_SINKS:
            sink = tl.load(SINKS + heads, mask=gm, other=float("-inf")).to(tl.float32)
            top = tl.maximum(top, sink)
        top = tl.where(top == float("-inf"), 0.0, top)  # (nothing anywhere: every weight 0, the output 0)
        w_p = tl.exp(lse_p - top)  # (an empty paged part: lse -inf, weight 0)
        w_x = tl.exp(lse_x - top)
        total = w_p + w_x
        if HAS_SINKS:
            total += tl.exp(sink - top)
        o = tl.load(O + b * stride_ob + heads[:, None] * stride_oh + d[None, :], mask=qm, other=0.0).to(tl.float32)
        res = (w_p[:, None] * o + (w_x / tl.maximum(den, 1e-30))[:, None] * acc) / tl.maximum(total, 1e-30)[:, None]
        tl.store(OUT + b * stride_xb + heads[:, None] * stride_xh + d[None, :], res.to(OUT.dtype.element_ty), mask=qm)


def exact_tail_rows(first: torch.Tensor, pos: torch.Tensor, count: torch.Tensor, tail: int):
    """``(rows [B, tail], valid [B, tail])``: each row's ring rows and which hold its last ``count`` positions."""
    ages = torch.arange(tail, device=first.device)
    return first[:, None] + ages, (pos[:, None] - ages) % tail < count[:, None]


def exact_tail_merge_reference(q, out, lse, ring_k, ring_v, first, pos, count, tail: int, scale: float,
                               softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """``q`` ``[B, Hq, D]``, the paged part's ``out`` ``[B, Hq, D]`` and ``lse`` ``[B, Hq]``, the rings
    ``[rows, H_kv, D]``, ``first`` / ``pos`` / ``count`` ``[B]``: the merged output ``[B, Hq, D]``."""
    rows, valid = exact_tail_rows(first, pos, count, tail)
    keys, values = ring_k[rows].transpose(1, 2), ring_v[rows].transpose(1, 2)  # [B, H_kv, tail, D]
    return merge_attention([(out, lse), exact_attention(q, keys, values, valid, scale, softcap)], sinks)


def _launch(q, out, lse, keys, values, strides_k, strides_v, tail, scale, softcap, sinks, first=None, pos=None,
            count=None, valid=None) -> torch.Tensor:
    check_features(None, softcap)  # (positive or None, as in the reference's exact_attention)
    B, Hq, D = q.shape
    H = keys.shape[1]  # (a ring [rows, H_kv, D] or tails [B, H_kv, n, D])
    if Hq % H or keys.shape[-1] != D or values.shape != keys.shape:
        raise ValueError(f"exact_tail_merge: queries {tuple(q.shape)} and keys / values {tuple(keys.shape)} / "
                         f"{tuple(values.shape)} do not match")
    if keys.stride(-1) != 1 or values.stride(-1) != 1 or q.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("exact_tail_merge: the last dim of queries, outputs, keys and values must be contiguous")
    res = torch.empty_like(q)
    if B == 0:
        return res
    G = Hq // H
    dummy = lse
    _exact_tail_merge_kernel[(B, H)](
        q, out, lse, keys, values, first if first is not None else dummy, pos if pos is not None else dummy,
        count if count is not None else dummy, valid if valid is not None else dummy,
        sinks if sinks is not None else dummy, res,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        *strides_k, *strides_v, valid.stride(0) if valid is not None else 0, res.stride(0), res.stride(1),
        float(scale), float(softcap or 0.0),
        TAIL=tail, G=G, BLOCK_G=max(16, next_pow2(G)), BLOCK_R=min(max(16, next_pow2(tail)), LAUNCH["max_block_rows"]),
        D=D, BLOCK_D=max(16, next_pow2(D)), PRECISION=dot_precision(q.dtype), HAS_SINKS=sinks is not None,
        SOFTCAP=bool(softcap), HAS_VALID=valid is not None, num_warps=LAUNCH["num_warps"],
    )
    return res


def exact_tail_merge_triton(q, out, lse, ring_k, ring_v, first, pos, count, tail: int, scale: float,
                            softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    return _launch(q, out, lse, ring_k, ring_v, (0, ring_k.stride(0), ring_k.stride(1)),
                   (0, ring_v.stride(0), ring_v.stride(1)), tail, scale, softcap, sinks, first, pos, count)


def exact_merge_reference(q, out, lse, keys, values, valid, scale: float, softcap: float | None = None,
                          sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The paged part (``out``, ``lse``) merged with attention over ``keys`` / ``values`` ``[B, H_kv, n, D]``
    where ``valid`` ``[B, n]`` (generate()'s exact tails: the last stored tokens, padding invalid)."""
    return merge_attention([(out, lse), exact_attention(q, keys, values, valid, scale, softcap)], sinks)


def exact_merge_triton(q, out, lse, keys, values, valid, scale: float, softcap: float | None = None,
                       sinks: torch.Tensor | None = None) -> torch.Tensor:
    return _launch(q, out, lse, keys, values, (keys.stride(0), keys.stride(2), keys.stride(1)),
                   (values.stride(0), values.stride(2), values.stride(1)), keys.shape[2], scale, softcap, sinks,
                   valid=valid)


def exact_merge(q, out, lse, keys, values, valid, scale: float, softcap: float | None = None,
                sinks: torch.Tensor | None = None) -> torch.Tensor:
    """``exact_merge_triton`` on a GPU, the PyTorch reference otherwise (``ZIPAGE_EXACT_TAIL_KERNEL`` as below)."""
    if use_triton(q, keys) and _choice() == "triton":
        return exact_merge_triton(q, out, lse, keys, values, valid, scale, softcap, sinks)
    return exact_merge_reference(q, out, lse, keys, values, valid, scale, softcap, sinks)


def _choice() -> str:
    choice = os.environ.get("ZIPAGE_EXACT_TAIL_KERNEL", "triton").strip()
    if choice not in ("triton", "torch"):
        raise ValueError(f"ZIPAGE_EXACT_TAIL_KERNEL={choice!r}: expected triton (the kernel on a GPU) or torch "
                         "(the PyTorch reference everywhere)")
    return choice


def exact_tail_merge(q, out, lse, ring_k, ring_v, first, pos, count, tail: int, scale: float,
                     softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel on a GPU, the PyTorch reference otherwise (the CPU tests call the kernel under the
    interpreter themselves)."""
    if use_triton(q, ring_k) and _choice() == "triton":
        return exact_tail_merge_triton(q, out, lse, ring_k, ring_v, first, pos, count, tail, scale, softcap, sinks)
    return exact_tail_merge_reference(q, out, lse, ring_k, ring_v, first, pos, count, tail, scale, softcap, sinks)
