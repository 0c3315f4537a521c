"""Key-norm: tokens whose keys have a small L2 norm tend to draw attention; keep those."""

from __future__ import annotations

from . import register_scorer
from .base import Scorer, ScoreInputs


@register_scorer
class KNormScorer(Scorer):
    name = "knorm"
    config_fields = ()
    needs_values = False

    def score(self, x: ScoreInputs):
        return -x.keys.float().norm(dim=-1)
