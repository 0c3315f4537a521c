"""zipage.kernels: one file per operation that touches KV.

Each file holds the operation's plain-PyTorch reference (``*_reference``), which
is what runs on a CPU and what the Triton kernels are tested against, and a
public entry point that picks the implementation for the tensors it is given.
Kernels know nothing of requests, pages tables' owners or scorers' policies.
"""

from .compact import compact, compact_reference, compact_triton
from .paged_attention import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_decode_attention_triton,
    paged_prefill_attention,
    paged_prefill_attention_reference,
    paged_prefill_attention_triton,
)
from .paged_kv import gather_kv, gather_kv_reference, slot_indices, store_kv, store_kv_reference, store_kv_triton
from .pooling import pool_scores, pool_scores_reference
from .rmsnorm import fusable_rms_norms, fused_rms_norms, rms_norm, rms_norm_reference, rms_norm_triton
from .rope import fusable_rope, fused_rope, rope_reference, rope_triton
from .redundancy import lightning_redundancy_triton, redundancy_scores, redundancy_scores_reference
from .window_score import window_scores, window_scores_reference, window_scores_triton

__all__ = [
    "compact",
    "compact_reference",
    "compact_triton",
    "gather_kv",
    "gather_kv_reference",
    "lightning_redundancy_triton",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_decode_attention_triton",
    "paged_prefill_attention",
    "paged_prefill_attention_reference",
    "paged_prefill_attention_triton",
    "pool_scores",
    "pool_scores_reference",
    "redundancy_scores",
    "fusable_rms_norms",
    "fused_rms_norms",
    "rms_norm",
    "rms_norm_reference",
    "rms_norm_triton",
    "fusable_rope",
    "fused_rope",
    "rope_reference",
    "rope_triton",
    "redundancy_scores_reference",
    "slot_indices",
    "store_kv",
    "store_kv_reference",
    "store_kv_triton",
    "window_scores",
    "window_scores_reference",
    "window_scores_triton",
]
