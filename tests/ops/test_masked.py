"""Masked reductions against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.ops.masked import masked_count, masked_mean, masked_sum, masked_var, masked_whiten

VALUES = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, -2.0, 50.0, 60.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
# selected: 1, 2, 3, 4, -2 -> sum 8, mean 1.6


def test_sum_and_mean_all_and_per_row():
    assert masked_sum(VALUES, MASK).item() == 8.0
    assert masked_mean(VALUES, MASK).item() == pytest.approx(1.6)
    torch.testing.assert_close(masked_sum(VALUES, MASK, dim=1), torch.tensor([6.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(masked_mean(VALUES, MASK, dim=1), torch.tensor([2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(masked_count(VALUES, MASK, dim=1), torch.tensor([3.0, 2.0], dtype=torch.float64))


def test_bool_and_float_masks_agree_and_float_masks_weigh():
    assert masked_mean(VALUES, MASK.bool()).item() == pytest.approx(1.6)
    weights = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    # (0.5 * 1 + 0.5 * 2 + 1 * 4) / 2
    assert masked_mean(VALUES, weights).item() == pytest.approx(2.75)


def test_empty_mask_gives_zero_not_nan_and_finite_gradient():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 0], [1, 0]])
    per_row = masked_mean(values, mask, dim=1)
    torch.testing.assert_close(per_row, torch.tensor([0.0, 3.0], dtype=torch.float64))
    empty = masked_mean(values, torch.zeros(2, 2))
    assert empty.item() == 0.0
    (per_row.sum() + empty).backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64))
    assert masked_var(values, torch.zeros(2, 2)).item() == 0.0


def test_infinite_padding_does_not_leak_into_value_or_gradient():
    values = torch.tensor([[-1.0, float("-inf")], [2.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[1, 0], [1, 0]])
    mean = masked_mean(values, mask)
    assert mean.item() == pytest.approx(0.5)
    mean.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.5, 0.0], [0.5, 0.0]]))


def test_variance_biased_and_unbiased():
    selected = [1.0, 2.0, 3.0, 4.0, -2.0]
    mean = sum(selected) / 5
    population = sum((v - mean) ** 2 for v in selected) / 5
    assert masked_var(VALUES, MASK, unbiased=False).item() == pytest.approx(population)
    assert masked_var(VALUES, MASK).item() == pytest.approx(population * 5 / 4)
    single = torch.tensor([[7.0, 0.0]])
    assert masked_var(single, torch.tensor([[1, 0]])).item() == 0.0


def test_whiten_gives_zero_mean_unit_variance_on_the_mask():
    whitened = masked_whiten(VALUES, MASK)
    selected = [1.0, 2.0, 3.0, 4.0, -2.0]
    mean = sum(selected) / 5
    std = math.sqrt(sum((v - mean) ** 2 for v in selected) / 4)
    expected = torch.tensor([[(1 - mean) / std, (2 - mean) / std, (3 - mean) / std, 0.0],
                             [(4 - mean) / std, (-2 - mean) / std, 0.0, 0.0]], dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(whitened, expected, rtol=1e-7, atol=1e-7)
    kept_mean = masked_whiten(VALUES, MASK, shift_mean=False)
    torch.testing.assert_close(masked_mean(kept_mean, MASK), torch.tensor(mean, dtype=torch.float64))
    torch.testing.assert_close(kept_mean[0, 0], torch.tensor((1 - mean) / std + mean, dtype=torch.float64))


def test_whiten_with_given_statistics_uses_them_and_matches_its_own():
    """PPO passes the global mean and std of a batch spread over processes; on one process they agree."""
    from posttrain.ops.distributed import global_mean_std

    torch.testing.assert_close(masked_whiten(VALUES, MASK, mean_std=global_mean_std), masked_whiten(VALUES, MASK))
    fixed = masked_whiten(VALUES, MASK, mean_std=lambda v, m: (torch.tensor(1.0), torch.tensor(2.0)))
    torch.testing.assert_close(fixed[0, :3], (VALUES[0, :3] - 1.0) / math.sqrt(4.0 + 1e-8))
    assert fixed[0, 3].item() == 0.0
