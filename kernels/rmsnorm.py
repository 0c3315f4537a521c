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
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_rows, n_cols, inner, x_stride_a, x_stride_b, out_stride, eps,
                         BLOCK: tl.constexpr, ROWS: tl.constexpr):
        """``ROWS`` rows per program; row ``r`` of ``x`` at ``(r // inner) * x_stride_a + (r % inner) * x_stride_b``
        (a per-head norm reads the heads of a projection's slice where they lie, without a copy)."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        cm = cols < n_cols
        m = (rows < n_rows)[:, None] & cm[None, :]
        src = (rows // inner) * x_stride_a + (rows % inner) * x_stride_b
        x = tl.load(x_ptr + src[:, None] + cols[None, :], mask=m, other=0.0)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=1) / n_cols
        y = xf * (1.0 / tl.sqrt(var + eps))[:, None]
        if x.dtype != tl.float32:  # back to the input dtype (to nearest even, as torch rounds), as the module does
            y = y.to(x.dtype, fp_downcast_rounding="rtne").to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cm, other=0.0)
        out = w.to(tl.float32)[None, :] * y
        if out_ptr.dtype.element_ty != tl.float32:
            out = out.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], out, mask=m)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The module math, in plain PyTorch."""
    xf = x.to(torch.float32)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def _row_view(x: torch.Tensor, n: int):
    """``x`` ([..., n]) as rows ``[A, inner]`` with strides ``(stride_a, stride_b)``, in place where its leading
    dims fold that way (a slice of a merged q/k/v projection viewed as heads, ``[B, T, H, D]``, folds with
    ``A = B * T``), else a contiguous copy: (tensor, rows, inner, stride_a, stride_b)."""
    inner = x.shape[-2] if x.dim() >= 2 else 1
    if x.stride(-1) == 1 and inner:
        try:
            v = x.view(-1, inner, n)
            return x, v.shape[0] * inner, inner, v.stride(0), v.stride(1)
        except RuntimeError:
            pass
    rows = x.reshape(-1, n).contiguous()
    return rows, rows.shape[0], 1, rows.stride(0), 0


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} for rows of {n}")
    src, rows, inner, stride_a, stride_b = _row_view(x, n)
    out = torch.empty((rows, n), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if rows:
        block = next_pow2(n)
        per = max(1, min(16, 2048 // block))  # short rows (per-head norms): several a program
        _rms_norm_kernel[(triton.cdiv(rows, per),)](src, weight, out, rows, n, inner, stride_a, stride_b, out.stride(0),
                                                   float(eps), BLOCK=block, ROWS=per,
                                                   num_warps=4 if block <= 2048 else 8)
    return out.view(*x.shape[:-1], n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x, weight):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)

