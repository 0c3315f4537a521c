"""The scorer interface: given a layer's stored tokens, say how much each one is worth keeping.

A scorer sees dense tensors for one layer of a batch of sequences; it knows
nothing of pages or requests. Higher scores are kept. The base class does the
plumbing (window protection, sinks and padding are applied by ``compress``),
so a scorer only writes ``score``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import ZipageConfig
from ..kernels.fp8 import dequantize_reference


@dataclass
class ScoreInputs:
    """What a scorer may look at, for one layer of ``B`` sequences with ``S`` stored tokens each.

    Attributes:
        keys, values: ``[B, H_kv, S, D]`` stored keys (post-RoPE) and values, in position order
            (``values`` is None for scorers that set ``needs_values = False``).
        queries: ``[B, H_q, w, D]`` the last ``w`` queries (post-RoPE); they belong to the last ``w`` stored tokens.
        key_mask: ``[B, S]`` bool, False for padding tokens.
        query_mask: ``[B, w]`` bool, False for padding queries.
        scaling: the attention softmax scale of the layer.
        page_size: tokens per page (the lightning redundancy compares keys within a page).
        state: ``[B, H_kv, S]`` float32 per-token state of a stateful scorer (0 for tokens that arrived
            since the last compression), or None.
        first: True at the first compression of these sequences.
        layer_idx: the layer being compressed (-1 when several layers are scored as one batch).
        key_scales, value_scales: ``[B, H_kv, S]`` float32 when the cache stores FP8 and the scorer
            reads it (``Scorer.reads_fp8``): ``keys`` and ``values`` are then e4m3 codes and
            ``codes * scale`` their values (``dense_keys()`` / ``dense_values()``). Any other
            scorer gets dequantized keys and values and None here.
    """

    keys: torch.Tensor
    values: torch.Tensor | None
    queries: torch.Tensor | None
    key_mask: torch.Tensor
    query_mask: torch.Tensor | None
    scaling: float
    page_size: int
    state: torch.Tensor | None = None
    first: bool = True
    layer_idx: int = 0
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None

    def dense_keys(self) -> torch.Tensor:
        """Keys as float32 values (FP8 codes times their scales)."""
        return dequantize_reference(self.keys, self.key_scales)

    def dense_values(self) -> torch.Tensor | None:
        """Values as float32 values (FP8 codes times their scales), or None."""
        return dequantize_reference(self.values, self.value_scales) if self.values is not None else None

    def dequantized(self, dtype: torch.dtype) -> ScoreInputs:
        """These inputs with FP8 keys and values turned into ``dtype`` values (no scales left)."""
        if self.key_scales is None and self.value_scales is None:
            return self
        values = None if self.values is None else dequantize_reference(self.values, self.value_scales, dtype)
        return dataclasses.replace(self, keys=dequantize_reference(self.keys, self.key_scales, dtype), values=values,
                                   key_scales=None, value_scales=None)


class Scorer:
    """Base class of all scorers.

    Subclasses set ``name`` and implement ``score``, which returns ``[B, H_kv, S]``
    scores, or ``(scores, new_state)`` for a stateful scorer (``stateful = True``), whose
    state is stored per token and compacted together with the keys and values.
    """

    name: ClassVar[str] = ""
    stateful: ClassVar[bool] = False
    needs_queries: ClassVar[bool] = False
    needs_values: ClassVar[bool] = True  # built-ins that never read values set False (saves a copy)
    knobs: ClassVar[tuple[str, ...]] = ()  # the scorer's own settings in ZipageConfig.extra (rkv_lambda, ...)
    # The scorer settings of ZipageConfig (``config.SCORER_FIELDS``: pooling, use_global, seed, ...) it reads; one
    # it does not read, set away from its default, is refused (it would be accepted and do nothing). None: not
    # checked (a scorer defined outside zipage that does not say).
    config_fields: ClassVar[tuple[str, ...] | None] = None
    # True: a scorer takes FP8 keys and values as codes plus ``key_scales`` / ``value_scales`` (its
    # kernels dequantize in registers); otherwise it gets them dequantized to the model's dtype.
    reads_fp8: ClassVar[bool] = False

    def __init__(self, config: ZipageConfig | None = None) -> None:
        self.config = config if config is not None else ZipageConfig()
        # (rank, ranks): this process scores shard ``rank`` of ``ranks`` equal shards of the KV heads (tensor
        # parallelism sets it); a scorer whose scores depend on more than its inputs (a random draw) uses it
        self.head_shard = (0, 1)
        # built without a config: a cache or engine given this object binds a copy to its own config
        self.follows_cache_config = config is None

    def score(self, inputs: ScoreInputs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, inputs: ScoreInputs, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores (and the new state) of ``inputs``; FP8 inputs reach a scorer that does not read FP8
        as ``dtype`` values."""
        if not self.reads_fp8:
            inputs = inputs.dequantized(dtype)
        out = self.score(inputs)
        scores, state = out if isinstance(out, tuple) else (out, None)
        B, H, S = inputs.keys.shape[:3]
        if scores.shape != (B, H, S):
            raise ValueError(f"scorer {self.name!r} returned {tuple(scores.shape)}, expected {(B, H, S)}")
        return scores.float(), state

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
