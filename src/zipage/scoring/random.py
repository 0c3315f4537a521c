"""Random eviction: a floor every other scorer must beat."""

from __future__ import annotations

import torch

from . import register_scorer
from .base import Scorer, ScoreInputs


@register_scorer
class RandomScorer(Scorer):
    name = "random"
    needs_values = False

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.generator = torch.Generator().manual_seed(self.config.seed)

    def score(self, x: ScoreInputs):
        s = torch.rand(x.keys.shape[:3], generator=self.generator)
        return s.to(x.keys.device)
