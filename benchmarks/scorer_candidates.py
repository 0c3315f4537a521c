"""Candidate defaults tried in ``benchmarks/scorer_comparison.py`` (``--import``), not registered by the library.

``zmix``: the default ``zipage`` pipeline (max-pooled at the first compression, the recency floor
``recent``) with its window attention replaced by ``(1 - beta) * window attention + beta *
expected attention`` (``expected_attention`` without the value weighting, mean over the GQA group);
``ZipageConfig.extra``: ``beta`` (0.5), ``vn`` (False: multiply by the value norm).

``zbudget``: the default ``zipage`` scorer with a rule on the budget's share of the stored tokens at
each compression, decided per sequence: ``pooling_all_from`` (a ratio; a compression whose budget is
at least this share of the stored tokens pools as ``pooling_scope="all"`` would, the others only at
the first compression) and ``early_window`` (below that share, read only the last ``early_window``
of the captured window queries). Tried and rejected as a default: ``benchmarks/results/scorers_study/``.

    python benchmarks/scorer_comparison.py --seq-len 512 --import benchmarks/scorer_candidates.py
"""

from __future__ import annotations

import dataclasses

import torch

from zipage.kernels import pool_scores, window_scores
from zipage.scoring import register_scorer
from zipage.scoring.base import Scorer
from zipage.scoring.expected_attention import expected_attention
from zipage.scoring.zipage import ZipageScorer, _recent_first


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


@register_scorer
class BudgetShareZipage(ZipageScorer):
    name = "zbudget"
    knobs = ("pooling_all_from", "early_window")
    stateful = False

    def _attention(self, x, queries=None, query_mask=None):
        q = x.queries if queries is None else queries
        qm = x.query_mask if query_mask is None else query_mask
        return window_scores(q, x.keys, x.key_mask, qm, x.scaling, self.config.group_reduce, "mean",
                             key_scales=x.key_scales)

    def score(self, x):
        cfg = self.config
        share = cfg.extra.get("pooling_all_from")
        early = cfg.extra.get("early_window")
        if share is None or cfg.use_global or cfg.redundancy != "none" or cfg.value_weight or cfg.window_reduce != "mean":
            raise ValueError("zbudget: needs pooling_all_from, on the default pipeline (no global score, "
                             "redundancy, value weighting or max window reduce)")
        large = (cfg.budget >= share * x.key_mask.sum(dim=-1))[:, None, None]  # [B, 1, 1]
        attn = self._attention(x)
        if early is not None and early < x.queries.shape[2]:
            narrow = self._attention(x, x.queries[:, :, -early:], x.query_mask[:, -early:])
            attn = torch.where(large, attn, narrow)
        pooled = pool_scores(attn, cfg.pooling_kernel, cfg.pooling)
        if x.first or cfg.pooling_scope == "all":
            attn = pooled
        else:
            attn = torch.where(large, pooled, attn)
        return _recent_first(attn, cfg.recent_kept)
