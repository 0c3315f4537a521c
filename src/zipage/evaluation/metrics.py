"""Task accuracy from per-sample verdicts: pass@1 averaged over the ``n`` samples of every problem."""

from __future__ import annotations

import math
from collections.abc import Sequence


def pass_at_1(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the share of their samples that are right (each problem weighs the same,
    whatever its number of samples). ``correct[i][j]``: sample ``j`` of problem ``i``."""
    if not correct or any(len(row) == 0 for row in correct):
        raise ValueError("pass@1 needs at least one problem and one sample per problem")
    return sum(sum(map(bool, row)) / len(row) for row in correct) / len(correct)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` are right:
    1 - C(n - c, k) / C(n, k), the chance that ``k`` of the samples drawn without replacement hold a
    right one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def standard_error(correct: Sequence[Sequence[bool]]) -> float:
    """The standard error of ``pass_at_1`` over problems (the spread between problems' scores)."""
    scores = [sum(map(bool, row)) / len(row) for row in correct]
    if len(scores) < 2:
        return float("nan")
    mean = sum(scores) / len(scores)
    var = sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)
    return math.sqrt(var / len(scores))
