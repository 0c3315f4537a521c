"""Compression: score, protect, pick top-k per KV head, compact in place (one layer or a stack of layers).

Every head keeps the same number of tokens, so one page table per sequence
still serves all layers and heads after compression.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import ZipageConfig
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
    padding (``key_mask`` False) goes first, so real tokens never lose their place to it,
    whatever the scores (an infinite or NaN score ranks among the real tokens). Among equal scores
    the earlier tokens are kept.

    Args:
        scores: ``[B, H, S]``; key_mask: ``[B, S]`` bool.
    Returns:
        ``[B, H, k]`` int64.
    """
    B, H, S = scores.shape
    if not 0 < k <= S:
        raise ValueError(f"select_keep: k={k} must lie in 1..{S}")
    # Scores a scorer may return as +-inf or NaN stay strictly between the protected tokens (+inf)
    # and padding (-inf): NaN and -inf rank as the lowest real score, +inf as the highest.
    big = torch.finfo(torch.float32).max / 2
    s = torch.nan_to_num(scores.float(), nan=-big, posinf=big, neginf=-big).clamp_(-big, big)
    if window > 0:
        s[..., max(S - window, 0) :] = float("inf")
    if sinks > 0:
        rank = key_mask.long().cumsum(dim=1)
        s = s.masked_fill((key_mask & (rank <= sinks))[:, None, :], float("inf"))
    s = s.masked_fill(~key_mask[:, None, :], float("-inf"))
    # exactly equal scores keep the earlier tokens: a stable sort, not topk, whose choice among ties is unspecified
    # and moves with the other scores (a repeated token's key norm is the same to the last bit, so a knorm
    # compression of one request would otherwise depend on the requests batched beside it)
    keep = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
    return keep.sort(dim=-1).values


@dataclass
class LayerPages:
    """Pool tensors of one layer (``[num_pages, page_size, H, D]``) or of a stack of layers
    (``[L, num_pages, page_size, H, D]``): keys, values and, for stateful scorers, the score state
    (``[..., num_pages, page_size, H]`` float32). FP8 keys and values come with their scale pools
    (``[..., num_pages, page_size, H]`` float32), which compaction moves with them; ``dtype`` is
    what they read back as for a scorer that does not read FP8 (the model's dtype)."""

    keys: torch.Tensor
    values: torch.Tensor
    state: torch.Tensor | None = None
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32


