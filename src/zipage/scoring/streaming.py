"""StreamingLLM: attention sinks plus the most recent tokens."""

from __future__ import annotations

import torch

from . import register_scorer
from .base import Scorer, ScoreInputs


@register_scorer
class StreamingScorer(Scorer):
    """Scores grow with position, so the most recent tokens are kept; the first ``sinks`` real
    tokens (4 when the config sets none) score above everything."""

    name = "streaming"
    config_fields = ()
    needs_values = False

    def score(self, x: ScoreInputs):
        B, H, S = x.keys.shape[:3]
        pos = torch.arange(S, device=x.keys.device, dtype=torch.float32)
        sinks = self.config.sinks or 4
        rank = x.key_mask.long().cumsum(dim=1)  # 1-based rank among real tokens
        is_sink = x.key_mask & (rank <= sinks)
        s = torch.where(is_sink, pos.new_tensor(2.0 * S), pos[None, :].expand(B, S))
        return s[:, None, :].expand(B, H, S)
