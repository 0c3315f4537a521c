"""Fused SiLU gate: ``silu(gate) * up`` from the merged gate/up output, in one kernel.

A SiLU-gated MLP computes ``down(silu(gate(x)) * up(x))``. When its gate and up projections run
as one GEMM (``zipage.engine.fusion`` merges them), the output ``h`` holds the gate in its first
half and up in its second; ``silu_mul_triton`` computes ``silu(h[..., :n]) * h[..., n:]`` in one
kernel instead of two, with the module's roundings (``silu`` rounded to the input dtype, then the
product rounded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _silu_mul_kernel(h_ptr, out_ptr, n, h_stride, out_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < n
        g = tl.load(h_ptr + row * h_stride + cols, mask=m, other=0.0)
        u = tl.load(h_ptr + row * h_stride + n + cols, mask=m, other=0.0).to(tl.float32)
        gf = g.to(tl.float32)
        s = gf / (1.0 + tl.exp(-gf))
        if g.dtype != tl.float32:  # silu's output is rounded to the input dtype, as the module's is
            s = s.to(g.dtype, fp_downcast_rounding="rtne").to(tl.float32)
        out = s * u
        tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
                 mask=m)


def silu_mul_reference(h: torch.Tensor) -> torch.Tensor:
    """``silu(h[..., :n]) * h[..., n:]`` for ``h`` of width ``2n``, in plain PyTorch."""
    n = h.shape[-1] // 2
    return F.silu(h[..., :n]) * h[..., n:]


def silu_mul_triton(h: torch.Tensor) -> torch.Tensor:
    if h.shape[-1] % 2:
        raise ValueError(f"silu_mul: the last dimension ({h.shape[-1]}) must hold gate and up halves")
    n = h.shape[-1] // 2
    rows = h.reshape(-1, 2 * n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], n, dtype=h.dtype, device=h.device)
    if rows.shape[0] and n:
        block = 1024
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(n, block))](rows, out, n, rows.stride(0), out.stride(0),
                                                               BLOCK=block, num_warps=4)
    return out.view(*h.shape[:-1], n)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    if use_triton(h):
        return silu_mul_triton(h)
    return silu_mul_reference(h)

