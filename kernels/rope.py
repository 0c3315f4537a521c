"""Fused rotary position embedding for the engine's forwards.

transformers applies RoPE as ``q * cos + rotate_half(q) * sin`` (and the same for k): a
slice, a negation, a concatenation, two products and a sum per tensor, each its own kernel.
``rope_triton`` computes one tensor's rotation in a single kernel, in float32 with one rounding
at the end (the eager ops round each product and the sum to the input dtype, so in half
precision the two differ by at most about one unit in the last place; in float32 they agree
to rounding).
``fusable_rope`` checks a model's modeling module's ``apply_rotary_pos_emb`` against the
kernel on a probe and ``fused_rope`` swaps it for the duration of a ``with`` block; calls the
kernel does not cover (other broadcast layouts, mixed dtypes) go to the original function.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from types import ModuleType

import torch

from ._triton import HAS_TRITON, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, T, sxb, sxh, sxt, sob, soh, sot, scb, sct,
                     HALF: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        t = pid % T
        h = (pid // T) % H
        b = pid // (T * H)
        i = tl.arange(0, BLOCK)
        m = i < HALF
        x = x_ptr + b * sxb + h * sxh + t * sxt
        c = cos_ptr + b * scb + t * sct
        s = sin_ptr + b * scb + t * sct
        dt = x_ptr.dtype.element_ty
        x1 = tl.load(x + i, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(x + HALF + i, mask=m, other=0.0).to(tl.float32)
        c1 = tl.load(c + i, mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(c + HALF + i, mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(s + i, mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(s + HALF + i, mask=m, other=0.0).to(tl.float32)
        # rotate_half(x) = cat(-x2, x1); products and sum in float32, one rounding at the end
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
        o = out_ptr + b * sob + h * soh + t * sot
        tl.store(o + i, o1.to(dt), mask=m)
        tl.store(o + HALF + i, o2.to(dt), mask=m)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with x ``[B, H, T, D]`` and cos/sin ``[B or 1, T, D]``."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rot * sin.unsqueeze(1)


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    B, H, T, D = x.shape
    if D % 2 or cos.shape not in ((B, T, D), (1, T, D)) or sin.shape != cos.shape or cos.stride() != sin.stride():
        raise ValueError(f"rope: x {tuple(x.shape)} with cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if x.stride(-1) != 1 or cos.stride(-1) != 1:
        raise ValueError("rope: the last dimension must be contiguous")
    out = torch.empty_like(x)  # same strides as x (dense inputs)
    if out.stride(-1) != 1:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        _rope_kernel[(B * H * T,)](x, cos, sin, out, H, T, x.stride(0), x.stride(1), x.stride(2), out.stride(0),
                                   out.stride(1), out.stride(2), cos.stride(0) if cos.shape[0] == B else 0, cos.stride(1), HALF=D // 2,
                                   BLOCK=next_pow2(D // 2), num_warps=1)
    return out


def _covered(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return (t.dim() == 4 and cos.dim() == 3 and t.dtype == cos.dtype == sin.dtype and t.shape[-1] % 2 == 0
            and cos.shape[1:] == (t.shape[2], t.shape[3]) and cos.shape[0] in (1, t.shape[0]) and sin.shape == cos.shape
            and cos.stride() == sin.stride() and t.stride(-1) == 1 and cos.stride(-1) == 1)


def make_fused_apply(original, kernel=rope_triton):
    """An ``apply_rotary_pos_emb`` that runs ``kernel`` where it applies and ``original`` elsewhere."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze = kwargs.get("unsqueeze_dim", args[0] if args else 1)
        if unsqueeze != 1 or len(args) > 1 or set(kwargs) - {"unsqueeze_dim"} \
                or not (_covered(q, cos, sin) and _covered(k, cos, sin)):
            return original(q, k, cos, sin, *args, **kwargs)
        return kernel(q, cos, sin), kernel(k, cos, sin)

    apply_rotary_pos_emb.zipage_fused = True
    return apply_rotary_pos_emb


def fusable_rope(model: torch.nn.Module, kernel=rope_triton) -> ModuleType | None:
    """The modeling module of ``model`` when its ``apply_rotary_pos_emb`` matches ``kernel``."""
    module = sys.modules.get(type(model).__module__)
    original = getattr(module, "apply_rotary_pos_emb", None)
    if module is None or not callable(original) or getattr(original, "zipage_fused", False):
        return None
    cfg = model.config.get_text_config(decoder=True)
    p = next(model.parameters())
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if D % 2:
        return None
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k = (torch.randn(2, h, 3, D, generator=g).to(p.device, p.dtype) for h in (4, 2))
    angle = torch.rand(2, 3, D // 2, generator=g) * 6
    cos = torch.cat([angle.cos()] * 2, -1).to(p.device, p.dtype)
    sin = torch.cat([angle.sin()] * 2, -1).to(p.device, p.dtype)
    try:
        with torch.no_grad():
            ref, got = original(q, k, cos, sin), (kernel(q, cos, sin), kernel(k, cos, sin))
    except Exception:  # another signature or layout: leave it alone
        return None
    tol = 1e-5 if p.dtype == torch.float32 else 1e-2
    ok = all(r.shape == o.shape and r.dtype == o.dtype and torch.allclose(r.float(), o.float(), rtol=tol, atol=tol)
             for r, o in zip(ref, got))
    return module if ok else None


@contextlib.contextmanager
def fused_rope(module: ModuleType | None, kernel=rope_triton) -> Iterator[None]:
    """Inside the block, ``module.apply_rotary_pos_emb`` runs the fused kernel."""
    if module is None:
        yield
        return
    original = module.apply_rotary_pos_emb
    module.apply_rotary_pos_emb = make_fused_apply(original, kernel)
    try:
        yield
    finally:
        module.apply_rotary_pos_emb = original