def compress_layers(
    pools: LayerPages,
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
    layer_idx: int = -1,
    dst_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compress ``L`` stacked layers of ``B`` sequences at once, from ``S = slots.shape[1]`` stored
    tokens down to ``k``: one gather, one scoring pass, one top-k and one compaction for all of
    them (a layer is just more batch rows for the kernels). In place, or into ``dst_slots``
    (fresh pages, when the source pages may be shared with other sequences: they are only read).

    Args:
        pools: stacked pools, ``[L, num_pages, page_size, H, D]`` (contiguous in their layer slice).
        slots: ``[B, S]`` flat slot ids of the stored tokens (one page table serves every layer).
        key_mask: ``[L, B, S]`` bool, False for padding.
        queries: ``[L, B, H_q, w, D]`` window queries, or None for scorers that need none.
        first: True at the sequences' first compression (a stateful scorer then has no history).
        dst_slots: ``[B, >= k]`` where the kept tokens go (default: the first ``k`` of ``slots``).
    Returns:
        ``[L, B, H, k]`` kept indices (into ``0..S-1``).
    """
    L, P, page = pools.keys.shape[:3]
    B, S = slots.shape
    offsets = torch.arange(L, device=slots.device)[:, None, None] * (P * page)
    rows = (slots[None] + offsets).reshape(L * B, S)
    dst_rows = rows if dst_slots is None else (dst_slots[None] + offsets).reshape(L * B, dst_slots.shape[1])
    flat = lambda t: t.view(L * P, *t.shape[2:])  # noqa: E731  (layer and page merge in every pool layout)
    keys_pool, values_pool = flat(pools.keys), flat(pools.values)
    state_pool = flat(pools.state) if pools.state is not None else None
    keys = gather_kv(keys_pool, rows).transpose(1, 2)  # [L*B, H, S, D]
    values = gather_kv(values_pool, rows).transpose(1, 2) if scorer.needs_values else None
    scale_pools = []
    key_scales = value_scales = None
    if pools.key_scales is not None:  # FP8: codes and their scales, [L*B, H, S]
        scale_pools = [flat(pools.key_scales), flat(pools.value_scales)]
        key_scales = gather_kv(scale_pools[0], rows).transpose(1, 2)
        value_scales = gather_kv(scale_pools[1], rows).transpose(1, 2) if values is not None else None
    state = None
    if scorer.stateful and state_pool is not None and not first:
        state = gather_kv(state_pool, rows).transpose(1, 2)
    mask = key_mask.reshape(L * B, S)
    q = queries.reshape(L * B, *queries.shape[2:]) if queries is not None else None
    inputs = ScoreInputs(
        keys=keys,
        values=values,
        queries=q,
        key_mask=mask,
        query_mask=mask[:, S - q.shape[2] :] if q is not None else None,
        scaling=scaling,
        page_size=page_size,
        state=state,
        first=first,
        layer_idx=layer_idx,
        key_scales=key_scales,
        value_scales=value_scales,
    )
    scores, new_state = scorer(inputs, pools.dtype)
    keep = select_keep(scores, mask, k, window, sinks)
    compact([keys_pool, values_pool, *scale_pools], rows, keep, None if dst_slots is None else dst_rows)
    if state_pool is not None:
        # The state of the kept tokens goes straight to their new slots (never into the source pages).
        kept_state = new_state.gather(2, keep) if new_state is not None else torch.zeros_like(keep, dtype=torch.float32)
        store_kv(state_pool, dst_rows[:, :k], kept_state.transpose(1, 2).float())
    return keep.view(L, B, *keep.shape[1:])


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
    """Compress one layer (pools ``[num_pages, page_size, H, D]``); returns ``[B, H, k]`` kept indices."""
    lift = lambda t: t[None] if t is not None else None  # noqa: E731
    one = LayerPages(pages.keys[None], pages.values[None], lift(pages.state), lift(pages.key_scales),
                     lift(pages.value_scales), pages.dtype)
    keep = compress_layers(
        one, slots, key_mask[None], queries[None] if queries is not None else None, scorer, k=k, window=window,
        sinks=sinks, scaling=scaling, page_size=page_size, first=first, layer_idx=layer_idx,
    )
    return keep[0]


def attention_scale(scaling: float | None, head_dim: int) -> float:
    """The softmax scale of an attention call: the ``scaling`` its module passed, or ``head_dim ** -0.5``
    when it passed none (what transformers' attention functions then use)."""
    return head_dim**-0.5 if scaling is None else float(scaling)


def layer_batches(cfg: ZipageConfig, scales: Sequence[float | None], head_dim: int,
                  bytes_per_layer: int) -> list[tuple[int, int, float]]:
    """How the layers of a compression are batched: ``(start, stop, scale)`` for each run of
    consecutive layers ``start..stop-1`` compressed in one ``compress_layers`` call, with the softmax
    scale its scorer gets. ``generate()`` (``ZipageCache``) and the engine both batch this way.

    A batch holds at most ``cfg.layer_stride`` layers; with ``layer_stride`` None, as many as
    ``cfg.compress_scratch_bytes`` of gathered keys allow (``bytes_per_layer`` each; at least one).
    ``scales[l]`` is the scale layer ``l``'s attention used at its last forward (the ``scaling`` its
    module passed); a layer whose attention was not seen takes ``head_dim ** -0.5``
    (``attention_scale``). A batch takes one scale, so it ends where the scale changes: layers with
    their own scales are scored apart.
    """
    L = len(scales)
    stride = cfg.layer_stride
    if stride is None:  # as many layers as the scratch budget allows (their gathered keys dominate)
        stride = max(1, min(L, cfg.compress_scratch_bytes // max(bytes_per_layer, 1)))
    scale = [attention_scale(s, head_dim) for s in scales]
    batches, start = [], 0
    for stop in range(1, L + 1):
        if stop == L or stop - start == stride or scale[stop] != scale[start]:
            batches.append((start, stop, scale[start]))
            start = stop
    return batches
