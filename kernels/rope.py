"""Fused rotary position embedding: one kernel per rotated tensor.

transformers applies RoPE as ``q * cos + rotate_half(q) * sin`` (and the same for k): a
slice, a negation, a concatenation, two products and a sum per tensor, each its own kernel.
``rope_triton`` computes one tensor's rotation in a single kernel, in float32 with one rounding
at the end (the eager ops round each product and the sum to the input dtype, so in half
precision the two differ by at most about one unit in the last place; in float32 they agree
to rounding). Where a model's ``apply_rotary_pos_emb`` may be swapped for it is the engine's
business (``zipage.engine.fusion``).
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, T, sxb, sxh, sxt, sob, soh, sot, scb, sct,
                     HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_H: tl.constexpr):
        """One token (``b``, ``t``) and ``BLOCK_H`` of its heads a program: its cos/sin rows read once."""
        pid = tl.program_id(0).to(tl.int64)
        t = pid % T
        b = pid // T
        h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
        i = tl.arange(0, BLOCK)
        im = i < HALF
        m = (h < H)[:, None] & im[None, :]
        c = cos_ptr + b * scb + t * sct
        s = sin_ptr + b * scb + t * sct
        c1 = tl.load(c + i, mask=im, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(c + HALF + i, mask=im, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(s + i, mask=im, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(s + HALF + i, mask=im, other=0.0).to(tl.float32)[None, :]
        x = x_ptr + b * sxb + t * sxt + h[:, None] * sxh + i[None, :]
        dt = x_ptr.dtype.element_ty
        x1 = tl.load(x, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(x + HALF, mask=m, other=0.0).to(tl.float32)
        # rotate_half(x) = cat(-x2, x1); products and sum in float32, one rounding at the end
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
        o = out_ptr + b * sob + t * sot + h[:, None] * soh + i[None, :]
        tl.store(o, o1.to(dt), mask=m)
        tl.store(o + HALF, o2.to(dt), mask=m)


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
        block = next_pow2(D // 2)
        block_h = min(next_pow2(H), max(1, 2048 // block))  # a token's heads together (up to 2,048 elements)
        _rope_kernel[(B * T, triton.cdiv(H, block_h))](
            x, cos, sin, out, H, T, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
            cos.stride(0) if cos.shape[0] == B else 0, cos.stride(1), HALF=D // 2, BLOCK=block, BLOCK_H=block_h,
            num_warps=4 if block_h * block >= 1024 else 1)
    return out



def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, T, D]`` by ``cos``/``sin`` ``[B or 1, T, D]``: the kernel on CUDA, the reference elsewhere."""
    if use_triton(x, cos, sin):
        return rope_triton(x, cos, sin)
    return rope_reference(x, cos, sin)
