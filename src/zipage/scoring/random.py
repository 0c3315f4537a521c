"""Random eviction: a floor every other scorer must beat."""

from __future__ import annotations

import torch

from . import register_scorer
from .base import Scorer, ScoreInputs


@register_scorer
class RandomScorer(Scorer):
    name = "random"
    config_fields = ("seed",)
    needs_values = False

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.generator = torch.Generator().manual_seed(self.config.seed)

    def score(self, x: ScoreInputs):
        B, H, S = x.keys.shape[:3]
        rank, ranks = self.head_shard  # (tensor parallelism: every rank draws all heads' numbers, keeps its own)
        s = torch.rand((B, H * ranks, S), generator=self.generator)[:, rank * H:(rank + 1) * H]
        return s.to(x.keys.device)
