"""Attention over a paged KV pool: decode (one query per sequence) and prefill/extend (packed queries).

Pools are ``[num_pages, page_size, H_kv, D]``; ``page_table`` is ``[B, max_pages]`` int32/int64;
sequence ``b`` attends to its stored tokens ``kv_starts[b] .. kv_lens[b]-1`` (``kv_starts`` skips
left padding kept in front; 0 when there is none).

Decode is split-K (flash-decoding): each (sequence, KV head, split) program reads one slice of
the context for all query heads of its GQA group, and a second small kernel merges the splits by
their log-sum-exp. No host syncs and no data-dependent shapes, so both launches can be captured
in a CUDA graph (the split count is fixed by the caller's length hint, not by the data).

FP8 pools (``kernels/fp8.py``) come with their scale pools ``k_scale`` / ``v_scale``
(``[num_pages, page_size, H_kv]``): the kernels load the codes, upcast them in registers and fold
the scales in exactly (the key scale into each logit column, the value scale into each
probability), so no dequantized copy is ever written.

Three more optional features, all off by default (keyword arguments, compile-time constants in
the kernels): ``window`` (a sliding window of that many keys: the query at position ``p`` sees keys
``p - window + 1 .. p`` only, as in ``sliding_attention`` layers), ``sinks`` (``[Hq]`` float32
learned sink logits, one per query head: a column that joins every softmax's denominator and
contributes no value, as in GPT-OSS) and ``softcap`` (logits become ``softcap * tanh(logits /
softcap)`` before the softmax, as in Gemma 2). None turns a feature off; a ``window`` below 1 or a
``softcap`` that is not positive (0 included) is refused by every entry, reference and Triton alike.

Argument checks: shapes (the host knows them) everywhere; the index tensors' values (``kv_lens`` within the
page table's rows, the page ids those lengths read, a ``max_q_len`` hint at least the longest query run) only
where those tensors are on the CPU (the references, Triton's interpreter): on a GPU reading them would cost a
device sync (and break CUDA-graph capture), so there they are the caller's to get right, and a bad one reads
other sequences' pages or leaves output rows unwritten.
"""

from __future__ import annotations

import functools
import os

import torch

from ._triton import HAS_TRITON, dot_precision, next_pow2, use_triton
from .fp8 import FP8, check_scales, dequantize_reference, dim_major, is_quantized
from .paged_decode_fp8 import default_choice as default_fp8_choice
from .paged_decode_fp8 import launch_decode_split_fp8

if HAS_TRITON:
    from .paged_decode_fp8 import _split_setup

if HAS_TRITON:
    import triton
    import triton.language as tl


