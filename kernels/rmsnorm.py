"""Fused RMSNorm: one kernel per call instead of half a dozen elementwise and reduction ones.

A Hugging Face decoder runs about four RMSNorms per layer (input, post-attention, and the
per-head q/k norms of Qwen3-style models), each written as half a dozen elementwise and
reduction kernels. At decode batch sizes every one of those kernels is tiny, and together
they cost a few milliseconds per step even inside a CUDA graph. ``rms_norm_triton`` does the
same math in one kernel per call:

    y = weight * (x_fp32 * rsqrt(mean(x_fp32 ** 2) + eps)).to(x.dtype)

which is the Llama/Qwen/Mistral formulation (normalise in float32, cast back to the input
dtype, then scale). Which modules of a model it may stand in for is the engine's business
(``zipage.engine.fusion``).
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, x_stride, out_stride, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < n_cols
        x = tl.load(x_ptr + row * x_stride + cols, mask=m, other=0.0)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / n_cols
        y = xf * (1.0 / tl.sqrt(var + eps))
        if x.dtype != tl.float32:  # back to the input dtype (to nearest even, as torch rounds), as the module does
            y = y.to(x.dtype, fp_downcast_rounding="rtne").to(tl.float32)
        w = tl.load(w_ptr + cols, mask=m, other=0.0)
        out = w.to(tl.float32) * y
        if out_ptr.dtype.element_ty != tl.float32:
            out = out.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(out_ptr + row * out_stride + cols, out, mask=m)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The module math, in plain PyTorch."""
    xf = x.to(torch.float32)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} for rows of {n}")
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if rows.shape[0]:
        block = next_pow2(n)
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, n, rows.stride(0), out.stride(0), float(eps),
                                           BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return out.view(*x.shape[:-1], n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x, weight):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)

