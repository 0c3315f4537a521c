"""Order-preserving compaction of kept tokens, per (sequence, KV head).

Every head keeps the same number ``k`` of tokens, so after compaction token
slot ``j < k`` of a sequence holds, for head ``h``, the ``j``-th kept token of
that head (kept indices sorted ascending). Because ``keep[j] >= j``, one pass
that writes slot ``j`` from slot ``keep[j]``, in increasing ``j``, never
overwrites a token it still has to read: the Triton kernel does exactly that
in place, one program per (sequence, head), a barrier between each chunk's
loads and stores, and each program taking a slice of the head dim (columns
never interact, so the cursor argument holds per column). ``dst_slots`` may point elsewhere (fresh pages, when the
source pages are shared through prefix caching). ``compact_triton`` checks that ``keep`` ascends where it is
on the CPU (the interpreter); on a GPU that would take a device sync, so there it is the caller's promise (the
scorers' selection sorts it, ``compress.select_keep``): out of order, in place, it reads slots it already wrote.

FP8 pools are moved as bytes, and their scale pools (``[num_pages, page_size, H]``) are just more
caches in the list: a token's scale goes wherever its codes go.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, next_pow2, use_triton
from .fp8 import is_quantized
from .paged_kv import read_slots, write_slots

if HAS_TRITON:
    import triton
    import triton.language as tl


def _as_bytes(caches: list[torch.Tensor]) -> list[torch.Tensor]:
    """8-bit codes (FP8, INT8) are only moved, never read as numbers: move them as bytes (any op supports uint8)."""
    return [c.view(torch.uint8) if is_quantized(c) else c for c in caches]


def _check(caches, slots, keep, dst_slots):
    if keep.dim() != 3 or slots.dim() != 2 or keep.shape[0] != slots.shape[0]:
        raise ValueError(f"compact: keep {tuple(keep.shape)} must be [B, H, k] and slots {tuple(slots.shape)} [B, S]")
    k = keep.shape[-1]
    if k > slots.shape[1]:
        raise ValueError(f"compact: cannot keep {k} of {slots.shape[1]} tokens")
    if dst_slots is not None and (dst_slots.shape[0] != slots.shape[0] or dst_slots.shape[1] < k):
        raise ValueError(f"compact: dst_slots {tuple(dst_slots.shape)} must be [B, >= {k}]")
    for c in caches:
        if c.shape[2] != keep.shape[1]:
            raise ValueError(f"compact: cache with {c.shape[2]} heads, keep has {keep.shape[1]}")


def compact_reference(caches: list[torch.Tensor], slots: torch.Tensor, keep: torch.Tensor,
                      dst_slots: torch.Tensor | None = None) -> None:
    """Compact each cache in ``caches`` (``[num_pages, page_size, H, ...]``).

    Args:
        caches: pool tensors sharing the same page layout (keys, values, score state, ...).
        slots: ``[B, S]`` flat slot ids of the stored tokens, in order.
        keep: ``[B, H, k]`` indices into ``0..S-1`` of the tokens to keep, ascending per head.
        dst_slots: ``[B, >=k]`` where the kept tokens go (default: ``slots[:, :k]``, in place).
    """
    _check(caches, slots, keep, dst_slots)
    caches = _as_bytes(caches)
    k = keep.shape[-1]
    dest = (dst_slots if dst_slots is not None else slots)[:, :k]
    idx = keep.transpose(1, 2)  # [B, k, H]
    for cache in caches:
        rows = read_slots(cache, slots)  # [B, S, H, ...]
        gidx = idx.reshape(*idx.shape, *([1] * (rows.dim() - 3))).expand(-1, -1, -1, *rows.shape[3:])
        write_slots(cache, dest, rows.gather(1, gidx))


if HAS_TRITON:

    @triton.jit
    def _compact_kernel(
        A, B_, SLOTS, DST, KEEP,
        stride_a_page, stride_a_slot, stride_a_head, stride_a_w, stride_b_page, stride_b_slot, stride_b_head,
        stride_b_w, stride_sb, stride_db, stride_kb, stride_kh,
        PAGE: tl.constexpr, K: tl.constexpr, W: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_J: tl.constexpr,
        HAS_B: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        w = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)  # columns are independent: split them
        wmask = w < W
        for j0 in range(0, K, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            jmask = j < K
            src_idx = tl.load(KEEP + b * stride_kb + h * stride_kh + j, mask=jmask, other=0)
            src = tl.load(SLOTS + b * stride_sb + src_idx, mask=jmask, other=0).to(tl.int64)
            dst = tl.load(DST + b * stride_db + j, mask=jmask, other=0).to(tl.int64)
            m = jmask[:, None] & wmask[None, :]
            # a flat slot is (page, slot in page): a pool's page stride need not be PAGE slots (values stored
            # dimension-major, fp8.value_pool)
            sa = (src // PAGE) * stride_a_page + (src % PAGE) * stride_a_slot
            da = (dst // PAGE) * stride_a_page + (dst % PAGE) * stride_a_slot
            a = tl.load(A + sa[:, None] + h * stride_a_head + w[None, :] * stride_a_w, mask=m)
            if HAS_B:
                sb = (src // PAGE) * stride_b_page + (src % PAGE) * stride_b_slot
                db = (dst // PAGE) * stride_b_page + (dst % PAGE) * stride_b_slot
                bb = tl.load(B_ + sb[:, None] + h * stride_b_head + w[None, :] * stride_b_w, mask=m)
            tl.debug_barrier()  # every read of this chunk happens before any of its writes
            tl.store(A + da[:, None] + h * stride_a_head + w[None, :] * stride_a_w, a, mask=m)
            if HAS_B:
                tl.store(B_ + db[:, None] + h * stride_b_head + w[None, :] * stride_b_w, bb, mask=m)


def _as_rows(cache: torch.Tensor) -> torch.Tensor:
    """[P, page, H, ...] -> [P, page, H, W] view (``.view``: a layout that has none is refused, never copied)."""
    if cache.dim() == 3:
        return cache.unsqueeze(-1)
    if cache.dim() == 4:
        return cache
    return cache.view(*cache.shape[:3], -1)


def compact_triton(caches: list[torch.Tensor], slots: torch.Tensor, keep: torch.Tensor,
                   dst_slots: torch.Tensor | None = None, block_j: int = 64, block_w: int = 32) -> None:
    _check(caches, slots, keep, dst_slots)
    B, H, K = keep.shape
    if K == 0 or B == 0:
        return
    if keep.device.type == "cpu" and not (bool((keep[..., 1:] > keep[..., :-1]).all()) and int(keep.min()) >= 0
                                          and int(keep.max()) < slots.shape[1]):
        raise ValueError(f"compact: keep must be ascending per (sequence, head), within 0 .. {slots.shape[1] - 1}")
    slots = slots if slots.stride(-1) == 1 else slots.contiguous()  # (the kernel takes the row strides only)
    dst = dst_slots if dst_slots is not None else slots
    dst = dst if dst.stride(-1) == 1 else dst.contiguous()
    keep = keep.contiguous()
    pending = _as_bytes(caches)
    while pending:
        a = pending.pop(0)
        # pair caches of the same shape and dtype (keys with values) into one launch
        partner = next((c for c in pending if c.shape == a.shape and c.dtype == a.dtype), None)
        if partner is not None:
            pending.remove(partner)
        ra = _as_rows(a)
        rb = _as_rows(partner) if partner is not None else ra
        W = ra.shape[-1]
        bw = min(next_pow2(W), block_w)
        _compact_kernel[(B, H, triton.cdiv(W, bw))](
            ra, rb, slots, dst, keep,
            *ra.stride(), *rb.stride(),
            slots.stride(0), dst.stride(0), keep.stride(0), keep.stride(1),
            PAGE=ra.shape[1], K=K, W=W, BLOCK_W=bw, BLOCK_J=block_j, HAS_B=partner is not None, num_warps=4,
        )


def compact(caches: list[torch.Tensor], slots: torch.Tensor, keep: torch.Tensor,
            dst_slots: torch.Tensor | None = None) -> None:
    """Move the kept tokens of every cache to the front (or to ``dst_slots``), in order, per head."""
    if use_triton(slots, *caches):
        compact_triton(caches, slots, keep, dst_slots)
    else:
        compact_reference(caches, slots, keep, dst_slots)
