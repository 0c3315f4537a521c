"""Window attention score: how much the last ``w`` queries attend to each stored token.

For each sequence and KV head: the window queries (the last ``w`` tokens,
post-RoPE) attend to every stored key with a softmax over the whole stored
context, causal inside the window (query ``i`` sits at stored index
``S - w + i``); the probabilities are reduced over the query heads of a GQA
group (max or mean) and then over the valid window queries (mean or sum).

FP8 keys come as their codes with ``key_scales`` ``[B, Hkv, S]``; the kernel upcasts the codes in
registers and folds each key's scale into its logit column.
"""

from __future__ import annotations

import torch

from .fp8 import check_scales, dequantize_reference


def window_scores_reference(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_mask: torch.Tensor,
    query_mask: torch.Tensor,
    scaling: float,
    group_reduce: str = "max",
    window_reduce: str = "mean",
    prev: torch.Tensor | None = None,
    decay: float = 1.0,
    key_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Args:
        queries: ``[B, Hq, w, D]`` window queries.
        keys: ``[B, Hkv, S, D]`` stored keys (``S >= w``; the last ``w`` are the window's own keys).
        key_mask: ``[B, S]`` bool, False for padding.
        query_mask: ``[B, w]`` bool, False for padding queries.
        scaling: softmax scale (the model's, usually ``D ** -0.5``).
        prev, decay: when ``prev`` ([B, Hkv, S]) is given, return ``max(score, decay * prev)``
            (the decayed global score of G-KV), fused in the kernel.
        key_scales: ``[B, Hkv, S]`` float32 scales when ``keys`` are FP8 codes (``kernels/fp8.py``).
    Returns:
        ``[B, Hkv, S]`` float32 scores.
    """
    B, Hq, w, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    if Hq % Hkv:
        raise ValueError(f"window_scores: {Hq} query heads are not a multiple of {Hkv} KV heads")
    if w > S:
        raise ValueError(f"window_scores: window {w} longer than the {S} stored tokens")
    G = Hq // Hkv
    check_scales("window_scores", keys, key_scales)
    q = queries.float().view(B, Hkv, G, w, D)
    logits = torch.einsum("bhgwd,bhsd->bhgws", q, dequantize_reference(keys, key_scales)) * scaling
    pos = torch.arange(S, device=keys.device)
    qpos = torch.arange(S - w, S, device=keys.device)
    allowed = (pos[None, :] <= qpos[:, None])[None] & key_mask[:, None, :]  # [B, w, S]
    logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    qm = query_mask[:, None, None, :, None]
    probs = torch.where(qm, probs, torch.zeros((), device=probs.device)).nan_to_num(0.0)
    if group_reduce == "max":
        probs = probs.amax(dim=2)
    elif group_reduce == "mean":
        probs = probs.mean(dim=2)
    else:
        raise ValueError(f"group_reduce={group_reduce!r}: expected 'max' or 'mean'")
    total = probs.sum(dim=2)  # [B, Hkv, S]
    if window_reduce == "mean":
        count = query_mask.sum(dim=1).clamp(min=1).to(total.dtype)
        total = total / count[:, None, None]
    elif window_reduce != "sum":
        raise ValueError(f"window_reduce={window_reduce!r}: expected 'mean' or 'sum'")
    if prev is not None:
        total = torch.maximum(total, decay * prev.float())
    return total


# ----------------------------------------------------------------------------- Triton kernel
from ._triton import HAS_TRITON, dot_precision, next_pow2, use_triton  # noqa: E402

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _window_logits(Q, K, KS, KMASK, b, hk, t0, S,
                       stride_qb, stride_qh, stride_qw, stride_kb, stride_kh, stride_ks, stride_mb,
                       stride_sb, stride_sh, stride_ss,
                       G: tl.constexpr, W: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, scale_log2,
                       FP8: tl.constexpr):
        """log2-scaled logits of the window rows (row r = g * W + i) against keys t0..t0+BLOCK_N-1."""
        r = tl.arange(0, BLOCK_R)
        g = r // W
        i = r % W
        rmask = r < G * W
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        q = tl.load(Q + b * stride_qb + (hk * G + g)[:, None] * stride_qh + i[:, None] * stride_qw + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        t = t0 + tl.arange(0, BLOCK_N)
        tmask = t < S
        kvalid = tmask & (tl.load(KMASK + b * stride_mb + t, mask=tmask, other=0) != 0)
        k = tl.load(K + b * stride_kb + hk * stride_kh + t[:, None] * stride_ks + d[None, :],
                    mask=kvalid[:, None] & dmask[None, :], other=0.0)
        if FP8:  # codes upcast exactly; each key's scale multiplies its logit column
            ks = tl.load(KS + b * stride_sb + hk * stride_sh + t * stride_ss, mask=kvalid, other=0.0)
            qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * (ks[None, :] * scale_log2)
        else:
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        ok = kvalid[None, :] & (t[None, :] <= (S - W + i)[:, None])
        return tl.where(ok, qk, float("-inf")), t, tmask

    @triton.jit
    def _window_norm_kernel(
        Q, K, KS, KMASK, M_PART, L_PART, scale_log2,
        stride_qb, stride_qh, stride_qw, stride_kb, stride_kh, stride_ks, stride_mb, stride_sb, stride_sh, stride_ss,
        S, CHUNK, NCHUNK,
        G: tl.constexpr, W: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr,
    ):
        """Pass 1: per chunk of the context, the running max and sum of every window row's softmax."""
        b = tl.program_id(0)
        hk = tl.program_id(1)
        c = tl.program_id(2)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        lo = c * CHUNK
        hi = tl.minimum(lo + CHUNK, S)
        for t0 in range(lo, hi, BLOCK_N):
            qk, t, tmask = _window_logits(Q, K, KS, KMASK, b, hk, t0, S, stride_qb, stride_qh, stride_qw,
                                          stride_kb, stride_kh, stride_ks, stride_mb, stride_sb, stride_sh, stride_ss,
                                          G, W, D, BLOCK_D, BLOCK_R, BLOCK_N, PRECISION, scale_log2, FP8)
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(qk - m_safe[:, None]), 1)
            m_i = m_new
        r = tl.arange(0, BLOCK_R)
        off = ((b * tl.num_programs(1) + hk) * NCHUNK + c) * BLOCK_R + r
        tl.store(M_PART + off, m_i)
        tl.store(L_PART + off, l_i)

    @triton.jit
    def _window_score_kernel(
        Q, K, KS, KMASK, QMASK, M_PART, L_PART, PREV, OUT, scale_log2, decay,
        stride_qb, stride_qh, stride_qw, stride_kb, stride_kh, stride_ks, stride_mb, stride_sb, stride_sh, stride_ss,
        stride_qmb, stride_pb, stride_ph, stride_ps, stride_ob, stride_oh,
        S, NCHUNK, G: tl.constexpr, W: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
        GROUP_MAX: tl.constexpr, WINDOW_MEAN: tl.constexpr, HAS_PREV: tl.constexpr, PRECISION: tl.constexpr,
        FP8: tl.constexpr,
    ):
        """Pass 2: merge the chunks' normalisers, then one tile of keys: probabilities, max (or mean)
        over the GQA group, sum (or mean) over the valid window queries, then the optional
        decayed-global max."""
        b = tl.program_id(0)
        hk = tl.program_id(1)
        t0 = tl.program_id(2) * BLOCK_N
        r = tl.arange(0, BLOCK_R)
        i = r % W
        c = tl.arange(0, BLOCK_C)
        base = (b * tl.num_programs(1) + hk) * NCHUNK
        part = (base + c)[:, None] * BLOCK_R + r[None, :]
        cmask = (c < NCHUNK)[:, None]
        m_c = tl.load(M_PART + part, mask=cmask, other=float("-inf"))
        l_c = tl.load(L_PART + part, mask=cmask, other=0.0)
        m = tl.max(m_c, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        l = tl.sum(l_c * tl.math.exp2(m_c - m[None, :]), 0)
        qvalid = (r < G * W) & (tl.load(QMASK + b * stride_qmb + i) != 0)
        inv_l = tl.where(qvalid & (l > 0), 1.0 / l, 0.0)
        qk, t, tmask = _window_logits(Q, K, KS, KMASK, b, hk, t0, S, stride_qb, stride_qh, stride_qw,
                                      stride_kb, stride_kh, stride_ks, stride_mb, stride_sb, stride_sh, stride_ss,
                                      G, W, D, BLOCK_D, BLOCK_R, BLOCK_N, PRECISION, scale_log2, FP8)
        p = tl.math.exp2(qk - m[:, None]) * inv_l[:, None]  # masked logits give exp2(-inf) = 0
        p3 = tl.reshape(p, (BLOCK_R // W, W, BLOCK_N))
        if GROUP_MAX:
            red = tl.max(p3, 0)
        else:
            red = tl.sum(p3, 0) / G
        score = tl.sum(red, 0)
        if WINDOW_MEAN:
            w_ok = tl.load(QMASK + b * stride_qmb + tl.arange(0, W)) != 0
            score = score / tl.maximum(tl.sum(w_ok.to(tl.float32), 0), 1.0)
        if HAS_PREV:
            prev = tl.load(PREV + b * stride_pb + hk * stride_ph + t * stride_ps, mask=tmask, other=0.0)
            score = tl.maximum(score, decay * prev)
        tl.store(OUT + b * stride_ob + hk * stride_oh + t, score, mask=tmask)


def window_scores_triton(queries, keys, key_mask, query_mask, scaling, group_reduce="max", window_reduce="mean",
                         prev=None, decay: float = 1.0, key_scales=None, block_n: int = 64,
                         num_chunks: int | None = None):
    """Same as the reference; with ``prev`` it also applies ``max(score, decay * prev)`` (the G-KV update).

    Two passes split over the context: softmax normalisers per chunk, then one program per tile of
    keys, which merges the chunks' normalisers itself (no PyTorch glue between the launches)."""
    B, Hq, w, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    if Hq % Hkv or w > S:
        raise ValueError(f"window_scores: bad shapes q {tuple(queries.shape)} k {tuple(keys.shape)}")
    if group_reduce not in ("max", "mean") or window_reduce not in ("mean", "sum"):
        raise ValueError(f"window_scores: group_reduce={group_reduce!r}, window_reduce={window_reduce!r}")
    if queries.stride(-1) != 1 or keys.stride(-1) != 1:
        raise ValueError("window_scores: the head dim must be contiguous")
    if next_pow2(w) != w:
        raise ValueError(f"window_scores (Triton) needs a power-of-two window, got {w}")
    check_scales("window_scores", keys, key_scales)
    if B * Hkv * S == 0:  # nothing to score (an empty batch): the reference's empty result, no launch
        return torch.zeros(B, Hkv, S, dtype=torch.float32, device=keys.device)
    ks = key_scales if key_scales is not None else keys  # (not read without FP8)
    ks_strides = key_scales.stride() if key_scales is not None else (0, 0, 0)
    G = Hq // Hkv
    BLOCK_R = max(16, next_pow2(G * w))
    dev = keys.device
    tiles = triton.cdiv(S, block_n)
    if num_chunks is None:
        num_chunks = max(1, min(tiles, triton.cdiv(264, B * Hkv)))
    chunk = triton.cdiv(tiles, num_chunks) * block_n
    num_chunks = triton.cdiv(S, chunk)
    km = key_mask.to(torch.int8).contiguous()
    common = (queries.stride(0), queries.stride(1), queries.stride(2), keys.stride(0), keys.stride(1),
              keys.stride(2), km.stride(0), *ks_strides)
    consts = dict(G=G, W=w, D=D, BLOCK_D=next_pow2(D), BLOCK_R=BLOCK_R, BLOCK_N=block_n,
                  PRECISION=dot_precision(queries.dtype), FP8=key_scales is not None)
    LOG2E = 1.4426950408889634
    m_part = torch.empty(B, Hkv, num_chunks, BLOCK_R, dtype=torch.float32, device=dev)
    l_part = torch.empty_like(m_part)
    _window_norm_kernel[(B, Hkv, num_chunks)](
        queries, keys, ks, km, m_part, l_part, scaling * LOG2E, *common, S, chunk, num_chunks, **consts, num_warps=4,
    )
    qm = query_mask.to(torch.int8).contiguous()
    out = torch.empty(B, Hkv, S, dtype=torch.float32, device=dev)
    pv = prev if prev is not None else out
    _window_score_kernel[(B, Hkv, tiles)](
        queries, keys, ks, km, qm, m_part, l_part, pv, out, scaling * LOG2E, float(decay), *common, qm.stride(0),
        pv.stride(0), pv.stride(1), pv.stride(2), out.stride(0), out.stride(1), S, num_chunks,
        BLOCK_C=max(2, next_pow2(num_chunks)), GROUP_MAX=group_reduce == "max",
        WINDOW_MEAN=window_reduce == "mean", HAS_PREV=prev is not None, **consts, num_warps=4,
    )
    return out


def window_scores(queries, keys, key_mask, query_mask, scaling, group_reduce="max", window_reduce="mean",
                  prev=None, decay: float = 1.0, key_scales=None):
    """Window attention scores; Triton on CUDA (power-of-two windows), the reference elsewhere.
    FP8 keys come with their ``key_scales``."""
    w = queries.shape[2]
    args = (queries, keys, key_mask, query_mask, scaling, group_reduce, window_reduce, prev, decay, key_scales)
    if use_triton(queries, keys) and w == next_pow2(w):
        return window_scores_triton(*args)
    return window_scores_reference(*args)
