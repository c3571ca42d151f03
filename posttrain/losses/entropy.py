"""Entropy terms of the policy loss: high-entropy token selection, the entropy bonus, its adaptive coefficient.

The per-token entropy ``H_t = -sum_v p_v log p_v`` of the policy's next-token distribution comes from
the chunked head (:func:`posttrain.ops.logprobs.chunked_token_logps`), differentiable, without the
full logits ever held.

* :func:`high_entropy_mask` keeps in the policy loss only the tokens whose entropy lies in the top
  ``rho`` quantile (Wang et al., "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective
  Reinforcement Learning for LLM Reasoning", arXiv:2506.01939; the paper uses rho = 0.2).
* :func:`mean_token_entropy` is the bonus ``H`` of ``L = L_policy - c * H``: the mean entropy of the
  tokens the loss acts on, whatever the loss type's own normalisation.
* :func:`adaptive_entropy_coef` moves ``c`` by a fixed step towards keeping the entropy above a target
  (He et al., "Skywork Open Reasoner 1 Technical Report", arXiv:2505.22312, adaptive entropy control).
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def quantile_linear(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-quantile of a 1-D tensor with linear interpolation between order statistics (numpy's and
    ``torch.quantile``'s default), computed by sorting so that it has no size limit. ``(n,) -> ()`` float64."""
    ordered = values.detach().double().sort().values
    position = q * (ordered.numel() - 1)
    low = int(math.floor(position))
    high = min(low + 1, ordered.numel() - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def high_entropy_mask(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    top_quantile: float,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Tokens whose entropy is at least the ``(1 - top_quantile)``-quantile of the entropies under ``mask``.

    ``top_quantile = rho`` keeps about the highest-entropy fraction ``rho`` of the tokens; 1.0 keeps
    them all, 0.0 only the highest-entropy token (and its ties). The threshold is taken over the
    tokens of every process when ``gather`` is given (it concatenates a 1-D tensor over processes),
    so it is the threshold of the whole micro-batch, however it is spread.

    Shapes: ``entropy`` (B, T) float, ``mask`` (B, T) (1 on the tokens a loss counts). Returns (B, T)
    bool, False wherever ``mask`` is 0 and everywhere when no token is under ``mask``.
    """
    valid = mask.bool()
    pool = entropy.detach()[valid].double()
    if gather is not None:
        pool = gather(pool)
    if pool.numel() == 0:
        return torch.zeros_like(valid)
    threshold = quantile_linear(pool, 1.0 - top_quantile)
    return (entropy.detach().double() >= threshold) & valid


def mean_token_entropy(entropy: torch.Tensor, mask: torch.Tensor, token_count: torch.Tensor | float | None = None
                       ) -> torch.Tensor:
    """``sum_t H_t m_t / count``: the mean entropy of the tokens under ``mask`` (differentiable through ``entropy``).

    ``count`` defaults to the number of tokens under ``mask``; a trainer passes the count over every
    process (and rescales for the data-parallel gradient average) so that the mean is the micro-batch's.
    Shapes: ``entropy``, ``mask`` (B, T); returns a 0-dim float tensor (0 when nothing is under ``mask``).
    """
    weights = mask.to(entropy.dtype)
    count = weights.sum() if token_count is None else torch.as_tensor(token_count, dtype=entropy.dtype,
                                                                       device=entropy.device)
    return (entropy * weights).sum() / count.clamp(min=1.0)


def adaptive_entropy_coef(coef: float, entropy: float, *, target: float, delta: float, coef_min: float,
                          coef_max: float) -> float:
    """One step of adaptive entropy control: ``min(c + delta, c_max)`` if ``entropy <= target``, else
    ``max(c - delta, c_min)``. ``entropy`` is the mean token entropy of the optimizer step just taken."""
    if entropy <= target:
        return min(coef + delta, coef_max)
    return max(coef - delta, coef_min)


def applied_entropy_coef(coef: float, last_entropy: float, *, adaptive: bool, target: float) -> float:
    """The coefficient the bonus uses in the current optimizer step: ``coef``; under adaptive control, 0
    unless the previous step's mean entropy was at or below ``target`` (none yet: ``last_entropy = inf``)."""
    if adaptive and not last_entropy <= target:
        return 0.0
    return coef
