"""zipage.kernels: one file per operation (on KV, and the fused ops of the engine's forwards).

Each file holds the operation's plain-PyTorch reference (``*_reference``), which
is what runs on a CPU and what the Triton kernels are tested against, and a
public entry point that picks the implementation for the tensors it is given.
Kernels are pure operations, tensors in and tensors out: they know nothing of models,
requests, page tables' owners or scorers' policies (which model modules the engine runs
through them is ``zipage.engine.fusion``'s business).
"""

from ._toplevel import handed_over

# (imported as zipage.kernels, or as top-level ``kernels`` where no other package has that name: see _toplevel.py)
if not handed_over(__name__, __file__):
    from .compact import compact, compact_reference, compact_triton
    from .fp8 import FP8, INT8, dequantize_reference, kv_dtype, quantize_reference
    from .exact_tail import (exact_merge, exact_merge_reference, exact_merge_triton, exact_tail_merge,
                             exact_tail_merge_reference, exact_tail_merge_triton)
    from .paged_attention import (
        exact_attention,
        merge_attention,
        paged_decode_attention,
        paged_decode_attention_reference,
        paged_decode_attention_triton,
        paged_prefill_attention,
        paged_prefill_attention_reference,
        paged_prefill_attention_triton,
    )
    from .paged_kv import (
        gather_kv,
        gather_kv_reference,
        slot_indices,
        store_kv,
        store_kv_reference,
        store_kv_span_reference,
        store_kv_triton,
    )
    from .pooling import pool_scores, pool_scores_reference
    from .redundancy import lightning_redundancy_triton, redundancy_scores, redundancy_scores_reference
    from .rmsnorm import rms_norm, rms_norm_reference, rms_norm_triton
    from .rope import rope, rope_reference, rope_triton
    from .silu_mul import silu_mul, silu_mul_reference, silu_mul_triton
    from .window_score import window_scores, window_scores_reference, window_scores_triton

__all__ = [
    "FP8",
    "INT8",
    "dequantize_reference",
    "kv_dtype",
    "quantize_reference",
    "compact",
    "compact_reference",
    "compact_triton",
    "exact_attention",
    "exact_merge",
    "exact_merge_reference",
    "exact_merge_triton",
    "exact_tail_merge",
    "exact_tail_merge_reference",
    "exact_tail_merge_triton",
    "gather_kv",
    "gather_kv_reference",
    "lightning_redundancy_triton",
    "merge_attention",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_decode_attention_triton",
    "paged_prefill_attention",
    "paged_prefill_attention_reference",
    "paged_prefill_attention_triton",
    "pool_scores",
    "pool_scores_reference",
    "redundancy_scores",
    "rms_norm",
    "rms_norm_reference",
    "rms_norm_triton",
    "rope",
    "rope_reference",
    "rope_triton",
    "redundancy_scores_reference",
    "silu_mul",
    "silu_mul_reference",
    "silu_mul_triton",
    "slot_indices",
    "store_kv",
    "store_kv_reference",
    "store_kv_span_reference",
    "store_kv_triton",
    "window_scores",
    "window_scores_reference",
    "window_scores_triton",
]
