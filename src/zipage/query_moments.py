"""The queries' moments that weight the FP8 keys' scale search (``kernels/fp8.py``).

A key's rounding error ``e`` moves the logit of a query ``q`` by ``q . e``. Over the queries that read it,
the mean square of that shift is ``e^T (m m^T + diag(var)) e``, with ``m`` the queries' mean and ``var`` their
per-channel variance: the mean query, which every query of a head shares a large part of, weighs most. FP8
pages choose each key's scale (among 16) by this error instead of ``|e|^2``. On SmolLM2 this cut what FP8
keys cost in next-token KL by a third, on Gemma 3 270M by a quarter (``benchmarks/fp8_query_weights.py``).

``QueryMoments`` keeps, per full-attention layer and KV head, the sums of the queries of the head's group
and of their squares, in the pages' basis (rotated pages: rotated queries), over the prompt tokens seen by
earlier forwards (decode queries are not counted: a graph-captured decode step has padding rows), and the
integer weights derived from them. Keys stored before any query are searched by ``|e|^2``.
"""

from __future__ import annotations

import torch

from .kernels.fp8 import query_weights


class QueryMoments:
    """Running query moments of ``layers`` full-attention layers, ``kv_heads`` KV heads of ``head_dim``.

    ``weights[j]`` (int64 ``[2, kv_heads, head_dim]``) is what layer ``j``'s key store takes; it changes only in
    ``refresh()``, in place (CUDA graphs that captured a store read the new values)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, device) -> None:
        self.kv_heads = kv_heads
        self.sums = torch.zeros(layers, 2, kv_heads, head_dim, dtype=torch.float64, device=device)
        self.count = torch.zeros(layers, dtype=torch.float64, device=device)
        self.weights = torch.zeros(layers, 2, kv_heads, head_dim, dtype=torch.int64, device=device)
        self.weights[:, 1] = 1  # before any query: the plain squared error
        self.stale = False

    def add(self, layer: int, queries: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Count ``queries`` ``[..., H_q, D]`` of ``layer`` (``valid`` ``[...]`` bool: which are real tokens;
        None: all)."""
        Hq, D = queries.shape[-2:]
        if Hq % self.kv_heads:
            raise ValueError(f"QueryMoments: {Hq} query heads do not group onto {self.kv_heads} KV heads")
        x = queries.reshape(-1, self.kv_heads, Hq // self.kv_heads, D)
        n = x.shape[0] * x.shape[2]
        if valid is not None:
            keep = valid.reshape(-1).to(x.dtype)[:, None, None, None]
            x = x * keep
            n = valid.sum() * x.shape[2]
        self.sums[layer, 0] += x.sum(dim=(0, 2), dtype=torch.float32)
        self.sums[layer, 1] += (x * x).sum(dim=(0, 2), dtype=torch.float32)
        self.count[layer] += n
        self.stale = True

    def refresh(self) -> None:
        """The weights from the moments counted so far (every layer at once)."""
        if self.stale:
            self.weights.copy_(query_weights(self.sums[:, 0], self.sums[:, 1], self.count[:, None, None]))
            self.stale = False
