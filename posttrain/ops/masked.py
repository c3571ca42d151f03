"""Reductions over the valid entries of a padded tensor.

Completions in a batch have different lengths, so every per-token tensor comes with a mask (1 for a
real token, 0 for padding). These helpers reduce over the masked entries only, and are safe on
padding that holds ``inf`` or ``NaN`` (a log-prob of a pad token may be ``-inf``): masked-out
entries never reach the result, nor its gradient. A NaN or inf in a *selected* entry does reach it:
a diverged step must show as NaN so that the trainers' non-finite guard can skip it.

An empty selection (a mask of all zeros) gives a sum of 0, a mean of 0 and a variance of 0, never
``NaN``: an empty micro-batch must not poison a gradient-accumulation window.

``mask`` may be bool, integer or float and must broadcast against ``values``; a float mask acts as
per-entry weights (the mean is then ``sum(w * x) / sum(w)``).
"""

from __future__ import annotations

import torch

Dim = int | tuple[int, ...] | None


def _weights_like(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(values.dtype) if mask.dtype != values.dtype else mask
    return torch.broadcast_to(weights, torch.broadcast_shapes(values.shape, weights.shape))


def _select(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # `values * 0` is NaN where values are inf/NaN, so pick zeros explicitly instead of multiplying
    return torch.where(weights != 0, values * weights, torch.zeros((), dtype=values.dtype, device=values.device))


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is non-zero (weighted by ``mask``).

    Args:
        values: any shape, e.g. (B, T).
        mask: broadcastable to ``values``.
        dim: dimension(s) to reduce; ``None`` reduces everything to a scalar.

    Returns:
        ``sum(values * mask)`` over ``dim``.
    """
    weights = _weights_like(values, mask)
    selected = _select(values, weights)
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_count(values: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """Number of selected entries (sum of the mask weights) over ``dim``, in ``values.dtype``."""
    weights = _weights_like(values, mask)
    return weights.sum() if dim is None else weights.sum(dim=dim)


def _safe_divide(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    # Dividing by a clamped count keeps both the value and the gradient finite where count == 0
    # (there `total` is 0 too, so the result is 0). torch.where over a 0/0 would leave NaN in backward.
    safe_count = torch.where(count != 0, count, torch.ones((), dtype=count.dtype, device=count.device))
    return total / safe_count


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """Mean of ``values`` over the entries selected by ``mask``; 0 where nothing is selected.

    Args:
        values: any shape, e.g. (B, T).
        mask: broadcastable to ``values``.
        dim: dimension(s) to reduce; ``None`` gives a scalar.

    Returns:
        ``sum(values * mask) / sum(mask)`` over ``dim``, and 0 (not NaN) for an all-zero mask.
    """
    return _safe_divide(masked_sum(values, mask, dim), masked_count(values, mask, dim))


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of all selected entries (a scalar).

    ``var = sum(mask * (x - mean)^2) / n`` with ``n = sum(mask)``; ``unbiased`` applies Bessel's
    correction ``n / (n - 1)``. With fewer than two selected entries the unbiased variance is
    undefined; it is returned as 0 (so whitening leaves such a batch centred, not ``NaN``).
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = masked_count(values, mask)
        bessel = torch.where(count > 1, count / (count - 1).clamp_min(1e-12), torch.zeros_like(count))
        variance = variance * bessel
    return variance


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, mean_std=None
) -> torch.Tensor:
    """Normalise the selected entries to unit variance (and zero mean unless ``shift_mean=False``).

    ``(x - mean) / sqrt(var + eps)``, plus ``mean`` back when ``shift_mean`` is False (PPO whitens
    rewards that way: scale without moving their mean). Mean and (unbiased) variance are taken over
    every selected entry of the tensor. Entries outside the mask are returned as 0.

    Args:
        values: (B, T) or any shape.
        mask: broadcastable to ``values``.
        mean_std: ``(values, mask) -> (mean, std)`` taking the statistics instead, e.g.
            :func:`posttrain.ops.distributed.global_mean_std` for a batch spread over processes.

    Returns:
        tensor shaped like ``values``.
    """
    if mean_std is None:
        mean = masked_mean(values, mask)
        variance = masked_var(values, mask, unbiased=True)
    else:
        mean, std = mean_std(values, torch.broadcast_to(mask, values.shape))
        mean, variance = mean.to(values.dtype), (std * std).to(values.dtype)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    weights = _weights_like(values, mask)
    return torch.where(weights != 0, whitened, torch.zeros((), dtype=values.dtype, device=values.device))
