"""Window attention score: how much the last ``w`` queries attend to each stored token.

For each sequence and KV head: the window queries (the last ``w`` tokens,
post-RoPE) attend to every stored key with a softmax over the whole stored
context, causal inside the window (query ``i`` sits at stored index
``S - w + i``); the probabilities are reduced over the query heads of a GQA
group (max or mean) and then over the valid window queries (mean or sum).
"""

from __future__ import annotations

import torch


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
) -> torch.Tensor:
    """Args:
        queries: ``[B, Hq, w, D]`` window queries.
        keys: ``[B, Hkv, S, D]`` stored keys (``S >= w``; the last ``w`` are the window's own keys).
        key_mask: ``[B, S]`` bool, False for padding.
        query_mask: ``[B, w]`` bool, False for padding queries.
        scaling: softmax scale (the model's, usually ``D ** -0.5``).
        prev, decay: when ``prev`` ([B, Hkv, S]) is given, return ``max(score, decay * prev)``
            (the decayed global score of G-KV), fused in the kernel.
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
    q = queries.float().view(B, Hkv, G, w, D)
    logits = torch.einsum("bhgwd,bhsd->bhgws", q, keys.float()) * scaling
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
    def _window_score_kernel(
        Q, K, KMASK, QMASK, PREV, OUT,
        scale_log2, decay,
        stride_qb, stride_qh, stride_qw,
        stride_kb, stride_kh, stride_ks,
        stride_mb, stride_qmb,
        stride_pb, stride_ph, stride_ob, stride_oh,
        S, G: tl.constexpr, W: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
        GROUP_MAX: tl.constexpr, WINDOW_MEAN: tl.constexpr, HAS_PREV: tl.constexpr, PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        hk = tl.program_id(1)
        r = tl.arange(0, BLOCK_R)  # row r = g * W + i
        g = r // W
        i = r % W
        rmask = r < G * W
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        q = tl.load(Q + b * stride_qb + (hk * G + g)[:, None] * stride_qh + i[:, None] * stride_qw + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        qvalid = tl.load(QMASK + b * stride_qmb + i, mask=rmask, other=0) != 0
        qpos = S - W + i
        offs = tl.arange(0, BLOCK_N)
        # pass 1: softmax normalisers of every (head, window query) row
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        for t0 in range(0, S, BLOCK_N):
            t = t0 + offs
            kvalid = (t < S) & (tl.load(KMASK + b * stride_mb + t, mask=t < S, other=0) != 0)
            k = tl.load(K + b * stride_kb + hk * stride_kh + t[:, None] * stride_ks + d[None, :],
                        mask=kvalid[:, None] & dmask[None, :], other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            ok = kvalid[None, :] & (t[None, :] <= qpos[:, None])
            qk = tl.where(ok, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(qk - m_safe[:, None]), 1)
            m_i = m_new
        m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
        inv_l = tl.where((l_i > 0) & qvalid & rmask, 1.0 / l_i, 0.0)
        if WINDOW_MEAN:
            count = tl.sum(tl.where((g == 0) & rmask & qvalid, 1.0, 0.0), 0)
            inv_count = 1.0 / tl.maximum(count, 1.0)
        else:
            inv_count = 1.0
        # pass 2: probabilities, reduced over the GQA group then over the window
        for t0 in range(0, S, BLOCK_N):
            t = t0 + offs
            tmask = t < S
            kvalid = tmask & (tl.load(KMASK + b * stride_mb + t, mask=tmask, other=0) != 0)
            k = tl.load(K + b * stride_kb + hk * stride_kh + t[:, None] * stride_ks + d[None, :],
                        mask=kvalid[:, None] & dmask[None, :], other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            ok = kvalid[None, :] & (t[None, :] <= qpos[:, None])
            p = tl.where(ok, tl.math.exp2(qk - m_fin[:, None]) * inv_l[:, None], 0.0)  # [BLOCK_R, BLOCK_N]
            p3 = tl.reshape(p, (BLOCK_R // W, W, BLOCK_N))
            if GROUP_MAX:
                red = tl.max(p3, 0)
            else:
                red = tl.sum(p3, 0) / G
            score = tl.sum(red, 0) * inv_count  # [BLOCK_N]
            if HAS_PREV:
                prev = tl.load(PREV + b * stride_pb + hk * stride_ph + t, mask=tmask, other=0.0)
                score = tl.maximum(score, decay * prev)
            tl.store(OUT + b * stride_ob + hk * stride_oh + t, score, mask=tmask)


def window_scores_triton(queries, keys, key_mask, query_mask, scaling, group_reduce="max", window_reduce="mean",
                         prev=None, decay: float = 1.0, block_n: int = 64):
    """Same as the reference; with ``prev`` it also applies ``max(score, decay * prev)`` (the G-KV update)."""
    B, Hq, w, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    if Hq % Hkv or w > S:
        raise ValueError(f"window_scores: bad shapes q {tuple(queries.shape)} k {tuple(keys.shape)}")
    if group_reduce not in ("max", "mean") or window_reduce not in ("mean", "sum"):
        raise ValueError(f"window_scores: group_reduce={group_reduce!r}, window_reduce={window_reduce!r}")
    if queries.stride(-1) != 1 or keys.stride(-1) != 1:
        raise ValueError("window_scores: the head dim must be contiguous")
    G = Hq // Hkv
    w_pad = next_pow2(w)
    if w_pad != w:
        raise ValueError(f"window_scores (Triton) needs a power-of-two window, got {w}")
    out = torch.empty(B, Hkv, S, dtype=torch.float32, device=keys.device)
    km = key_mask.to(torch.int8).contiguous()
    qm = query_mask.to(torch.int8).contiguous()
    pv = prev if prev is not None else out
    LOG2E = 1.4426950408889634
    _window_score_kernel[(B, Hkv)](
        queries, keys, km, qm, pv, out,
        scaling * LOG2E, float(decay),
        queries.stride(0), queries.stride(1), queries.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        km.stride(0), qm.stride(0),
        pv.stride(0), pv.stride(1), out.stride(0), out.stride(1),
        S, G=G, W=w, D=D, BLOCK_D=next_pow2(D), BLOCK_R=max(16, next_pow2(G * w)), BLOCK_N=block_n,
        GROUP_MAX=group_reduce == "max", WINDOW_MEAN=window_reduce == "mean", HAS_PREV=prev is not None,
        PRECISION=dot_precision(queries.dtype), num_warps=4,
    )
    return out


def window_scores(queries, keys, key_mask, query_mask, scaling, group_reduce="max", window_reduce="mean",
                  prev=None, decay: float = 1.0):
    """Window attention scores; Triton on CUDA (power-of-two windows), the reference elsewhere."""
    w = queries.shape[2]
    args = (queries, keys, key_mask, query_mask, scaling, group_reduce, window_reduce, prev, decay)
    if use_triton(queries, keys) and w == next_pow2(w):
        return window_scores_triton(*args)
    return window_scores_reference(*args)
