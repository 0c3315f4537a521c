"""H2O (heavy hitters): attention mass accumulated by each token over every compression's window."""

from __future__ import annotations

from ..kernels import window_scores
from . import register_scorer
from .base import Scorer, ScoreInputs


@register_scorer
class H2OScorer(Scorer):
    """Each token's score is the sum of the attention it received from the window queries at every
    compression it survived (mean over the GQA group), so heavy hitters accumulate."""

    name = "h2o"
    config_fields = ()
    needs_values = False
    stateful = True
    needs_queries = True

    def score(self, x: ScoreInputs):
        acc = window_scores(x.queries, x.keys, x.key_mask, x.query_mask, x.scaling, "mean", "sum")
        if x.state is not None:
            acc = acc + x.state
        return acc, acc
