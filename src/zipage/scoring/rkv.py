"""R-KV: attention importance minus key redundancy, over the whole stored context.

Paper: *R-KV: Redundancy-aware KV Cache Compression for Reasoning Models*, Zefan Cai, Wen Xiao,
Hanshi Sun, Cheng Luo, Yikai Zhang, Ke Wan, Yucheng Li, Yeyang Zhou, Li-Wen Chang, Jiuxiang Gu,
Zhen Dong, Anima Anandkumar, Abedelkadir Asi, Junjie Hu (2025), arXiv 2505.24133.

Reasoning traces repeat themselves, and repeated passages attend to each other, so attention
alone keeps many copies of the same thing. R-KV scores each token by

    Z_i = lambda * I_i - (1 - lambda) * R_i

* ``I``, importance: the attention the last observation-window queries pay to the token (the
  window attention of ``zipage.kernels.window_scores``: mean over the window, the GQA group
  reduced by ``group_reduce``), pooled over neighbours as ``pooling``/``pooling_kernel`` say;
* ``R``, redundancy: with ``S_ij`` the cosine similarity of the L2-normalised keys of tokens ``i``
  and ``j`` (``S_ii = 0``), the ``retain`` most recent tokens ``j`` with ``S_ij > threshold`` are
  not counted (a passage seen at most ``retain + 1`` times is not penalised; one repeated more
  often is), and ``R`` is the softmax over the context of the mean of row ``i``.

This is the all-pairs form of the paper; the ``zipage`` scorer's ``redundancy="lightning"`` is the
Zipage paper's within-page variant of the same idea. The ``S x S`` similarity is built in slices
of heads, so its scratch memory stays bounded.

Knobs (``ZipageConfig.extra``): ``rkv_lambda`` (0.1, the paper's choice), ``rkv_retain`` (1),
``rkv_threshold`` (0.5); ``group_reduce``, ``pooling`` and ``pooling_kernel`` are the config's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import pool_scores, window_scores
from . import register_scorer
from .base import Scorer, ScoreInputs
from .knobs import knob

_SLICE_ELEMENTS = 2**25  # S x S entries built at once (128 MiB of float32)


def rkv_redundancy(keys: torch.Tensor, key_mask: torch.Tensor, threshold: float, retain: int) -> torch.Tensor:
    """``[B, H, S, D]`` keys -> ``[B, H, S]`` redundancy, a distribution over each row's real tokens."""
    B, H, S, D = keys.shape
    kn = F.normalize(keys.float(), dim=-1).reshape(B * H, S, D)
    mask = key_mask[:, None, :].expand(B, H, S).reshape(B * H, S)
    n = mask.sum(dim=-1, keepdim=True).clamp_min(1).float()
    col = torch.arange(S, device=keys.device)
    eye = col[:, None] == col[None, :]
    rows = []
    step = max(1, _SLICE_ELEMENTS // max(S * S, 1))
    for a in range(0, B * H, step):
        k, m = kn[a : a + step], mask[a : a + step]
        sim = k @ k.transpose(1, 2)  # [b, S, S]
        pair = m[:, :, None] & m[:, None, :] & ~eye
        sim = sim.masked_fill(~pair, 0.0)
        if retain > 0:
            near = torch.where((sim > threshold) & pair, col, -1)  # the index of each near-duplicate, else -1
            newest = near.topk(min(retain, S), dim=-1).indices  # columns of the `retain` most recent ones
            found = near.gather(-1, newest) >= 0
            sim = sim.scatter(-1, newest, torch.where(found, 0.0, sim.gather(-1, newest)))
        rows.append(sim.sum(dim=-1))
    r = torch.cat(rows) / n
    r = r.masked_fill(~mask, float("-inf"))
    return torch.softmax(r, dim=-1).nan_to_num(0.0).view(B, H, S)


@register_scorer
class RKVScorer(Scorer):
    name = "rkv"
    config_fields = ("pooling", "pooling_kernel", "group_reduce")
    knobs = ("rkv_lambda", "rkv_retain", "rkv_threshold")
    needs_values = False
    needs_queries = True

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.lam = knob(self.config, "rkv_lambda", 0.1, low=0.0, high=1.0)
        self.retain = knob(self.config, "rkv_retain", 1, low=0)
        self.threshold = knob(self.config, "rkv_threshold", 0.5, low=-1.0, high=1.0)

    def score(self, x: ScoreInputs) -> torch.Tensor:
        cfg = self.config
        imp = window_scores(x.queries, x.keys, x.key_mask, x.query_mask, x.scaling, cfg.group_reduce, "mean")
        if cfg.pooling != "none" and cfg.pooling_kernel > 1:
            imp = pool_scores(imp, cfg.pooling_kernel, cfg.pooling)
        red = rkv_redundancy(x.keys, x.key_mask, self.threshold, self.retain)
        return self.lam * imp - (1.0 - self.lam) * red
