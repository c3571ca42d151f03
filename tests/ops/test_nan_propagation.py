"""A NaN in what a loss reads stays NaN (the non-finite guard must see it); a NaN in padding never leaks."""

import math

import torch

from posttrain.ops.logprobs import chunked_token_logps, fused_linear_nll
from posttrain.ops.masked import masked_mean, masked_sum, masked_whiten


def _head(n=6, d=8, vocab=11, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, d, generator=generator, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=generator)
    return hidden, weight, targets


def test_fused_nll_loss_and_gradients_are_nan_when_one_hidden_row_is():
    hidden, weight, targets = _head()
    poisoned = hidden.detach().clone()
    poisoned[2, 3] = float("nan")
    poisoned.requires_grad_(True)
    loss, _, _ = fused_linear_nll(poisoned, weight, targets, torch.full((6,), 1 / 6), chunk_size=4)
    loss.backward()
    assert math.isnan(loss.item())
    assert torch.isnan(weight.grad).any() and torch.isnan(poisoned.grad[2]).all()


def test_chunked_logps_are_nan_exactly_in_the_poisoned_row():
    hidden, weight, targets = _head()
    poisoned = hidden.detach().clone()
    poisoned[4, 0] = float("inf")
    logps, _, _ = chunked_token_logps(poisoned, weight, targets, chunk_size=4)
    assert torch.isnan(logps[4]) and torch.isfinite(logps[torch.arange(6) != 4]).all()


def test_masked_reductions_keep_a_selected_nan_and_drop_a_masked_one():
    values = torch.tensor([[1.0, float("nan"), 3.0], [4.0, 5.0, float("-inf")]])
    selected_nan = torch.tensor([[1, 1, 1], [1, 1, 0]])
    masked_nan = torch.tensor([[1, 0, 1], [1, 1, 0]])
    assert math.isnan(masked_mean(values, selected_nan).item())
    assert math.isnan(masked_sum(values, selected_nan).item())
    assert masked_mean(values, masked_nan).item() == (1 + 3 + 4 + 5) / 4
    assert torch.isfinite(masked_whiten(values, masked_nan)).all()
