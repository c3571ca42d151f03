"""Bradley-Terry reward loss and helpers against Python-float values."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.errors import DataError
from posttrain.losses.reward import bradley_terry_loss, center_rewards_penalty, reward_metrics

CHOSEN = [1.5, -0.2, 0.3]
REJECTED = [0.5, 0.4, 0.3]
MARGIN = [0.5, 0.0, 1.0]


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_loss_without_and_with_margin():
    plain = [math.log1p(math.exp(-(c - r))) for c, r in zip(CHOSEN, REJECTED)]
    torch.testing.assert_close(bradley_terry_loss(t(CHOSEN), t(REJECTED)), t(plain))
    with_margin = [math.log1p(math.exp(-(c - r - m))) for c, r, m in zip(CHOSEN, REJECTED, MARGIN)]
    torch.testing.assert_close(bradley_terry_loss(t(CHOSEN), t(REJECTED), t(MARGIN)), t(with_margin))


def test_loss_is_stable_for_large_differences():
    loss = bradley_terry_loss(torch.tensor([-200.0, 200.0]), torch.tensor([200.0, -200.0]))
    assert torch.isfinite(loss).all()
    assert loss[0].item() == pytest.approx(400.0)
    assert loss[1].item() == pytest.approx(0.0, abs=1e-30)


def test_gradient_is_minus_sigmoid_of_minus_difference():
    chosen = t(CHOSEN).requires_grad_()
    rejected = t(REJECTED).requires_grad_()
    bradley_terry_loss(chosen, rejected).sum().backward()
    for i, (c, r) in enumerate(zip(CHOSEN, REJECTED)):
        expected = -1.0 / (1.0 + math.exp(c - r))
        assert chosen.grad[i].item() == pytest.approx(expected)
        assert rejected.grad[i].item() == pytest.approx(-expected)


def test_center_rewards_penalty():
    expected = sum((c + r) ** 2 for c, r in zip(CHOSEN, REJECTED)) / 3
    assert center_rewards_penalty(t(CHOSEN), t(REJECTED)).item() == pytest.approx(expected)


def test_metrics():
    metrics = reward_metrics(t(CHOSEN), t(REJECTED))
    everything = CHOSEN + REJECTED
    mean = sum(everything) / 6
    assert metrics["accuracy"] == pytest.approx(1 / 3)  # the tie at index 2 is not a win
    assert metrics["margin"] == pytest.approx(sum(c - r for c, r in zip(CHOSEN, REJECTED)) / 3)
    assert metrics["mean_reward"] == pytest.approx(mean)
    assert metrics["std_reward"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in everything) / 6))
    assert metrics["min_reward"] == -0.2 and metrics["max_reward"] == 1.5


def test_shape_mismatch_is_a_data_error():
    with pytest.raises(DataError, match="same length"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(DataError, match=r"\(B,\)"):
        center_rewards_penalty(torch.zeros(3, 1), torch.zeros(3, 1))
