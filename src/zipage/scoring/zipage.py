"""The Zipage scorer: window attention, decayed global score, pooling and lightning redundancy."""

from __future__ import annotations

import torch

from ..kernels import pool_scores, redundancy_scores, window_scores
from . import register_scorer
from .base import Scorer, ScoreInputs


@register_scorer
class ZipageScorer(Scorer):
    """Window attention (max over a GQA group, mean over the window), max-pooled at the first
    compression, combined with a decayed global score ``max(s_now, alpha * s_prev)`` (G-KV),
    minus lightning redundancy (R-KV within pages): ``lambda * attn - (1 - lambda) * redundancy``."""

    name = "zipage"
    needs_values = False
    stateful = True
    needs_queries = True

    def score(self, x: ScoreInputs):
        cfg = self.config
        pool = x.first and cfg.pooling != "none" and cfg.pooling_kernel > 1
        fuse_global = cfg.use_global and x.state is not None and not pool
        attn = window_scores(
            x.queries, x.keys, x.key_mask, x.query_mask, x.scaling, "max", "mean",
            prev=x.state if fuse_global else None, decay=cfg.global_decay,
        )
        if pool:
            attn = pool_scores(attn, cfg.pooling_kernel, cfg.pooling)
            if cfg.use_global and x.state is not None:
                attn = torch.maximum(attn, cfg.global_decay * x.state)
        if cfg.redundancy == "none":
            return attn, attn
        block = x.page_size if cfg.redundancy == "lightning" else None
        red = redundancy_scores(x.keys, x.key_mask, block, cfg.similarity_threshold, cfg.redundancy_tau)
        lam = cfg.redundancy_lambda
        return lam * attn - (1.0 - lam) * red, attn
