"""The Zipage scorer: window attention, decayed global score, pooling and lightning redundancy."""

from __future__ import annotations

import torch

from ..kernels import pool_scores, redundancy_scores, window_scores
from . import register_scorer
from .base import Scorer, ScoreInputs


@register_scorer
class ZipageScorer(Scorer):
    """Window attention (reduced over a GQA group by ``group_reduce``, mean over the window),
    pooled at the first compression (or at every one, ``pooling_scope="all"``), optionally weighted
    by the value norms, combined with a decayed global score ``max(s_now, alpha * s_prev)`` (G-KV;
    ``global_mode="sum"``: ``s_now + alpha * s_prev``), minus lightning redundancy (R-KV within
    pages): ``lambda * attn - (1 - lambda) * redundancy``."""

    name = "zipage"
    config_fields = (
        "pooling", "pooling_kernel", "pooling_scope", "use_global", "global_decay", "global_mode", "group_reduce",
        "recent", "redundancy", "redundancy_lambda", "redundancy_tau", "similarity_threshold", "value_weight",
        "window_reduce"
    )
    needs_queries = True
    reads_fp8 = True  # its window-score and redundancy kernels dequantize FP8 keys in registers

    @property
    def stateful(self) -> bool:  # type: ignore[override]
        """Only the global score keeps a per-token state: without it there is no state pool to fill."""
        return bool(self.config.use_global)

    @property
    def needs_values(self) -> bool:  # type: ignore[override]
        return bool(self.config.value_weight)

    def score(self, x: ScoreInputs):
        cfg = self.config
        pool = cfg.pooling != "none" and cfg.pooling_kernel > 1 and (x.first or cfg.pooling_scope == "all")
        has_prev = cfg.use_global and x.state is not None
        fuse_global = has_prev and cfg.global_mode == "max" and not pool and not cfg.value_weight
        if cfg.window_reduce == "max":
            fuse_global = False
            attn = _window_max(x, cfg.group_reduce)
        else:
            attn = window_scores(
                x.queries, x.keys, x.key_mask, x.query_mask, x.scaling, cfg.group_reduce, "mean",
                prev=x.state if fuse_global else None, decay=cfg.global_decay, key_scales=x.key_scales,
            )
        if pool:
            attn = pool_scores(attn, cfg.pooling_kernel, cfg.pooling)
        if cfg.value_weight:
            attn = attn * x.dense_values().norm(dim=-1)
        if has_prev and not fuse_global:
            prev = cfg.global_decay * x.state
            attn = torch.maximum(attn, prev) if cfg.global_mode == "max" else attn + prev
        state = attn if cfg.use_global else None
        if cfg.redundancy == "none":
            return _recent_first(attn, cfg.recent_kept), state
        block = x.page_size if cfg.redundancy == "lightning" else None
        red = redundancy_scores(x.keys, x.key_mask, block, cfg.similarity_threshold, cfg.redundancy_tau,
                                key_scales=x.key_scales)
        lam = cfg.redundancy_lambda
        return _recent_first(lam * attn - (1.0 - lam) * red, cfg.recent_kept), state


def _recent_first(scores: torch.Tensor, recent: int) -> torch.Tensor:
    """Lift the last ``recent`` positions above every other score (their order among themselves kept)."""
    if recent <= 0:
        return scores
    S = scores.shape[-1]
    lift = scores.abs().amax(dim=-1, keepdim=True) * 2 + 1
    out = scores.clone()
    out[..., max(S - recent, 0):] += lift
    return out


def _window_max(x: ScoreInputs, group_reduce: str) -> torch.Tensor:
    """Window attention reduced by the max over the valid window queries (dense; ``[B, H_kv, S]``)."""
    B, Hq, w, D = x.queries.shape
    Hkv, S = x.keys.shape[1], x.keys.shape[2]
    q = x.queries.float().view(B, Hkv, Hq // Hkv, w, D)
    logits = torch.einsum("bhgwd,bhsd->bhgws", q, x.dense_keys()) * x.scaling
    pos = torch.arange(S, device=x.keys.device)
    allowed = (pos[None, :] <= torch.arange(S - w, S, device=x.keys.device)[:, None])[None] & x.key_mask[:, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed[:, None, None], float("-inf")), dim=-1).nan_to_num(0.0)
    probs = probs * x.query_mask[:, None, None, :, None]
    probs = probs.amax(dim=2) if group_reduce == "max" else probs.mean(dim=2)
    return probs.amax(dim=2)
