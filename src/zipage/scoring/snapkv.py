"""SnapKV: attention of the observation window, averaged over the GQA group, average-pooled."""

from __future__ import annotations

from ..kernels import pool_scores, window_scores
from . import register_scorer
from .base import Scorer, ScoreInputs


@register_scorer
class SnapKVScorer(Scorer):
    name = "snapkv"
    config_fields = ("pooling_kernel",)
    needs_values = False
    needs_queries = True

    def score(self, x: ScoreInputs):
        attn = window_scores(x.queries, x.keys, x.key_mask, x.query_mask, x.scaling, "mean", "mean")
        return pool_scores(attn, self.config.pooling_kernel, "avg")
