"""FP8 KV pages: e4m3 codes with one float32 scale per token and KV head.

A pool of keys (or values) in FP8 is a pair: the codes, ``[num_pages, page_size, H, D]`` in
``torch.float8_e4m3fn``, and their scales, ``[num_pages, page_size, H]`` float32, on the same
pages and slots, so whatever moves a token (compaction, prefix sharing) moves its scale with it.
A stored vector ``x`` (one token, one head) becomes ``codes = round(x / s)`` with
``s = max|x| / 448`` (448 is e4m3's largest finite value), and reads back as ``codes * s``.

Why per token and head, in float32: a token's scale is known when it is stored (no page-wide
maximum to revisit when later tokens arrive, nothing to requantize when compaction mixes tokens
of different pages), outlier tokens do not flatten their neighbours, and a float32 scale is exact
(a bf16 scale would round, and a rounded-down scale pushes ``max|x|`` past 448). It costs 4 bytes
per 128-byte row at head dim 128 (3%).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_DTYPE = torch.float32
MIN_SCALE = 1e-12  # an all-zero row gets this scale (its codes are 0 either way)


def kv_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pools' dtype for a ``kv_cache_dtype`` name (``"auto"``: the model's; ``"fp8"``: e4m3)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype == "fp8":
        return FP8
    raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is invalid: expected 'auto' or 'fp8'")


def is_fp8(t: torch.Tensor) -> bool:
    """True for FP8 KV codes (``torch.float8_e4m3fn``)."""
    return t.dtype == FP8


def quantize_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[..., D]`` -> (codes ``[..., D]`` e4m3, scales ``[...]`` float32), one scale per row."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / FP8_MAX).clamp(min=MIN_SCALE)
    codes = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return codes, scale


def dequantize_reference(codes: torch.Tensor, scales: torch.Tensor | None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Real values of stored rows: ``codes * scales`` (``scales`` None: the rows are not quantized)."""
    if scales is None:
        return codes.to(dtype)
    return (codes.float() * scales.float()[..., None]).to(dtype)


def check_scales(name: str, codes: torch.Tensor, scales: torch.Tensor | None) -> None:
    """FP8 codes need their scales (one per row, the codes' shape without the head dim) and only they do."""
    if is_fp8(codes):
        if scales is None:
            raise ValueError(f"{name}: FP8 KV needs its per-token scales")
        if tuple(scales.shape) != tuple(codes.shape[:-1]) or scales.dtype != SCALE_DTYPE:
            raise ValueError(f"{name}: scales must be {SCALE_DTYPE} of shape {tuple(codes.shape[:-1])}, got "
                             f"{scales.dtype} {tuple(scales.shape)}")
    elif scales is not None:
        raise ValueError(f"{name}: scales are for FP8 KV only, the pool is {codes.dtype}")
