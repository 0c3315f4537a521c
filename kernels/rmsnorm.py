"""Fused RMSNorm for the engine's forwards.

A Hugging Face decoder runs about four RMSNorms per layer (input, post-attention, and the
per-head q/k norms of Qwen3-style models), each written as half a dozen elementwise and
reduction kernels. At decode batch sizes every one of those kernels is tiny, and together
they cost a few milliseconds per step even inside a CUDA graph. ``rms_norm_triton`` does the
same math in one kernel per call:

    y = weight * (x_fp32 * rsqrt(mean(x_fp32 ** 2) + eps)).to(x.dtype)

which is the Llama/Qwen/Mistral formulation (normalise in float32, cast back to the input
dtype, then scale). ``fusable_rms_norms`` finds the modules of a model that compute exactly
this, by checking each distinct norm class against the kernel on a probe input (so a
variant such as ``x * (1 + weight)`` is left alone), and ``fused_rms_norms`` swaps their
forwards for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


def _eps(module: torch.nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def fusable_rms_norms(model: torch.nn.Module, kernel=rms_norm_triton) -> list[torch.nn.Module]:
    """The RMSNorm modules of ``model`` that ``kernel`` reproduces.

    A candidate is a module whose class name ends in ``RMSNorm`` with a 1-D ``weight`` and a
    float epsilon. Each (class, width, dtype) is checked once on a probe input against the
    module's own forward; a class that disagrees (another formula) is not fused."""
    verdict: dict[tuple, bool] = {}
    found = []
    for module in model.modules():
        if not type(module).__name__.endswith("RMSNorm"):
            continue
        w, eps = getattr(module, "weight", None), _eps(module)
        if not isinstance(w, torch.Tensor) or w.dim() != 1 or eps is None or "forward" in vars(module):
            continue
        key = (type(module), w.shape[0], w.dtype, w.device)
        if key not in verdict:
            g = torch.Generator(device="cpu").manual_seed(0)
            probe = (torch.randn(8, w.shape[0], generator=g) * 3).to(w.device, w.dtype)
            with torch.no_grad():
                ref, got = module(probe), kernel(probe, w, eps)
            tol = 1e-5 if w.dtype == torch.float32 else 2e-2
            verdict[key] = ref.dtype == got.dtype and ref.shape == got.shape and torch.allclose(
                ref.float(), got.float(), rtol=tol, atol=tol)
        if verdict[key]:
            found.append(module)
    return found


@contextlib.contextmanager
def fused_rms_norms(modules: list[torch.nn.Module], kernel=rms_norm_triton) -> Iterator[None]:
    """Run ``modules`` through ``kernel`` inside the block; their own forwards come back after."""
    for module in modules:
        module.forward = _fused_forward(module, kernel)
    try:
        yield
    finally:
        for module in modules:
            vars(module).pop("forward", None)


def _fused_forward(module: torch.nn.Module, kernel):
    w, eps = module.weight, _eps(module)

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return kernel(hidden_states, w, eps)

    return forward
