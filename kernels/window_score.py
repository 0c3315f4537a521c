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
) -> torch.Tensor:
    """Args:
        queries: ``[B, Hq, w, D]`` window queries.
        keys: ``[B, Hkv, S, D]`` stored keys (``S >= w``; the last ``w`` are the window's own keys).
        key_mask: ``[B, S]`` bool, False for padding.
        query_mask: ``[B, w]`` bool, False for padding queries.
        scaling: softmax scale (the model's, usually ``D ** -0.5``).
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
    if window_reduce == "sum":
        return total
    if window_reduce == "mean":
        count = query_mask.sum(dim=1).clamp(min=1).to(total.dtype)
        return total / count[:, None, None]
    raise ValueError(f"window_reduce={window_reduce!r}: expected 'mean' or 'sum'")


def window_scores(queries, keys, key_mask, query_mask, scaling, group_reduce="max", window_reduce="mean"):
    return window_scores_reference(queries, keys, key_mask, query_mask, scaling, group_reduce, window_reduce)
