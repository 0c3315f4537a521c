"""Prefill through PyTorch's own FlashAttention kernel, where it serves the engine's step as is.

The paged prefill kernels (``paged_attention.py``, ``paged_prefill.py``) read every key and value
from the pool. When a step's prefill sequences have nothing stored before this step (no cached
prefix, no earlier chunk), their keys and values are exactly the step's own, already packed
``[T, H_kv, D]`` beside the queries: the attention is a plain variable-length causal attention
over them, which PyTorch's built-in FlashAttention forward (``aten::_flash_attention_forward``,
the kernel SDPA itself runs) does in one launch for the whole batch, GQA included, with no gather.
The step still stores its keys and values in the pool for the later steps; only where this step's
prefill reads them from changes.

``mode="paged"`` runs the same kernel over the pool through its ``block_table`` argument (torch
builds that have it, pages of a multiple of 256 tokens): prefix-cached and chunked steps too.

Both are launch choices of ``paged_attention.paged_prefill_attention`` (``ZIPAGE_PREFILL_KERNEL``);
``applies`` says when one may run, and everything else (CPU, 8-bit pages read back, sliding
windows, sink logits, logit softcapping, a head dim the kernel lacks) stays with the Triton kernels
and the PyTorch references.
"""

from __future__ import annotations

import functools

import torch

_HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def op_arguments() -> frozenset[str]:
    """The argument names of this torch's ``aten::_flash_attention_forward`` (empty where it has none)."""
    try:
        schema = torch.ops.aten._flash_attention_forward.default._schema
    except (AttributeError, RuntimeError):
        return frozenset()
    return frozenset(a.name for a in schema.arguments)


def applies(q: torch.Tensor, mode: str, *, page_size: int = 0, pool_dtype: torch.dtype | None = None,
            window: int | None = None, sinks=None, softcap: float | None = None, kv_starts=None) -> bool:
    """Whether the FlashAttention prefill can run this call (``mode``: ``fresh`` or ``paged``)."""
    D = q.shape[-1]
    if not (q.is_cuda and q.dtype in _HALF and D % 8 == 0 and D <= 256):
        return False
    if window or sinks is not None or softcap or kv_starts is not None or "cum_seq_q" not in op_arguments():
        return False
    if mode == "paged":  # reads the pool: same dtype as the queries, pages FlashAttention can walk
        return "block_table" in op_arguments() and pool_dtype == q.dtype and page_size % 256 == 0
    return mode == "fresh"


def _run(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, **extra) -> torch.Tensor:
    out = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                                                  scale=float(scale), **extra)
    return out[0]


def flash_prefill_fresh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                        max_len: int, scale: float) -> torch.Tensor:
    """Causal attention of packed sequences over their own keys and values.

    ``q`` ``[T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]`` (the same tokens), ``cu_seqlens`` ``[B + 1]``
    int32 offsets, ``max_len`` the longest sequence (a host int). Returns ``[T, Hq, D]``."""
    if q.shape[0] != k.shape[0] or k.shape != v.shape or q.shape[1] % k.shape[1]:
        raise ValueError(f"flash_prefill_fresh: queries {tuple(q.shape)} and keys/values {tuple(k.shape)} / "
                         f"{tuple(v.shape)} must be the same tokens, with query heads a multiple of KV heads")
    k, v = k.to(q.dtype), v.to(q.dtype)
    cu = cu_seqlens.to(torch.int32)
    return _run(q, k, v, cu, cu, int(max_len), int(max_len), scale)


def flash_prefill_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, scale: float, max_q_len: int,
                        max_kv_len: int) -> torch.Tensor:
    """Packed queries, each sequence's the last of its ``kv_lens`` stored tokens, over the paged pool
    (``[num_pages, page_size, Hkv, D]``, page size a multiple of 256) through ``block_table``."""
    lens = kv_lens.to(torch.int32)
    cu_k = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    return _run(q, k_cache, v_cache, cu_seqlens_q.to(torch.int32), cu_k, int(max_q_len), int(max_kv_len), scale,
                block_table=page_table.to(torch.int32), seqused_k=lens)
