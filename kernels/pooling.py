"""Pooling of per-token scores over neighbouring positions (SnapKV-style clustering)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_scores_reference(scores: torch.Tensor, kernel: int, mode: str = "max") -> torch.Tensor:
    """``[B, H, S]`` -> ``[B, H, S]``: max or mean over the ``kernel`` positions centred on each token
    (positions outside ``0..S-1`` are ignored)."""
    if kernel <= 1 or mode == "none":
        return scores
    B, H, S = scores.shape
    x = scores.reshape(B * H, 1, S)
    pad = kernel // 2
    if mode == "max":
        out = F.max_pool1d(F.pad(x, (pad, pad), value=float("-inf")), kernel, stride=1)
    elif mode == "avg":
        out = F.avg_pool1d(x, kernel, stride=1, padding=pad, count_include_pad=False)
    else:
        raise ValueError(f"pooling mode {mode!r}: expected 'max', 'avg' or 'none'")
    return out.reshape(B, H, S)


def pool_scores(scores: torch.Tensor, kernel: int, mode: str = "max") -> torch.Tensor:
    return pool_scores_reference(scores, kernel, mode)
