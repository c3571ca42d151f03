"""Estimators and confidence intervals for evaluation figures.

Small held-out sets move a lot per problem (41 problems: 2.4 points each), so every rate this
package reports comes with an interval. Pure functions of plain numbers; no model, no tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """95% Wilson score interval of a rate ``successes / n``.

    Wilson, "Probable inference, the law of succession, and statistical inference" (JASA 1927):
    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``. Unlike the normal interval it stays in
    [0, 1] and is not empty at p = 0 or 1. Returns ``(nan, nan)`` for ``n = 0``.
    """
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: Sequence[float], z: float = Z_95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its normal 95% interval ``mean ± z·s/sqrt(n)``.

    ``s`` is the unbiased standard deviation; one value gives a zero-width interval, none gives NaNs.
    """
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, mean, mean
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(variance / n)
    return mean, mean - half, mean + half


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from ``num_samples`` draws of which ``num_correct`` were right.

    Chen et al., "Evaluating Large Language Models Trained on Code" (arXiv:2107.03374, eq. 1):
    ``1 - C(n - c, k) / C(n, k)``, the chance that at least one of k draws without replacement is
    right. Computed as a running product to stay exact for large n.
    """
    if not 0 < k <= num_samples:
        raise ValueError(f"pass@k needs 0 < k <= num_samples, got k={k}, num_samples={num_samples}")
    if num_samples - num_correct < k:
        return 1.0
    miss = 1.0
    for i in range(num_samples - num_correct + 1, num_samples + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def win_rate(scores: Sequence[float], baseline_scores: Sequence[float]) -> tuple[float, float, float]:
    """``(rate, low, high)``: share of paired items where ``scores`` beat ``baseline_scores``, ties half.

    The interval is Wilson's on the win count (ties counted as half a win).
    """
    if len(scores) != len(baseline_scores):
        raise ValueError(f"win rate needs paired scores, got {len(scores)} and {len(baseline_scores)}")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline_scores))
    n = len(scores)
    low, high = wilson_interval(wins, n)
    return (wins / n if n else float("nan")), low, high
