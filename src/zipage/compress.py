"""Compression of one layer: score, protect, pick top-k per KV head, compact in place.

Every head keeps the same number of tokens, so one page table per sequence
still serves all layers and heads after compression.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import compact, gather_kv, store_kv
from .scoring import Scorer, ScoreInputs


def select_keep(
    scores: torch.Tensor,
    key_mask: torch.Tensor,
    k: int,
    window: int,
    sinks: int = 0,
) -> torch.Tensor:
    """Indices of the ``k`` tokens to keep per (row, head), ascending.

    The last ``window`` tokens and the first ``sinks`` real tokens are always kept;
    padding (``key_mask`` False) goes first, so real tokens never lose their place to it.

    Args:
        scores: ``[B, H, S]``; key_mask: ``[B, S]`` bool.
    Returns:
        ``[B, H, k]`` int64.
    """
    B, H, S = scores.shape
    if not 0 < k <= S:
        raise ValueError(f"select_keep: k={k} must lie in 1..{S}")
    s = scores.float().clone()
    if window > 0:
        s[..., max(S - window, 0) :] = float("inf")
    if sinks > 0:
        rank = key_mask.long().cumsum(dim=1)
        s = s.masked_fill((key_mask & (rank <= sinks))[:, None, :], float("inf"))
    s = s.masked_fill(~key_mask[:, None, :], float("-inf"))
    keep = torch.topk(s, k, dim=-1, sorted=False).indices
    return keep.sort(dim=-1).values


@dataclass
class LayerPages:
    """The pool tensors of one layer: keys, values and (for stateful scorers) the score state."""

    keys: torch.Tensor  # [num_pages, page_size, H, D]
    values: torch.Tensor  # [num_pages, page_size, H, D]
    state: torch.Tensor | None = None  # [num_pages, page_size, H] float32


def compress_layer(
    pages: LayerPages,
    slots: torch.Tensor,
    key_mask: torch.Tensor,
    queries: torch.Tensor | None,
    scorer: Scorer,
    *,
    k: int,
    window: int,
    sinks: int,
    scaling: float,
    page_size: int,
    first: bool,
    layer_idx: int,
) -> torch.Tensor:
    """Compress the ``S = slots.shape[1]`` stored tokens of each row down to ``k``, in place.

    Returns the ``[B, H, k]`` kept indices (into ``0..S-1``).
    """
    keys = gather_kv(pages.keys, slots).transpose(1, 2)  # [B, H, S, D]
    values = gather_kv(pages.values, slots).transpose(1, 2) if scorer.needs_values else None
    state = None
    if scorer.stateful and pages.state is not None:
        state = gather_kv(pages.state, slots).transpose(1, 2)
    S = slots.shape[1]
    query_mask = key_mask[:, S - queries.shape[2] :] if queries is not None else None
    inputs = ScoreInputs(
        keys=keys,
        values=values,
        queries=queries,
        key_mask=key_mask,
        query_mask=query_mask,
        scaling=scaling,
        page_size=page_size,
        state=state,
        first=first,
        layer_idx=layer_idx,
    )
    scores, new_state = scorer(inputs)
    caches = [pages.keys, pages.values]
    if pages.state is not None and new_state is not None:
        store_kv(pages.state, slots, new_state.transpose(1, 2).float())
        caches.append(pages.state)
    keep = select_keep(scores, key_mask, k, window, sinks)
    compact(caches, slots, keep)
    return keep
