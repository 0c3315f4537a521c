"""Slot addressing, KV store and KV gather on a paged pool.

A pool tensor has shape ``[num_pages, page_size, H, ...]``. Token ``j`` of a
sequence whose page table is ``table`` lives in flat slot
``table[j // page_size] * page_size + j % page_size``.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


def slot_indices(page_table: torch.Tensor, start: int, end: int, page_size: int) -> torch.Tensor:
    """Flat slot ids of token positions ``start..end-1`` for each row of ``page_table`` ([B, P]) -> [B, end-start]."""
    pos = torch.arange(start, end, device=page_table.device)
    pages = page_table[:, pos // page_size]
    return pages * page_size + (pos % page_size)


def _flat(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(cache.shape[0] * cache.shape[1], *cache.shape[2:])


def store_kv_reference(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``values`` (``[..., H, ...]`` with leading dims matching ``slots``) into ``cache`` at ``slots``."""
    _flat(cache)[slots] = values.to(cache.dtype)


def gather_kv_reference(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Read the tokens at ``slots`` ([B, S]) -> [B, S, H, ...]."""
    return _flat(cache)[slots]


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


def store_kv_triton(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor,
                    cache_b: torch.Tensor | None = None, values_b: torch.Tensor | None = None) -> None:
    """Store ``values`` (and, in the same launch, ``values_b`` into ``cache_b``: keys with values)."""
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


def store_kv(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor,
             cache_b: torch.Tensor | None = None, values_b: torch.Tensor | None = None) -> None:
    """Write new tokens into their slots (keys and values in one launch on CUDA)."""
    if use_triton(cache, slots, values):
        store_kv_triton(cache, slots, values, cache_b, values_b)
        return
    store_kv_reference(cache, slots, values)
    if cache_b is not None:
        store_kv_reference(cache_b, slots, values_b)


def gather_kv(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Dense copy of the tokens at ``slots`` (a single indexing kernel in PyTorch, on any device)."""
    return gather_kv_reference(cache, slots)
