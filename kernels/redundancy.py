"""Key redundancy (R-KV style), all-pairs or "lightning" (within each page).

For token ``i`` and the tokens ``C(i)`` it is compared with (the other valid
tokens of its page, or of the whole context), with ``sim`` the cosine
similarity of L2-normalised keys:

    j*(i) = the most recent j in C(i) with sim(i, j) > threshold (if any)
    r(i)  = sum over j in C(i), j != j*(i) of sim(i, j)
    redundancy = softmax over the context of r / (tau * n)

with ``n`` the comparison width (page size, or the context length). The most
recent near-duplicate is not counted, so of a run of repeated keys the latest
copies look least redundant.

FP8 keys come as codes with ``key_scales``; a cosine similarity does not see a positive per-token
scale, so the kernel compares the codes themselves (upcast in registers) and never reads the scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8 import check_scales, dequantize_reference, is_quantized


def redundancy_scores_reference(
    keys: torch.Tensor,
    key_mask: torch.Tensor,
    block: int | None,
    threshold: float = 0.5,
    tau: float = 0.4,
    key_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Args:
        keys: ``[B, H, S, D]``.
        key_mask: ``[B, S]`` bool, False for padding (never compared, zero redundancy mass).
        block: compare only within consecutive blocks of this many tokens (the
            page size, for the lightning variant); None compares all pairs.
        key_scales: ``[B, H, S]`` float32 scales when ``keys`` are FP8 codes.
    Returns:
        ``[B, H, S]`` float32, a distribution over the valid tokens of each (row, head).
    """
    B, H, S, D = keys.shape
    n_norm = block if block is not None else S
    blk = block if block is not None else S
    nb = -(-S // blk)
    pad = nb * blk - S
    check_scales("redundancy", keys, key_scales)
    kn = F.normalize(dequantize_reference(keys, key_scales), dim=-1)
    mask = key_mask
    if pad:
        kn = F.pad(kn, (0, 0, 0, pad))
        mask = F.pad(mask, (0, pad), value=False)
    kn = kn.view(B, H, nb, blk, D)
    m = mask.view(B, 1, nb, blk)
    sim = kn @ kn.transpose(-1, -2)  # [B, H, nb, blk, blk]
    pair = m[..., :, None] & m[..., None, :] & ~torch.eye(blk, dtype=torch.bool, device=keys.device)
    sim = sim.masked_fill(~pair, 0.0)
    near = (sim > threshold) & pair
    col = torch.arange(blk, device=keys.device)
    last = torch.where(near, col, torch.full_like(col, -1)).amax(dim=-1, keepdim=True)  # [.., blk, 1]
    drop = (col == last) & (last >= 0)
    r = sim.masked_fill(drop, 0.0).sum(dim=-1).view(B, H, nb * blk)[..., :S]
    logits = (r / (tau * n_norm)).masked_fill(~key_mask[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def redundancy_scores(keys, key_mask, block, threshold=0.5, tau=0.4, key_scales=None):
    return redundancy_scores_reference(keys, key_mask, block, threshold, tau, key_scales)



# ----------------------------------------------------------------------------- Triton kernel (lightning)
from ._triton import HAS_TRITON, dot_precision, next_pow2, use_triton  # noqa: E402

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _lightning_kernel(
        K, KMASK, R,
        threshold, inv_norm,
        stride_kb, stride_kh, stride_ks, stride_mb, stride_rb, stride_rh,
        S, H, BLK: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr,
        D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr,
    ):
        """Rows ``BLOCK_I`` of one page-block of one (row, head), against the block's columns in tiles
        of ``BLOCK_J``; writes r / (tau * n). The most recent near-duplicate is the last column tile's
        candidate, so one pass keeps the running sum and the similarity of the latest candidate."""
        b = tl.program_id(0) // H
        h = tl.program_id(0) % H
        base = tl.program_id(1) * BLK
        i = tl.program_id(2) * BLOCK_I + tl.arange(0, BLOCK_I)  # rows, relative to the block
        d = tl.arange(0, BLOCK_D)
        ti = base + i
        imask = (i < BLK) & (ti < S)
        ivalid = imask & (tl.load(KMASK + b * stride_mb + ti, mask=imask, other=0) != 0)
        kp = K + b * stride_kb + h * stride_kh
        ki = tl.load(kp + ti[:, None] * stride_ks + d[None, :], mask=ivalid[:, None] & (d[None, :] < D), other=0.0)
        if FP8:  # codes: a positive per-token scale cancels in the cosine
            ki = ki.to(tl.float16)
        kif = ki.to(tl.float32)
        inv_ni = 1.0 / tl.maximum(tl.sqrt(tl.sum(kif * kif, 1)), 1e-12)
        total = tl.zeros([BLOCK_I], tl.float32)
        last_sim = tl.zeros([BLOCK_I], tl.float32)
        for j0 in range(0, BLK, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            tj = base + j
            jmask = (j < BLK) & (tj < S)
            jvalid = jmask & (tl.load(KMASK + b * stride_mb + tj, mask=jmask, other=0) != 0)
            kj = tl.load(kp + tj[:, None] * stride_ks + d[None, :], mask=jvalid[:, None] & (d[None, :] < D), other=0.0)
            if FP8:
                kj = kj.to(tl.float16)
            kjf = kj.to(tl.float32)
            inv_nj = 1.0 / tl.maximum(tl.sqrt(tl.sum(kjf * kjf, 1)), 1e-12)
            sim = tl.dot(ki, tl.trans(kj), input_precision=PRECISION) * inv_ni[:, None] * inv_nj[None, :]
            pair = ivalid[:, None] & jvalid[None, :] & (i[:, None] != j[None, :])
            sim = tl.where(pair, sim, 0.0)
            total += tl.sum(sim, 1)
            near = pair & (sim > threshold)
            cand = tl.max(tl.where(near, j[None, :], -1), 1)
            cand_sim = tl.sum(tl.where(j[None, :] == cand[:, None], sim, 0.0), 1)
            last_sim = tl.where(cand >= 0, cand_sim, last_sim)
        r = (total - last_sim) * inv_norm
        tl.store(R + b * stride_rb + h * stride_rh + ti, r, mask=imask)


def lightning_redundancy_triton(keys, key_mask, block: int, threshold: float = 0.5, tau: float = 0.4,
                                block_i: int | None = None, block_j: int | None = None, key_scales=None):
    """Lightning redundancy (keys compared within blocks of ``block`` tokens); the softmax over the
    context runs in PyTorch (one fused kernel). FP8 keys are compared as codes (see above)."""
    B, H, S, D = keys.shape
    if keys.stride(-1) != 1:
        raise ValueError("redundancy: the head dim of keys must be contiguous")
    check_scales("redundancy", keys, key_scales)
    fp8 = is_quantized(keys)  # FP8 or INT8 codes (the kernels' FP8 switch covers both)
    full = max(16, next_pow2(block))
    block_j = block_j or min(full, 64)
    block_i = block_i or min(full, 64)
    r = torch.empty(B, H, S, dtype=torch.float32, device=keys.device)
    km = key_mask.to(torch.int8).contiguous()
    grid = (B * H, triton.cdiv(S, block), triton.cdiv(block, block_i))
    _lightning_kernel[grid](
        keys, km, r,
        float(threshold), 1.0 / (tau * block),
        keys.stride(0), keys.stride(1), keys.stride(2), km.stride(0), r.stride(0), r.stride(1),
        S, H, BLK=block, BLOCK_J=block_j, BLOCK_I=block_i, D=D, BLOCK_D=next_pow2(D),
        PRECISION=dot_precision(torch.float16 if fp8 else keys.dtype), FP8=fp8, num_warps=4,
    )
    logits = r.masked_fill(~key_mask[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def redundancy_scores(keys, key_mask, block, threshold=0.5, tau=0.4, key_scales=None):  # noqa: F811
    """Redundancy scores; the lightning variant runs as a Triton kernel on CUDA (FP8 keys with their
    ``key_scales``)."""
    if block is not None and use_triton(keys):
        return lightning_redundancy_triton(keys, key_mask, block, threshold, tau, key_scales=key_scales)
    return redundancy_scores_reference(keys, key_mask, block, threshold, tau, key_scales)
