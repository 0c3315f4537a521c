"""The scorer interface: given a layer's stored tokens, say how much each one is worth keeping.

A scorer sees dense tensors for one layer of a batch of sequences; it knows
nothing of pages or requests. Higher scores are kept. The base class does the
plumbing (window protection, sinks and padding are applied by ``compress``),
so a scorer only writes ``score``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import ZipageConfig


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
        layer_idx: the layer being compressed.
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

    def __init__(self, config: ZipageConfig | None = None) -> None:
        self.config = config if config is not None else ZipageConfig()
        # built without a config: a cache or engine given this object binds a copy to its own config
        self.follows_cache_config = config is None

    def score(self, inputs: ScoreInputs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, inputs: ScoreInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.score(inputs)
        scores, state = out if isinstance(out, tuple) else (out, None)
        B, H, S = inputs.keys.shape[:3]
        if scores.shape != (B, H, S):
            raise ValueError(f"scorer {self.name!r} returned {tuple(scores.shape)}, expected {(B, H, S)}")
        return scores.float(), state

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
