"""Expected Attention: the attention future queries should pay, from the statistics of recent ones.

Paper: *Expected Attention: KV Cache Compression by Estimating Attention from Future Queries
Distribution*, Alessio Devoto, Maximilian Jeblick, Simon Jégou (2025), arXiv 2510.00636.

The queries that will read the cache are unknown at compression time, but their distribution is
not: modelled as a Gaussian ``q ~ N(mu, Sigma)`` per query head, the expected unnormalised
attention to a key ``k`` has a closed form (the Gaussian moment generating function),

    E[exp(s * q.k)] = exp(s * mu.k + s^2 / 2 * k^T Sigma k),      s = the softmax scale,

whose softmax over the stored keys is the expected attention ``a_i``. A token's score is its
expected contribution to the attention output, ``(a_i + epsilon) * |v_i|``, reduced over the
query heads of a GQA group by ``group_reduce``.

zipage estimates ``mu`` and ``Sigma`` from the observation window's queries (the valid ones), which
the cache keeps after RoPE; the paper instead rotates the statistics to the positions of the coming
queries, which a scorer that sees no positions or rotary frequencies cannot do. The window queries
are the most recent ones, so their rotation is closest to the coming queries'.

Knobs (``ZipageConfig.extra``): ``ea_covariance`` (True: the ``k^T Sigma k`` term; False: the mean
query alone), ``ea_value_norm`` (True: weight by ``|v_i|``), ``ea_epsilon`` (0.0: added to ``a_i``
before the value weighting).
"""

from __future__ import annotations

import torch

from . import register_scorer
from .base import Scorer, ScoreInputs
from .knobs import knob


def expected_attention(queries: torch.Tensor, query_mask: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor,
                       scaling: float, covariance: bool = True) -> torch.Tensor:
    """``[B, Hq, w, D]`` window queries, ``[B, Hkv, S, D]`` keys -> ``[B, Hq, S]`` expected attention."""
    B, Hq, w, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    if Hq % Hkv:
        raise ValueError(f"expected_attention: {Hq} query heads are not a multiple of {Hkv} KV heads")
    q = queries.float()
    qm = query_mask[:, None, :, None].float()  # [B, 1, w, 1]
    n = qm.sum(dim=2, keepdim=True).clamp_min(1.0)
    mu = (q * qm).sum(dim=2, keepdim=True) / n  # [B, Hq, 1, D]
    k = keys.float().repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, S, D]
    logits = scaling * (k @ mu.transpose(2, 3))[..., 0]  # [B, Hq, S]
    if covariance:
        c = (q - mu) * qm
        sigma = c.transpose(2, 3) @ c / n  # [B, Hq, D, D], the window's (biased) covariance
        logits = logits + 0.5 * scaling**2 * ((k @ sigma) * k).sum(dim=-1)
    logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


@register_scorer
class ExpectedAttentionScorer(Scorer):
    name = "expected_attention"
    config_fields = ("group_reduce",)
    knobs = ("ea_covariance", "ea_value_norm", "ea_epsilon")
    needs_queries = True

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.covariance = knob(self.config, "ea_covariance", True)
        self.value_norm = knob(self.config, "ea_value_norm", True)
        self.epsilon = knob(self.config, "ea_epsilon", 0.0, low=0.0)

    @property
    def needs_values(self) -> bool:  # type: ignore[override]
        return self.value_norm

    def score(self, x: ScoreInputs) -> torch.Tensor:
        B, Hkv, S, _ = x.keys.shape
        a = expected_attention(x.queries, x.query_mask, x.keys, x.key_mask, x.scaling, self.covariance) + self.epsilon
        if self.value_norm:
            a = a * x.values.float().norm(dim=-1).repeat_interleave(a.shape[1] // Hkv, dim=1)
        a = a.view(B, Hkv, -1, S)
        return a.amax(dim=2) if self.config.group_reduce == "max" else a.mean(dim=2)
