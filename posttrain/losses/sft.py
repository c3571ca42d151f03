"""Supervised fine-tuning losses: token-level negative log-likelihood, and DFT.

``loss = -(1 / N) * sum_{t in targets} log p(x_t | x_<t)``, where N is the number of target tokens
in the whole accumulated batch (not per micro-batch, and not per sequence): every target token
weighs the same, and gradient accumulation over k micro-batches gives the update of one batch k
times larger.

``loss_type`` selects the per-token loss from :data:`SFT_LOSSES`: ``nll`` (above) or ``dft``
(each token's NLL weighted by its detached probability).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from posttrain.losses.registry import Registry


def nll_token_weights(num_selected: int, normaliser: torch.Tensor | int | float, device=None) -> torch.Tensor:
    """Per-token weights ``1 / N`` for the selected target tokens; shape (num_selected,).

    ``normaliser`` is N, the number of target tokens the loss is averaged over (at least 1).
    """
    n = torch.as_tensor(normaliser, dtype=torch.float32, device=device).clamp_min(1)
    return torch.ones(num_selected, dtype=torch.float32, device=device) / n


def nll_loss(token_logps: torch.Tensor, mask: torch.Tensor, num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """Reference form of the SFT loss from dense log-probs.

    Args:
        token_logps: (B, T) log-probabilities of the target tokens.
        mask: (B, T) 1 where the token is a target.
        num_items: N; defaults to ``mask.sum()``.

    Returns:
        scalar ``-sum(token_logps * mask) / N``.
    """
    mask = mask.to(token_logps.dtype)
    n = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=token_logps.dtype)
    return -(token_logps * mask).sum() / n.clamp_min(1)


# ----------------------------------------------------------------------------- loss types (``loss_type``)

TokenLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SFT_LOSSES: Registry[TokenLoss] = Registry("SFT loss type", field="loss_type")


@SFT_LOSSES.register("nll", "chunked_nll")
def nll_from_logps(token_logps: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
    """Weighted negative log-likelihood ``-sum_i w_i * log p_i``.

    ``chunked_nll`` is TRL's older name: posttrain always computes log-probs in chunks.

    Args:
        token_logps: (N,) log-probabilities of the target tokens.
        token_weights: (N,) e.g. ``1 / num_target_tokens`` (:func:`nll_token_weights`).
    """
    return -(token_logps * token_weights).sum()


@SFT_LOSSES.register("dft")
def dft_from_logps(token_logps: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
    """Dynamic Fine-Tuning (Wu et al. 2025, "On the Generalization of SFT: A Reinforcement Learning
    Perspective with Reward Rectification", arXiv:2508.05629).

    ``loss = -sum_i w_i * sg(p_i) * log p_i`` with ``p_i = exp(log p_i)`` and ``sg`` stop-gradient:
    each token's NLL is weighted by its own (detached) probability, so the gradient is
    ``-w_i * p_i * grad log p_i``, which damps the large updates SFT makes on tokens the model
    finds unlikely.

    Args:
        token_logps: (N,) log-probabilities of the target tokens.
        token_weights: (N,) per-token normalisation, as for :func:`nll_from_logps`.
    """
    return -(token_logps * token_logps.detach().exp() * token_weights).sum()
