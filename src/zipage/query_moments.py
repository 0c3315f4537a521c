"""The queries' moments that weight the FP8 keys' scale search (``kernels/fp8.py``).

A key's rounding error ``e`` moves the logit of a query ``q`` by ``q . e``, whose mean square over the queries
that read the key is ``(m . e)^2 + e^T S e`` (``m`` their mean, ``S`` their covariance). Every query of a head
shares a large part of its mean, so that first term weighs most. FP8 pages choose each key's scale (among 16)
by ``(m . e)^2 + sum(var * e^2)`` (``S`` taken diagonal, the channels' variances) instead of ``|e|^2``; values
keep the plain error. Rounding SmolLM2's keys and values through e4m3 this way cuts the next-token KL by 29-35%
against the squared-error search, Gemma 3 270M's by 21-40% (``benchmarks/fp8_key_rounding.py``,
``benchmarks/results/fp8/``).

``QueryMoments`` keeps, per full-attention layer and KV head, the sums of the queries of the head's group and
of their squares, in the pages' basis (rotated pages: rotated queries), over the prompt tokens the layer has
seen, and the integer weights derived from them (``fp8.query_weights``). A prompt's queries count before its
own keys are stored (the engine adds a step's prompt queries before its store; generate() stores a prompt,
then, once the layer's attention has its queries, stores its keys again with the new weights), so the first
prompt is weighted by itself. Decode queries are not counted (a graph-captured decode step has padding rows,
and a prompt's queries describe a head well: moments from other text did almost as well as a sequence's own).
After ``limit`` query tokens (every row's, padding included) a layer's moments stop changing. Which prompts come
first would move what later keys are rounded by, and so a request's compressions and tokens would depend on the
engine's other and earlier requests (by more than float near-ties: measured in the engine guide); so by default
(``ZIPAGE_FP8_QUERY_WEIGHTS=calibrated``) the engine counts a fixed text's queries once, at its start, and freezes
them (``zipage/calibration.py``, ``ModelRunner.calibrate_query_moments``). ``ZIPAGE_FP8_QUERY_WEIGHTS=1`` lets them
follow the prompts served, and ``0`` searches by the squared error. ``generate()`` counts its own call's prompts.
"""

from __future__ import annotations

import torch

from .kernels.fp8 import query_weights

LIMIT = 1 << 16  # prompt tokens per layer after which its moments stop changing


class QueryMoments:
    """Query moments of ``layers`` full-attention layers, ``kv_heads`` KV heads of ``head_dim``.

    ``layer_weights[j]`` (int64 ``[2, kv_heads, head_dim]``, a view of ``weights``) is what layer ``j``'s key
    store takes; ``add`` changes it in place (CUDA graphs that captured a store read the new values). Before
    any query: ``u = 0``, ``v = 1``, the squared error (counted in the weighted search's coarser units)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, device, limit: int = LIMIT) -> None:
        self.kv_heads = kv_heads
        self.limit = limit
        self.sums = torch.zeros(layers, 2, kv_heads, head_dim, dtype=torch.float64, device=device)
        self.count = torch.zeros(layers, dtype=torch.float64, device=device)
        self.weights = torch.zeros(layers, 2, kv_heads, head_dim, dtype=torch.int64, device=device)
        self.weights[:, 1] = 1
        self.layer_weights = list(self.weights.unbind(0))
        self.tokens = [0] * layers  # tokens offered to each layer (padding included): host-side, for ``limit``

    def reset(self) -> None:
        """Back to no query counted: the squared error until the next ``add``."""
        self.sums.zero_()
        self.count.zero_()
        self.weights.zero_()
        self.weights[:, 1] = 1
        self.tokens = [0] * len(self.tokens)

    def freeze(self) -> None:
        """Stop counting: every layer's moments and weights stay as they are (``wants`` False from now on)."""
        self.tokens = [max(t, self.limit) for t in self.tokens]

    def wants(self, layer: int) -> bool:
        """Whether ``add`` would still count ``layer``'s queries."""
        return self.tokens[layer] < self.limit

    def add(self, layer: int, queries: torch.Tensor, valid: torch.Tensor | None = None) -> bool:
        """Count ``queries`` ``[..., H_q, D]`` of ``layer`` (``valid`` ``[...]`` bool: which are real tokens;
        None: all) and update its weights; False, with nothing done, once it has seen ``limit`` tokens."""
        if not self.wants(layer):
            return False
        Hq, D = queries.shape[-2:]
        if Hq % self.kv_heads:
            raise ValueError(f"QueryMoments: {Hq} query heads do not group onto {self.kv_heads} KV heads")
        x = queries.reshape(-1, self.kv_heads, Hq // self.kv_heads, D).float()  # (16-bit squares overflow)
        self.tokens[layer] += x.shape[0]
        n = x.shape[0] * x.shape[2]
        if valid is not None:
            x = x * valid.reshape(-1).to(x.dtype)[:, None, None, None]
            n = valid.sum() * x.shape[2]
        self.sums[layer, 0] += x.sum(dim=(0, 2))
        self.sums[layer, 1] += (x * x).sum(dim=(0, 2))
        self.count[layer] += n
        self.weights[layer].copy_(query_weights(self.sums[layer, 0], self.sums[layer, 1], self.count[layer]))
        return True
