"""Candidate defaults tried in ``benchmarks/scorer_comparison.py`` (``--import``), not registered by the library.

``zmix``: the default ``zipage`` pipeline (max-pooled at the first compression, the recency floor
``recent``) with its window attention replaced by ``(1 - beta) * window attention + beta *
expected attention`` (``expected_attention`` without the value weighting, mean over the GQA group);
``ZipageConfig.extra``: ``beta`` (0.5), ``vn`` (False: multiply by the value norm).

    python benchmarks/scorer_comparison.py --seq-len 512 --import benchmarks/scorer_candidates.py
"""

from __future__ import annotations

from zipage.kernels import pool_scores, window_scores
from zipage.scoring import register_scorer
from zipage.scoring.base import Scorer
from zipage.scoring.expected_attention import expected_attention
from zipage.scoring.zipage import _recent_first


@register_scorer
class WindowPlusExpected(Scorer):
    name = "zmix"
    knobs = ("beta", "vn")
    needs_queries = True

    @property
    def needs_values(self) -> bool:  # type: ignore[override]
        return bool(self.config.extra.get("vn", False))

    def score(self, x):
        cfg = self.config
        beta = cfg.extra.get("beta", 0.5)
        attn = window_scores(x.queries, x.keys, x.key_mask, x.query_mask, x.scaling, "mean", "mean")
        B, H, S, _ = x.keys.shape
        ea = expected_attention(x.queries, x.query_mask, x.keys, x.key_mask, x.scaling, True).view(B, H, -1, S).mean(dim=2)
        s = (1 - beta) * attn + beta * ea
        if cfg.extra.get("vn", False):
            s = s * x.values.float().norm(dim=-1)
        if x.first or cfg.pooling_scope == "all":
            s = pool_scores(s, cfg.pooling_kernel, cfg.pooling)
        return _recent_first(s, cfg.recent_kept)
