"""Dense loop references that the library's score operations are checked against.

Each one is written the most obvious way: Python loops over rows, heads, queries and tokens,
with Python floats (double precision), from what the docstrings and docs/method.md say. They use
only ``math`` and ``torch`` (for the tensors going in and out), never the library itself.
"""

from __future__ import annotations

import math

import torch


def dot(a, b):
    """Exactly rounded dot product of two sequences of floats."""
    return math.fsum(x * y for x, y in zip(a, b))


def softmax(logits: dict) -> dict:
    """Softmax over the values of ``{key: logit}`` -> ``{key: probability}``."""
    m = max(logits.values())
    e = {j: math.exp(v - m) for j, v in logits.items()}
    z = math.fsum(e.values())
    return {j: v / z for j, v in e.items()}


def ref_window_scores(queries, keys, key_mask, query_mask, scaling, group_reduce, window_reduce):
    """Window attention score -> float64 [B, Hkv, S].

    Query i sits at stored index S-w+i and attends causally; softmax over the valid keys it sees,
    reduced over the GQA group (``max``/``mean``), then over the valid queries (``mean``/``sum``).
    """
    Q = queries.double().tolist()
    K = keys.double().tolist()
    km = key_mask.tolist()
    qm = query_mask.tolist()
    B, Hq, w, _ = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    G = Hq // Hkv
    out = torch.zeros(B, Hkv, S, dtype=torch.float64)
    for b in range(B):
        n_valid_q = sum(1 for i in range(w) if qm[b][i])
        for h in range(Hkv):
            total = [0.0] * S
            for i in range(w):
                if not qm[b][i]:
                    continue
                pos = S - w + i  # where window query i sits among the stored tokens
                visible = [j for j in range(S) if km[b][j] and j <= pos]
                per_head = []
                for g in range(G):
                    qv = Q[b][h * G + g][i]  # query heads h*G .. h*G+G-1 share KV head h
                    p = softmax({j: scaling * dot(qv, K[b][h][j]) for j in visible})
                    per_head.append([p.get(j, 0.0) for j in range(S)])
                for j in range(S):
                    col = [p[j] for p in per_head]
                    total[j] += max(col) if group_reduce == "max" else sum(col) / G
            for j in range(S):
                if window_reduce == "mean":
                    out[b, h, j] = total[j] / n_valid_q if n_valid_q else 0.0
                else:
                    out[b, h, j] = total[j]
    return out


def ref_redundancy(keys, key_mask, block, threshold, tau):
    """R-KV redundancy -> (float64 [B, H, S], coverage stats).

    Cosine similarity to the other valid tokens (of the same page of ``block`` tokens, or all of
    them when ``block`` is None), minus the most recent near-duplicate (similarity > threshold),
    softmax over the valid tokens at temperature ``tau * n``. The stats say how well the inputs
    exercise the rule: tokens with a near-duplicate, tokens with several, and the smallest
    distance of any similarity from the threshold.
    """
    K = keys.double().tolist()
    km = key_mask.tolist()
    B, H, S, _ = keys.shape
    n = block if block is not None else S
    out = torch.zeros(B, H, S, dtype=torch.float64)
    stats = {"with_near": 0, "multi_near": 0, "margin": math.inf}
    for b in range(B):
        valid = [j for j in range(S) if km[b][j]]
        for h in range(H):
            unit = []
            for j in range(S):
                v = K[b][h][j]
                norm = math.sqrt(math.fsum(x * x for x in v))
                unit.append([x / norm for x in v])
            r = {}
            for i in valid:
                comp = [j for j in valid if j != i and (block is None or j // block == i // block)]
                sims = {j: dot(unit[i], unit[j]) for j in comp}
                near = [j for j in comp if sims[j] > threshold]
                for j in comp:
                    stats["margin"] = min(stats["margin"], abs(sims[j] - threshold))
                stats["with_near"] += bool(near)
                stats["multi_near"] += len(near) >= 2
                jstar = max(near) if near else None  # the most recent near-duplicate
                r[i] = math.fsum(s for j, s in sims.items() if j != jstar)
            if not valid:
                continue
            p = softmax({i: r[i] / (tau * n) for i in valid})
            for i in valid:
                out[b, h, i] = p[i]
    return out, stats


def ref_pool(scores, kernel, mode):
    """1-D pooling over the token axis of [B, H, S] scores (``max`` or else average), window
    ``kernel`` centred on each token and cut at the edges -> float64 [B, H, S]."""
    X = scores.double().tolist()
    B, H, S = scores.shape
    half = kernel // 2
    out = torch.zeros(B, H, S, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(S):
                win = [X[b][h][j] for j in range(i - half, i + half + 1) if 0 <= j < S]
                out[b, h, i] = max(win) if mode == "max" else math.fsum(win) / len(win)
    return out
