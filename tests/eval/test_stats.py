"""Evaluation estimators against values worked out by hand or by brute force."""

from __future__ import annotations

import itertools
import math

import pytest

from posttrain.eval.stats import mean_interval, pass_at_k, wilson_interval, win_rate


def test_wilson_interval_by_hand():
    # 0 of 10: centre z²/2n / (1 + z²/n), half the same: low 0, high 3.8415/13.8415 = 0.27753
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(3.841459 / 13.841459, rel=1e-5)
    low, high = wilson_interval(5, 10)
    assert (low + high) / 2 == pytest.approx(0.5)
    assert high - low == pytest.approx(2 * 1.959964 * math.sqrt(0.025 + 3.841459 / 400) / 1.3841459, rel=1e-5)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 2), (6, 3, 4), (8, 1, 8), (4, 4, 2)])
def test_pass_at_k_equals_brute_force(n, c, k):
    draws = list(itertools.combinations(range(n), k))
    expected = sum(any(i < c for i in draw) for draw in draws) / len(draws)
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_k_larger_than_samples():
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_mean_interval_and_win_rate():
    mean, low, high = mean_interval([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0
    assert high - mean == pytest.approx(1.959964 * math.sqrt((4 + 1 + 0 + 9) / 3 / 4), rel=1e-5)
    rate, _, _ = win_rate([1.0, 0.0, 2.0, 5.0], [0.0, 0.0, 3.0, 1.0])
    assert rate == pytest.approx((1 + 0.5 + 0 + 1) / 4)
