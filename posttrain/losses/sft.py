"""Supervised fine-tuning loss: token-level negative log-likelihood.

``loss = -(1 / N) * sum_{t in targets} log p(x_t | x_<t)``, where N is the number of target tokens
in the whole accumulated batch (not per micro-batch, and not per sequence): every target token
weighs the same, and gradient accumulation over k micro-batches gives the update of one batch k
times larger.
"""

from __future__ import annotations

import torch


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
