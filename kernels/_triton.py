"""Shared switches for the Triton kernels: availability, and when to use them."""

from __future__ import annotations

import functools
import os

import torch

try:  # triton is optional on non-Linux platforms
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``), as the CPU tests do."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """The library runs the Triton kernels for CUDA tensors and the PyTorch references otherwise.

    ``ZIPAGE_DISABLE_TRITON=1`` forces the references everywhere. (The CPU tests call the
    Triton launchers directly, under ``TRITON_INTERPRET=1``.)
    """
    if not HAS_TRITON or _disabled(os.environ.get("ZIPAGE_DISABLE_TRITON", "0")):
        return False
    return all(t.is_cuda for t in tensors)


@functools.lru_cache(maxsize=8)
def _disabled(raw: str) -> bool:
    """(parsed once per distinct value: every kernel dispatch asks)"""
    value = raw.strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"ZIPAGE_DISABLE_TRITON={raw!r}: expected 1 (the PyTorch references everywhere) or 0")
    return value == "1"


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands get exact IEEE dots (tf32 would break equality with the reference)."""
    return "ieee" if dtype == torch.float32 else "tf32"
