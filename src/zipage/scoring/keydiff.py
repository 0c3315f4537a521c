"""KeyDiff: keep the keys least like the average key; no queries, no attention scores.

Paper: *KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments*, Junyoung Park, Dalton Jones, Matthew J. Morse, Raghavv Goel,
Mingu Lee, Chris Lott (2025), arXiv 2504.15364.

The paper observes that geometrically distinctive keys tend to draw high attention. It relaxes
"keep the set of keys with the least pairwise cosine similarity" to one anchor: the mean of the
L2-normalised stored keys. Each token's score is its negative cosine similarity to that anchor,
per KV head, so the keys pointing away from the crowd are kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register_scorer
from .base import Scorer, ScoreInputs


@register_scorer
class KeyDiffScorer(Scorer):
    """``-cos(k_i, mean_j k_j / |k_j|)`` over the real (unpadded) stored tokens of each row and head."""

    name = "keydiff"
    config_fields = ()
    needs_values = False

    def score(self, x: ScoreInputs) -> torch.Tensor:
        kn = F.normalize(x.keys.float(), dim=-1)  # [B, H, S, D]
        m = x.key_mask[:, None, :, None].to(kn.dtype)
        anchor = (kn * m).sum(dim=2, keepdim=True) / m.sum(dim=2, keepdim=True).clamp_min(1.0)
        return -(kn * F.normalize(anchor, dim=-1)).sum(dim=-1)
