"""Slot addressing, KV store and KV gather on a paged pool.

A pool tensor has shape ``[num_pages, page_size, H, ...]``. Token ``j`` of a
sequence whose page table is ``table`` lives in flat slot
``table[j // page_size] * page_size + j % page_size``.
"""

from __future__ import annotations

import torch


def slot_indices(page_table: torch.Tensor, start: int, end: int, page_size: int) -> torch.Tensor:
    """Flat slot ids of token positions ``start..end-1`` for each row of ``page_table`` ([B, P]) -> [B, end-start]."""
    pos = torch.arange(start, end, device=page_table.device)
    pages = page_table[:, pos // page_size]
    return pages * page_size + (pos % page_size)


def _flat(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(cache.shape[0] * cache.shape[1], *cache.shape[2:])


def store_kv_reference(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``values`` ([B, q, H, ...]) into ``cache`` at ``slots`` ([B, q])."""
    _flat(cache)[slots] = values.to(cache.dtype)


def gather_kv_reference(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Read the tokens at ``slots`` ([B, S]) -> [B, S, H, ...]."""
    return _flat(cache)[slots]


def store_kv(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    store_kv_reference(cache, slots, values)


def gather_kv(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return gather_kv_reference(cache, slots)
