"""Entropy terms of the policy loss, against numpy / hand-computed values."""

import math

import numpy as np
import pytest
import torch

from posttrain.losses.entropy import (
    adaptive_entropy_coef,
    applied_entropy_coef,
    high_entropy_mask,
    mean_token_entropy,
    quantile_linear,
)

ENTROPY = torch.tensor([[0.10, 2.00, 0.70, 9.00], [1.50, 0.30, 0.90, 2.50], [0.20, 0.40, 5.00, 0.60]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])


@pytest.mark.parametrize("q", [0.0, 0.13, 0.5, 0.8, 1.0])
def test_quantile_matches_numpy_linear_interpolation(q):
    values = torch.tensor([0.3, -1.0, 2.5, 0.3, 7.0, 1.1], dtype=torch.float64)
    assert quantile_linear(values, q).item() == pytest.approx(float(np.quantile(values.numpy(), q)), abs=1e-12)


@pytest.mark.parametrize("rho", [0.0, 0.2, 0.5, 1.0])
def test_high_entropy_mask_keeps_the_top_quantile_of_the_masked_tokens(rho):
    got = high_entropy_mask(ENTROPY, MASK, rho)
    valid = ENTROPY[MASK.bool()].double().numpy()
    threshold = np.quantile(valid, 1 - rho)
    expected = (ENTROPY.double().numpy() >= threshold) & MASK.bool().numpy()
    assert np.array_equal(got.numpy(), expected)
    # padding never counts, whatever its entropy (9.0 and 5.0 sit on padding)
    assert not got[0, 3] and not got[2, 2]


def test_high_entropy_mask_by_hand():
    # the 9 valid entropies sorted: .1 .2 .3 .4 .7 .9 1.5 2.0 2.5; rho = 0.2 -> 0.8-quantile at
    # position 6.4: 1.5 + 0.4 * (2.0 - 1.5) = 1.7, so 2.0 and 2.5 are kept
    got = high_entropy_mask(ENTROPY, MASK, 0.2)
    assert got.nonzero().tolist() == [[0, 1], [1, 3]]
    assert high_entropy_mask(ENTROPY, MASK, 0.0).nonzero().tolist() == [[1, 3]]  # the single highest
    assert torch.equal(high_entropy_mask(ENTROPY, MASK, 1.0), MASK.bool())
    assert not high_entropy_mask(ENTROPY, torch.zeros_like(MASK), 0.2).any()


def test_mean_token_entropy_is_the_masked_mean_and_differentiable():
    entropy = ENTROPY.clone().requires_grad_(True)
    value = mean_token_entropy(entropy, MASK)
    assert value.item() == pytest.approx(ENTROPY[MASK.bool()].double().mean().item(), rel=1e-6)
    value.backward()
    assert torch.allclose(entropy.grad, MASK.float() / MASK.sum())
    assert mean_token_entropy(ENTROPY, MASK, token_count=20.0).item() == pytest.approx(
        ENTROPY[MASK.bool()].double().sum().item() / 20.0, rel=1e-6)


def test_adaptive_coefficient_steps_and_is_bounded():
    step = dict(target=0.5, delta=0.1, coef_min=0.0, coef_max=0.25)
    assert adaptive_entropy_coef(0.0, 0.4, **step) == pytest.approx(0.1)  # below target: up
    assert adaptive_entropy_coef(0.2, 0.5, **step) == pytest.approx(0.25)  # at target: up, capped
    assert adaptive_entropy_coef(0.05, 0.9, **step) == 0.0  # above target: down, floored
    assert applied_entropy_coef(0.3, math.inf, adaptive=True, target=0.5) == 0.0  # no step measured yet
    assert applied_entropy_coef(0.3, 0.6, adaptive=True, target=0.5) == 0.0
    assert applied_entropy_coef(0.3, 0.5, adaptive=True, target=0.5) == 0.3
    assert applied_entropy_coef(0.3, 9.0, adaptive=False, target=0.5) == 0.3
