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

INT8 pages (``kv_cache_dtype="int8"``) are the same pair with int8 codes: ``s = max|x| / 127`` and
``codes = round(x / s)`` (half away from zero), the same bytes as e4m3. Uniform codes keep about
7 significant bits of every element against e4m3's 4, which is what attention logits need: rounding
the keys of SmolLM2-135M through e4m3 costs about 2.8 points of next-token agreement with bf16, through
int8 about 0.6 (``benchmarks/fp8_key_rounding.py``, ``benchmarks/results/fp8/``). Everything that
reads FP8 pages reads INT8 pages the same way (codes upcast exactly, times their scales).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8 = torch.int8
INT8_MAX = 127.0
CODE_MAX = {FP8: FP8_MAX, INT8: INT8_MAX}  # the largest code of each quantized page type
QUANTIZED_KV = {"fp8": FP8, "int8": INT8}  # kv_cache_dtype names of the quantized page types
SCALE_DTYPE = torch.float32
MIN_SCALE = 1e-12  # an all-zero row gets this scale (its codes are 0 either way)


def kv_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pools' dtype for a ``kv_cache_dtype`` name (``"auto"``: the model's; ``"fp8"``: e4m3;
    ``"int8"``: int8 codes)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in QUANTIZED_KV:
        return QUANTIZED_KV[kv_cache_dtype]
    raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is invalid: expected 'auto', 'fp8' or 'int8'")


def is_quantized(t: torch.Tensor) -> bool:
    """True for quantized KV codes, FP8 (``torch.float8_e4m3fn``) or INT8 (``torch.int8``): pools
    that come with per-token scales."""
    return t.dtype in CODE_MAX


def quantize_reference(x: torch.Tensor, dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[..., D]`` -> (codes ``[..., D]`` of ``dtype`` (e4m3 or int8), scales ``[...]`` float32),
    one scale per row."""
    if dtype not in CODE_MAX:
        raise ValueError(f"quantize_reference: codes are {FP8} or {INT8}, not {dtype}")
    xf = x.float()
    top = CODE_MAX[dtype]
    scale = (xf.abs().amax(dim=-1) / top).clamp(min=MIN_SCALE)
    c = (xf / scale[..., None]).clamp(-top, top)
    if dtype == INT8:  # to the nearest integer, halves away from zero (what the store kernel does)
        c = torch.where(c < 0, -torch.floor(0.5 - c), torch.floor(c + 0.5))
    return c.to(dtype), scale


def dequantize_reference(codes: torch.Tensor, scales: torch.Tensor | None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Real values of stored rows: ``codes * scales`` (``scales`` None: the rows are not quantized)."""
    if scales is None:
        return codes.to(dtype)
    return (codes.float() * scales.float()[..., None]).to(dtype)


def check_scales(name: str, codes: torch.Tensor, scales: torch.Tensor | None) -> None:
    """Quantized codes (FP8 or INT8) need their scales (one per row, the codes' shape without the head
    dim) and only they do."""
    if is_quantized(codes):
        if scales is None:
            raise ValueError(f"{name}: {codes.dtype} KV codes need their per-token scales")
        if tuple(scales.shape) != tuple(codes.shape[:-1]) or scales.dtype != SCALE_DTYPE:
            raise ValueError(f"{name}: scales must be {SCALE_DTYPE} of shape {tuple(codes.shape[:-1])}, got "
                             f"{scales.dtype} {tuple(scales.shape)}")
    elif scales is not None:
        raise ValueError(f"{name}: scales are for FP8 or INT8 KV only, the pool is {codes.dtype}")