# ----------------------------------------------------------------------------- references
def _dense_kv(k_cache, v_cache, page_table, b: int, length: int, k_scale=None, v_scale=None):
    """Float32 keys and values ``[length, Hkv, D]`` of sequence ``b`` (FP8 pools dequantized)."""
    page = k_cache.shape[1]
    pos = torch.arange(length, device=k_cache.device)
    pages, slots = page_table[b, pos // page].long(), pos % page
    if pages.device.type == "cpu" and pages.numel() and int(pages.min()) < 0:  # (-1 would wrap to the last page)
        raise IndexError(f"paged attention: page id {int(pages.min())} in row {b} of the page table")
    at = lambda t: t[pages, slots] if t is not None else None  # noqa: E731  (any layout: no flat view needed)
    return dequantize_reference(at(k_cache), at(k_scale)), dequantize_reference(at(v_cache), at(v_scale))


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def _softmax(logits: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim of ``[H, ..., L]`` logits; with ``sinks`` ``[H]``, each head's sink
    logit joins the denominator (and its column is dropped). Rows with nothing allowed give zeros; a NaN
    in the logits stays NaN (as in the kernels and dense math)."""
    if sinks is not None:
        sink = sinks.float().view(-1, *([1] * (logits.dim() - 1))).expand(*logits.shape[:-1], 1)
        probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(logits, dim=-1)
    return probs.masked_fill((logits == float("-inf")).all(dim=-1, keepdim=True), 0.0)


def paged_decode_attention_reference(q, k_cache, v_cache, page_table, kv_lens, scale, kv_starts=None,
                                     k_scale=None, v_scale=None, *, window: int | None = None,
                                     sinks: torch.Tensor | None = None, softcap: float | None = None,
                                     return_lse: bool = False):
    """``q`` [B, Hq, D] -> [B, Hq, D] (float32 math, output in q's dtype); FP8 pools take their
    scale pools ``k_scale`` / ``v_scale``. ``return_lse``: also the log-sum-exp of each row's logits
    ``[B, Hq]`` float32 (natural log; -inf where nothing is attended), without sinks."""
    check_scales("paged attention", k_cache, k_scale)
    check_scales("paged attention", v_cache, v_scale)
    check_features(window, softcap)
    _check_lse(return_lse, sinks)
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.zeros_like(q)
    lse = torch.full((B, Hq), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(kv_lens[b])
        s0 = int(kv_starts[b]) if kv_starts is not None else 0
        if window:
            s0 = max(s0, n - window)
        k, v = _dense_kv(k_cache, v_cache, page_table, b, n, k_scale, v_scale)
        k, v = k[s0:], v[s0:]
        if k.shape[0] == 0:
            continue
        k = k.repeat_interleave(Hq // Hkv, dim=1)  # [L, Hq, D]
        v = v.repeat_interleave(Hq // Hkv, dim=1)
        logits = _capped(torch.einsum("hd,lhd->hl", q[b].float(), k) * scale, softcap)
        out[b] = torch.einsum("hl,lhd->hd", _softmax(logits, sinks), v).to(q.dtype)
        lse[b] = torch.logsumexp(logits, dim=-1)
    return (out, lse) if return_lse else out


def check_features(window: int | None, softcap: float | None) -> None:
    """``window`` (keys a query sees, itself included) at least 1 and ``softcap`` positive, or None for none:
    the kernels read 0 as off and a negative value as off too, the references a negative softcap as its
    magnitude and a negative window as no key at all, so any such value is refused, 0 included."""
    if window is not None and not window >= 1:
        raise ValueError(f"window={window}: must be >= 1 (or None for no window)")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap}: must be > 0 (or None for no softcapping)")


def _check_lse(return_lse: bool, sinks: torch.Tensor | None) -> None:
    if return_lse and sinks is not None:
        raise ValueError("paged_decode_attention(return_lse=True) takes no sinks: merge them with the other parts "
                         "(merge_attention)")


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]], sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over a union of key sets from each set's ``(output [B, Hq, D], lse [B, Hq])`` (natural log,
    -inf for an empty set); ``sinks`` ``[Hq]`` join the denominator once. Float32 math, the first output's dtype."""
    lses = torch.stack([lse.float() for _, lse in parts])  # [P, B, Hq]
    if sinks is not None:
        lses = torch.cat([lses, sinks.float().view(1, 1, -1).expand(1, *lses.shape[1:])])
    m = lses.amax(dim=0)
    m = torch.where(m == float("-inf"), 0.0, m)
    w = torch.exp(lses - m)  # (an empty part weighs 0)
    w = w / w.sum(dim=0).clamp(min=1e-30)
    out = sum(w[i, ..., None] * o.float() for i, (o, _) in enumerate(parts))
    return out.to(parts[0][0].dtype)


def exact_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None,
                    scale: float, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per row ``q`` [B, Hq, D] over a few keys and values ``[B, H_kv, n, D]`` (``valid`` ``[B, n]``
    bool, or None for all): ``(output [B, Hq, D], lse [B, Hq])`` for ``merge_attention``."""
    check_features(None, softcap)
    B, Hq, D = q.shape
    G = Hq // keys.shape[1]
    qg = q.float().view(B, keys.shape[1], G, D)
    logits = _capped(torch.einsum("bhgd,bhnd->bhgn", qg, keys.float()) * scale, softcap)
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, H_kv, G]
    probs = torch.exp(logits - torch.where(lse == float("-inf"), 0.0, lse)[..., None])
    out = torch.einsum("bhgn,bhnd->bhgd", probs, values.float())
    return out.reshape(B, Hq, -1).to(q.dtype), lse.reshape(B, Hq)


def paged_prefill_attention_reference(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens, scale, kv_starts=None,
                                      k_scale=None, v_scale=None, *, window: int | None = None,
                                      sinks: torch.Tensor | None = None, softcap: float | None = None):
    """Packed queries ``q`` [T, Hq, D]; sequence ``b`` owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``,
    which are its last tokens: query ``i`` of ``n_q`` sits at position ``kv_lens[b] - n_q + i``
    and attends causally to stored positions ``kv_starts[b]..`` up to its own (and, with ``window``,
    to the last ``window`` of them only)."""
    check_scales("paged attention", k_cache, k_scale)
    check_scales("paged attention", v_cache, v_scale)
    check_features(window, softcap)
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.zeros_like(q)
    for b in range(len(kv_lens)):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        n, nq = int(kv_lens[b]), q1 - q0
        s0 = int(kv_starts[b]) if kv_starts is not None else 0
        if nq == 0:
            continue
        k, v = _dense_kv(k_cache, v_cache, page_table, b, n, k_scale, v_scale)
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
        logits = _capped(torch.einsum("qhd,lhd->hql", q[q0:q1].float(), k) * scale, softcap)
        qpos = torch.arange(n - nq, n, device=q.device)
        kpos = torch.arange(n, device=q.device)
        allowed = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] >= s0)
        if window:
            allowed &= kpos[None, :] > qpos[:, None] - window
        logits = logits.masked_fill(~allowed[None], float("-inf"))
        probs = _softmax(logits, sinks)
        out[q0:q1] = torch.einsum("hql,lhd->qhd", probs, v).to(q.dtype)
    return out


# ----------------------------------------------------------------------------- Triton kernels
if HAS_TRITON:

    @triton.jit
    def _load_paged_tile(K, V, KS, VS, PT, b, hk, t, in_range, kv_ok, d, dmask,
                         stride_ptb, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_vd,
                         stride_sp, stride_st, PAGE: tl.constexpr, FP8: tl.constexpr):
        """Keys and values of token positions ``t`` of sequence ``b``, head ``hk``, through its page table;
        with ``FP8``, the codes and their per-token scales (otherwise the scales are unused ones)."""
        page = tl.load(PT + b * stride_ptb + t // PAGE, mask=in_range, other=0).to(tl.int64)
        slot = t % PAGE
        m = kv_ok[:, None] & dmask[None, :]
        k = tl.load(K + page[:, None] * stride_kp + slot[:, None] * stride_kt + hk * stride_kh + d[None, :],
                    mask=m, other=0.0)
        v = tl.load(V + page[:, None] * stride_vp + slot[:, None] * stride_vt + hk * stride_vh + d[None, :] * stride_vd,
                    mask=m, other=0.0)
        if FP8:
            s_off = page * stride_sp + slot * stride_st + hk
            ks = tl.load(KS + s_off, mask=kv_ok, other=0.0)
            vs = tl.load(VS + s_off, mask=kv_ok, other=0.0)
        else:
            ks = t
            vs = t
        return k, v, ks, vs

    @triton.jit
    def _online_softmax_step(q, k, v, ks, vs, allowed, m_i, l_i, acc, scale_log2, PRECISION: tl.constexpr,
                             FP8: tl.constexpr, SOFTCAP_LOG2: tl.constexpr = 0.0):
        """One tile of flash attention in the log2 domain: running max, sum and weighted values.
        FP8 codes are upcast to the queries' dtype (exact) and their scales folded in: ``ks`` into
        the logit columns, ``vs`` into the probabilities of the values they weight."""
        if FP8:
            qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * (ks[None, :] * scale_log2)
        else:
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        if SOFTCAP_LOG2 > 0:  # softcap * tanh(x / softcap), in the log2 domain (tanh through exp)
            qk = SOFTCAP_LOG2 * (1.0 - 2.0 / (tl.math.exp(2.0 * qk / SOFTCAP_LOG2) + 1.0))
        qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP8:  # p * vs over the tile's largest value scale: in [0, 1], never below fp16's normal range
            vs_max = tl.maximum(tl.max(vs, 0), 1e-30)
            pv = tl.dot((p * (vs / vs_max)[None, :]).to(q.dtype), v.to(q.dtype), input_precision=PRECISION) * vs_max
        else:
            pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        acc = acc * alpha[:, None] + pv
        return m_new, l_i, acc

    @triton.jit
    def _decode_split_kernel(
        Q, K, V, KS, VS, PT, LENS, STARTS, MID_O, MID_LSE,
        scale_log2,
        stride_qb, stride_qh,
        stride_kp, stride_kt, stride_kh,
        stride_vp, stride_vt, stride_vh, stride_vd,
        stride_sp, stride_st,
        stride_ptb,
        stride_ob, stride_oh, stride_os,
        HQ: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
        FP8: tl.constexpr, WINDOW: tl.constexpr = 0, SOFTCAP_LOG2: tl.constexpr = 0.0,
    ):
        b = tl.program_id(0)
        hk = tl.program_id(1)
        split = tl.program_id(2)
        start, lo, hi, heads, gmask, d, dmask, q = _split_setup(
            Q, LENS, STARTS, b, hk, split, stride_qb, stride_qh, G, BLOCK_G, D, BLOCK_D, BLOCK_N, NUM_SPLITS, WINDOW)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        for t0 in range(lo, hi, BLOCK_N):
            t = t0 + offs_n
            in_range = t < hi
            valid = in_range & (t >= start)
            k, v, ks, vs = _load_paged_tile(K, V, KS, VS, PT, b, hk, t, in_range, valid, d, dmask, stride_ptb,
                                            stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_vd,
                                            stride_sp, stride_st, PAGE, FP8)
            m_i, l_i, acc = _online_softmax_step(q, k, v, ks, vs, valid[None, :], m_i, l_i, acc, scale_log2,
                                                 PRECISION, FP8, SOFTCAP_LOG2)

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        o_ptr = MID_O + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
        tl.store(o_ptr, out.to(MID_O.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])  # (one split: the output)
        tl.store(MID_LSE + (b * HQ + heads) * NUM_SPLITS + split, lse, mask=gmask)

    @triton.jit
    def _decode_merge_kernel(
        MID_O, MID_LSE, OUT, SINKS,
        stride_ob, stride_oh, stride_os,
        stride_outb, stride_outh,
        HQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HAS_SINKS: tl.constexpr = False,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        smask = s < NUM_SPLITS
        lse = tl.load(MID_LSE + (b * HQ + h) * NUM_SPLITS + s, mask=smask, other=float("-inf"))
        m = tl.max(lse, 0)
        if HAS_SINKS:  # the head's sink logit joins the denominator (log2 domain, like lse)
            sink = tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
            m = tl.maximum(m, sink)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.math.exp2(lse - m_safe)
        denom = tl.sum(w, 0)
        if HAS_SINKS:
            denom += tl.math.exp2(sink - m_safe)
        w = w / tl.maximum(denom, 1e-30)
        o = tl.load(MID_O + b * stride_ob + h * stride_oh + s[:, None] * stride_os + d[None, :],
                    mask=smask[:, None] & (d[None, :] < D), other=0.0)
        out = tl.sum(o * w[:, None], 0)
        tl.store(OUT + b * stride_outb + h * stride_outh + d, out.to(OUT.dtype.element_ty), mask=d < D)

    @triton.jit
    def _prefill_kernel(
        Q, K, V, KS, VS, PT, CU_Q, LENS, STARTS, OUT, SINKS,
        scale_log2,
        stride_qt, stride_qh,
        stride_kp, stride_kt, stride_kh,
        stride_vp, stride_vt, stride_vh, stride_vd,
        stride_sp, stride_st,
        stride_ptb,
        stride_ot, stride_oh,
        G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr,
        WINDOW: tl.constexpr = 0, HAS_SINKS: tl.constexpr = False, SOFTCAP_LOG2: tl.constexpr = 0.0,
    ):
        b = tl.program_id(0)
        mblk = tl.program_id(1)
        h = tl.program_id(2)
        hk = h // G
        q0 = tl.load(CU_Q + b).to(tl.int32)
        q1 = tl.load(CU_Q + b + 1).to(tl.int32)
        nq = q1 - q0
        if mblk * BLOCK_M >= nq:
            return
        seq_len = tl.load(LENS + b).to(tl.int32)
        start = tl.load(STARTS + b).to(tl.int32)
        i = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
        imask = i < nq
        qpos = seq_len - nq + i
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        q = tl.load(Q + (q0 + i)[:, None] * stride_qt + h * stride_qh + d[None, :],
                    mask=imask[:, None] & dmask[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = tl.minimum(seq_len, seq_len - nq + (mblk + 1) * BLOCK_M)
        if WINDOW > 0:  # a sliding window: nothing before the block's first query's window
            start = tl.maximum(start, seq_len - nq + mblk * BLOCK_M - WINDOW + 1)
        lo = (start // BLOCK_N) * BLOCK_N
        offs_n = tl.arange(0, BLOCK_N)
        for t0 in range(lo, hi, BLOCK_N):
            t = t0 + offs_n
            in_range = t < hi
            kv_ok = in_range & (t >= start)
            k, v, ks, vs = _load_paged_tile(K, V, KS, VS, PT, b, hk, t, in_range, kv_ok, d, dmask, stride_ptb,
                                            stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_vd,
                                            stride_sp, stride_st, PAGE, FP8)
            allowed = kv_ok[None, :] & (t[None, :] <= qpos[:, None])
            if WINDOW > 0:
                allowed = allowed & (t[None, :] > qpos[:, None] - WINDOW)
            m_i, l_i, acc = _online_softmax_step(q, k, v, ks, vs, allowed, m_i, l_i, acc, scale_log2, PRECISION,
                                                 FP8, SOFTCAP_LOG2)
        if HAS_SINKS:  # the head's sink logit joins the denominator (log2 domain)
            sink = tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
            m_safe = tl.where(m_i == float("-inf"), sink, m_i)
            l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.math.exp2(sink - m_safe)
            acc = acc * tl.math.exp2(m_i - m_safe)[:, None]
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(OUT + (q0 + i)[:, None] * stride_ot + h * stride_oh + d[None, :],
                 out.to(OUT.dtype.element_ty), mask=imask[:, None] & dmask[None, :])


LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def decode_num_splits(batch: int, kv_heads: int, max_len: int, num_sms: int = 132, block_n: int = 64) -> int:
    """Splits so that about two waves of programs fill the GPU, never more than the context's blocks."""
    programs = max(batch * kv_heads, 1)
    want = max(1, (2 * num_sms + programs - 1) // programs)
    blocks = max(1, -(-max_len // block_n))
    return int(min(next_pow2(want), next_pow2(blocks), 64))


def _scale_args(k_cache, v_cache, k_scale, v_scale):
    """Scale pools and their (page, token) strides for the kernels; the key pool stands in for both
    when the pools are not FP8 (never read then)."""
    check_scales("paged attention", k_cache, k_scale)
    check_scales("paged attention", v_cache, v_scale)
    if k_scale is None:
        return k_cache, k_cache, 0, 0, False
    if k_scale.stride() != v_scale.stride() or k_scale.stride(-1) != 1:
        raise ValueError("paged attention: k_scale and v_scale must share one layout, heads contiguous")
    return k_scale, v_scale, k_scale.stride(0), k_scale.stride(1), True


def _check_paged(q, k_cache, v_cache, page_table):
    if k_cache.dim() != 4 or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"pools must be [num_pages, page_size, H_kv, D]; got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if q.shape[-2] % k_cache.shape[2]:
        raise ValueError(f"{q.shape[-2]} query heads are not a multiple of {k_cache.shape[2]} KV heads")
    if q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(f"head dim of q ({q.shape[-1]}) and of the pool ({k_cache.shape[-1]}) differ")
    if k_cache.stride(-1) != 1 or q.stride(-1) != 1 or not (v_cache.stride(-1) == 1 or dim_major(v_cache)):
        raise ValueError("the last dimension of q and of the pools must be contiguous (values may instead be "
                         "stored dimension-major, fp8.value_pool)")
    if page_table.dim() != 2:
        raise ValueError(f"page_table must be [B, max_pages], got {tuple(page_table.shape)}")
    if k_cache.dtype != v_cache.dtype or not (is_quantized(k_cache) or k_cache.dtype == q.dtype):
        raise ValueError(f"q is {q.dtype} and the pools {k_cache.dtype} / {v_cache.dtype}: 16- and 32-bit pools "
                         "take queries of their own dtype (8-bit pools, 16- or 32-bit queries), keys and values "
                         "one dtype")


def check_index_rows(rows: int, page_table, kv_lens, kv_starts=None) -> None:
    """The per-sequence index tensors hold ``rows`` sequences (decode: the queries' rows)."""
    if kv_lens.dim() != 1 or kv_lens.shape[0] != rows:
        raise ValueError(f"kv_lens must be [{rows}] (one length per sequence), got {tuple(kv_lens.shape)}")
    if page_table.shape[0] != rows:
        raise ValueError(f"page_table has {page_table.shape[0]} rows for {rows} sequences")
    if kv_starts is not None and tuple(kv_starts.shape) != (rows,):
        raise ValueError(f"kv_starts must be [{rows}] (one start per sequence), got {tuple(kv_starts.shape)}")


def _check_index_values(k_cache, page_table, kv_lens) -> None:
    """``kv_lens`` within the page table's rows and the page ids they read within the pool, for CPU index
    tensors only (on a GPU this would be a device sync: there the values are the caller's to get right)."""
    if page_table.device.type != "cpu" or kv_lens.device.type != "cpu" or not kv_lens.numel():
        return
    num_pages, page = k_cache.shape[:2]
    width = page_table.shape[1] * page
    lo, hi = int(kv_lens.min()), int(kv_lens.max())
    if lo < 0 or hi > width:
        raise IndexError(f"kv_lens must lie in [0, {width}] (page_table rows of {page_table.shape[1]} pages of "
                         f"{page}), got {lo} .. {hi}")
    read = page_table[torch.arange(page_table.shape[1]) * page < kv_lens[:, None]]  # (the pages the lengths reach)
    if read.numel() and (int(read.min()) < 0 or int(read.max()) >= num_pages):
        raise IndexError(f"the page ids read must lie in [0, {num_pages}), got {int(read.min())} .. "
                         f"{int(read.max())}")


def check_prefill_args(q, k_cache, page_table, cu_seqlens_q, kv_lens, kv_starts=None, max_q_len=None, *,
                       window=None, softcap=None) -> None:
    """The prefill wrappers' checks beside ``_check_paged`` (both kernels): ``window`` and ``softcap``, the
    index tensors' shapes, and on CPU index tensors their values, ``max_q_len`` against the longest run of
    queries included (on a GPU that would be a device sync: a hint below it leaves rows unwritten)."""
    check_features(window, softcap)
    B = kv_lens.shape[0]
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] != B + 1:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries for {B} sequences (expected {B + 1})")
    check_index_rows(B, page_table, kv_lens, kv_starts)
    if cu_seqlens_q.device.type == "cpu" and B:
        runs = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
        if int(runs.min()) < 0 or int(cu_seqlens_q[0]) < 0 or int(cu_seqlens_q[-1]) > q.shape[0]:
            raise IndexError(f"cu_seqlens_q must rise from 0 or more to at most the {q.shape[0]} query rows, got "
                             f"{cu_seqlens_q.tolist()}")
        longest = int(runs.max())
        if max_q_len is not None and max_q_len < longest:
            raise ValueError(f"max_q_len={max_q_len} is less than the longest run of queries ({longest}): the rows "
                             "past it would be left unwritten")
    _check_index_values(k_cache, page_table, kv_lens)


def index_args(page_table, *vectors):
    """The index tensors as the kernels read them: the page table's rows contiguous (the kernels take its row
    stride), and the per-sequence vectors (lengths, starts, ``cu_seqlens_q``, sinks; None passes) contiguous.
    A view with other strides is copied; one that already has them is returned as it is (nothing copied, so
    captured CUDA graphs keep reading the caller's buffers)."""
    if page_table.stride(-1) != 1:
        page_table = page_table.contiguous()
    return (page_table, *(v if v is None or v.is_contiguous() else v.contiguous() for v in vectors))


def _check_sinks(sinks: torch.Tensor | None, heads: int) -> None:
    if sinks is not None and (sinks.dim() != 1 or sinks.shape[0] != heads):
        raise ValueError(f"sinks must be [{heads}] (one logit per query head), got {tuple(sinks.shape)}")


def paged_decode_attention_triton(q, k_cache, v_cache, page_table, kv_lens, scale, kv_starts=None,
                                  num_splits: int | None = None, max_len_hint: int | None = None,
                                  block_n: int | None = None, k_scale=None, v_scale=None, *, window: int | None = None,
                                  sinks: torch.Tensor | None = None, softcap: float | None = None,
                                  num_warps: int = 4, num_stages: int = 2, fp8_kernel: dict | None = None,
                                  return_lse: bool = False):
    """``fp8_kernel``: 8-bit pages (FP8 or INT8) through ``paged_decode_fp8``'s kernel with these
    launch choices (``convert``, ``head_fast``, ``load``, ``int8_ptx``, ``v_edge``, ``block_n``, ``num_warps``,
    ``num_stages``);
    None reads ``ZIPAGE_FP8_DECODE`` (e.g. ``convert=fp16,head_fast=1,load=tma,block_n=128``;
    ``convert=general`` keeps the general kernel) and, when that is unset, takes that kernel's
    tuned default on a GPU (``paged_decode_fp8.default_choice``), the general kernel elsewhere.

    ``kv_lens`` / ``kv_starts`` / ``page_table`` hold one row per query row; on CPU index tensors (the
    interpreter) each length is checked to fit its row of the page table and the page ids it reads to be
    in the pool, while on a GPU (no device sync) that is the caller's promise: a longer length reads the
    next row's pages. ``num_splits``: at least 1 (None picks it from the length hint)."""
    _check_paged(q, k_cache, v_cache, page_table)
    _check_sinks(sinks, q.shape[1])
    _check_lse(return_lse, sinks)
    check_features(window, softcap)
    check_index_rows(q.shape[0], page_table, kv_lens, kv_starts)
    _check_index_values(k_cache, page_table, kv_lens)
    if num_splits is not None and not num_splits >= 1:
        raise ValueError(f"num_splits={num_splits}: must be >= 1 (or None to pick it from the length hint)")
    page_table, kv_lens, kv_starts, sinks = index_args(page_table, kv_lens, kv_starts, sinks)
    ks, vs, stride_sp, stride_st, fp8 = _scale_args(k_cache, v_cache, k_scale, v_scale)
    if fp8 and fp8_kernel is None:  # 8-bit pages: ZIPAGE_FP8_DECODE, else the tuned default on a GPU
        fp8_kernel = fp8_decode_choice()
        if fp8_kernel is None:
            fp8_kernel = default_fp8_choice(q, k_cache, v_cache)
    if fp8_kernel is not None and fp8_kernel.get("convert") == "general":  # the general kernel, asked for
        fp8_kernel = None
    if fp8_kernel is not None and fp8 and q.dtype in (torch.bfloat16, torch.float16):
        fp8_kernel = dict(fp8_kernel)
        block_n = int(fp8_kernel.pop("block_n", block_n or 128))
        num_warps = int(fp8_kernel.pop("num_warps", num_warps))
        num_stages = int(fp8_kernel.pop("num_stages", num_stages))
    else:
        fp8_kernel = None
    if block_n is None:  # FP8 tiles carry half the bytes: twice the tokens per tile (H200: 25% faster at 256-512
        block_n = 128 if fp8 else 64  # requests, benchmarks/fp8_decode_tune.py); bf16 is at the copy bandwidth at 64
    B, Hq, D = q.shape
    Hkv, page = k_cache.shape[2], k_cache.shape[1]
    G = Hq // Hkv
    if kv_starts is None:
        kv_starts = torch.zeros(B, dtype=torch.int32, device=q.device)
    if num_splits is None:
        hint = max_len_hint if max_len_hint is not None else page_table.shape[1] * page
        hint = min(hint, window + block_n) if window else hint
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        num_splits = decode_num_splits(B, Hkv, hint, sms, block_n)
    out = torch.empty_like(q)
    # one split and no sinks: the split pass's normalized output is the answer (the merge would multiply it by
    # exp2(0) / 1), so it stores it into ``out`` itself, rounded as the merge rounds, and no merge runs
    direct = num_splits == 1 and sinks is None
    mid_o = out.unsqueeze(2) if direct else torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    if fp8_kernel is not None:
        launch_decode_split_fp8(q, k_cache, v_cache, ks, vs, page_table, kv_lens, kv_starts, mid_o, mid_lse,
                                scale * LOG2E, num_splits=num_splits, block_n=block_n,
                                window=int(window or 0), softcap_log2=float(softcap or 0.0) * LOG2E,
                                num_warps=num_warps, num_stages=num_stages, **fp8_kernel)
    else:
        _launch_decode_split(q, k_cache, v_cache, ks, vs, page_table, kv_lens, kv_starts, mid_o, mid_lse, scale,
                             stride_sp, stride_st, G, page, block_n, num_splits, fp8, window, softcap, num_warps,
                             num_stages)
    if not direct:
        _merge_splits(mid_o, mid_lse, out, sinks, num_splits)
    if return_lse:  # the splits' log2-domain sums, as one natural-log lse per row
        return out, torch.logsumexp(mid_lse * LN2, dim=-1)
    return out


def _launch_decode_split(q, k_cache, v_cache, ks, vs, page_table, kv_lens, kv_starts, mid_o, mid_lse, scale,
                         stride_sp, stride_st, G, page, block_n, num_splits, fp8, window, softcap, num_warps,
                         num_stages):
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, ks, vs, page_table, kv_lens, kv_starts, mid_o, mid_lse,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        stride_sp, stride_st,
        page_table.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        HQ=Hq, G=G, BLOCK_G=max(16, next_pow2(G)), D=D, BLOCK_D=next_pow2(D), PAGE=page, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, PRECISION=dot_precision(q.dtype), FP8=fp8, WINDOW=int(window or 0),
        SOFTCAP_LOG2=float(softcap or 0.0) * LOG2E, num_warps=num_warps, num_stages=num_stages,
    )


def _merge_splits(mid_o, mid_lse, out, sinks, num_splits):
    B, Hq, D = out.shape
    _decode_merge_kernel[(B, Hq)](
        mid_o, mid_lse, out, sinks if sinks is not None else mid_lse,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        out.stride(0), out.stride(1),
        HQ=Hq, D=D, BLOCK_D=next_pow2(D), NUM_SPLITS=num_splits, BLOCK_S=max(2, next_pow2(num_splits)),
        HAS_SINKS=sinks is not None, num_warps=4,
    )


def fp8_decode_choice() -> dict | None:
    """The FP8 decode kernel's launch choices from ``ZIPAGE_FP8_DECODE`` (``key=value,...``), or None."""
    parsed = _parse_fp8_choice(os.environ.get("ZIPAGE_FP8_DECODE", "").strip())
    return None if parsed is None else dict(parsed)


@functools.lru_cache(maxsize=8)
def _parse_fp8_choice(text: str) -> tuple | None:
    """(parsed once per distinct setting: the decode wrapper asks on every layer of every step)"""
    if not text:
        return None
    choice: dict = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key in ("convert", "load", "v_edge"):
            choice[key] = value
        elif key in ("head_fast", "int8_ptx", "block_n", "num_warps", "num_stages", "maxnreg"):
            if not value.isdigit():
                raise ValueError(f"ZIPAGE_FP8_DECODE: {key}={value!r} must be a whole number")
            choice[key] = int(value)
        else:
            raise ValueError(f"ZIPAGE_FP8_DECODE: unknown key {key!r} (convert, head_fast, load, int8_ptx, v_edge, "
                             "block_n, num_warps, num_stages, maxnreg)")
    return tuple(choice.items())


def paged_prefill_attention_triton(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens, scale, kv_starts=None,
                                   max_q_len: int | None = None, block_m: int | None = None, block_n: int = 64,
                                   k_scale=None, v_scale=None, *, window: int | None = None,
                                   sinks: torch.Tensor | None = None, softcap: float | None = None):
    """Packed queries against paged KV (the contract of ``paged_prefill_attention_reference``).
    ``max_q_len``: the longest run of queries (None: read from ``cu_seqlens_q``); a hint below it leaves
    rows unwritten, so on CPU index tensors it is checked, and on a GPU (no device sync) it must hold."""
    _check_paged(q, k_cache, v_cache, page_table)
    _check_sinks(sinks, q.shape[1])
    check_prefill_args(q, k_cache, page_table, cu_seqlens_q, kv_lens, kv_starts, max_q_len, window=window,
                       softcap=softcap)
    page_table, cu_seqlens_q, kv_lens, kv_starts, sinks = index_args(page_table, cu_seqlens_q, kv_lens, kv_starts,
                                                                     sinks)
    ks, vs, stride_sp, stride_st, fp8 = _scale_args(k_cache, v_cache, k_scale, v_scale)
    T, Hq, D = q.shape
    B = kv_lens.shape[0]
    Hkv, page = k_cache.shape[2], k_cache.shape[1]
    if kv_starts is None:
        kv_starts = torch.zeros(B, dtype=torch.int32, device=q.device)
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if B else 0
    out = torch.empty_like(q)
    if B == 0 or T == 0:
        return out
    if block_m is None:
        block_m = 128 if q.is_cuda and D <= 128 else 64
    _prefill_kernel[(B, triton.cdiv(max_q_len, block_m), Hq)](
        q, k_cache, v_cache, ks, vs, page_table, cu_seqlens_q, kv_lens, kv_starts, out,
        sinks if sinks is not None else q, scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        stride_sp, stride_st,
        page_table.stride(0),
        out.stride(0), out.stride(1),
        G=Hq // Hkv, D=D, BLOCK_D=next_pow2(D), PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION=dot_precision(q.dtype), FP8=fp8, WINDOW=int(window or 0), HAS_SINKS=sinks is not None,
        SOFTCAP_LOG2=float(softcap or 0.0) * LOG2E, num_warps=8 if block_m >= 128 else 4,
        num_stages=3 if q.is_cuda else 1,
    )
    return out


def paged_decode_attention(q, k_cache, v_cache, page_table, kv_lens, scale, kv_starts=None, k_scale=None,
                           v_scale=None, *, window: int | None = None, sinks: torch.Tensor | None = None,
                           softcap: float | None = None, return_lse: bool = False, **kwargs):
    """One query token per sequence against its pages; Triton on CUDA, the reference elsewhere.
    FP8 pools take their scale pools ``k_scale`` / ``v_scale``. ``return_lse``: ``(output, lse)``, the
    second ``[B, Hq]`` float32 for ``merge_attention`` (no sinks then)."""
    features = dict(window=window, sinks=sinks, softcap=softcap, return_lse=return_lse)
    if use_triton(q, k_cache):
        return paged_decode_attention_triton(q, k_cache, v_cache, page_table, kv_lens, scale, kv_starts,
                                             k_scale=k_scale, v_scale=v_scale, **features, **kwargs)
    return paged_decode_attention_reference(q, k_cache, v_cache, page_table, kv_lens, scale, kv_starts,
                                            k_scale, v_scale, **features)


def paged_prefill_attention(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens, scale, kv_starts=None,
                            k_scale=None, v_scale=None, *, window: int | None = None,
                            sinks: torch.Tensor | None = None, softcap: float | None = None, **kwargs):
    """Packed variable-length queries against paged KV (which already holds them and any cached prefix)."""
    features = dict(window=window, sinks=sinks, softcap=softcap)
    if use_triton(q, k_cache):
        choice = os.environ.get("ZIPAGE_PREFILL_KERNEL", "v2")
        if choice != "v1":  # the second kernel (paged_prefill.py), "v2" or "v2:<config name>"; "v1": the first
            from .paged_prefill import kernel_for

            return kernel_for(choice)(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens, scale, kv_starts,
                                      k_scale=k_scale, v_scale=v_scale, **features, **kwargs)
        return paged_prefill_attention_triton(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens, scale,
                                              kv_starts, k_scale=k_scale, v_scale=v_scale, **features, **kwargs)
    return paged_prefill_attention_reference(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens, scale,
                                             kv_starts, k_scale, v_scale, **features)

