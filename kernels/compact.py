"""Order-preserving compaction of kept tokens, per (sequence, KV head).

Every head keeps the same number ``k`` of tokens, so after compaction token
slot ``j < k`` of a sequence holds, for head ``h``, the ``j``-th kept token of
that head (kept indices sorted ascending). Because ``keep[j] >= j``, a single
forward pass that writes slot ``j`` from slot ``keep[j]`` never overwrites a
token it still has to read: the Triton kernel does exactly that in place.
"""

from __future__ import annotations

import torch

from .paged_kv import _flat


def compact_reference(caches: list[torch.Tensor], slots: torch.Tensor, keep: torch.Tensor) -> None:
    """Compact each cache in ``caches`` (``[num_pages, page_size, H, ...]``).

    Args:
        caches: pool tensors sharing the same page layout (keys, values, score state, ...).
        slots: ``[B, S]`` flat slot ids of the stored tokens, in order.
        keep: ``[B, H, k]`` indices into ``0..S-1`` of the tokens to keep, ascending per head.
    """
    if keep.dim() != 3 or slots.dim() != 2 or keep.shape[0] != slots.shape[0]:
        raise ValueError(f"compact: keep {tuple(keep.shape)} must be [B, H, k] and slots {tuple(slots.shape)} [B, S]")
    k = keep.shape[-1]
    if k > slots.shape[1]:
        raise ValueError(f"compact: cannot keep {k} of {slots.shape[1]} tokens")
    dest = slots[:, :k]
    idx = keep.transpose(1, 2)  # [B, k, H]
    for cache in caches:
        flat = _flat(cache)
        rows = flat[slots]  # [B, S, H, ...]
        gidx = idx.reshape(*idx.shape, *([1] * (rows.dim() - 3))).expand(-1, -1, -1, *rows.shape[3:])
        flat[dest] = rows.gather(1, gidx)


def compact(caches: list[torch.Tensor], slots: torch.Tensor, keep: torch.Tensor) -> None:
    compact_reference(caches, slots, keep)
