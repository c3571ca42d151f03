"""Reward-model training: the Bradley-Terry pairwise loss and its helpers.

A reward model gives one scalar per (prompt, completion). For a preference pair it should score
the chosen completion above the rejected one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.errors import DataError


def _check_pair(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> None:
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise DataError(
            "chosen and rejected rewards must be two vectors of the same length",
            expected="shapes (B,) and (B,)",
            found=f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}",
            fix="squeeze the reward head's last dimension and split the batch into chosen and rejected halves",
        )


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Pairwise Bradley-Terry negative log-likelihood, per example.

    Paper: Ouyang et al., "Training language models to follow instructions with human feedback"
    (InstructGPT), arXiv:2203.02155, eq. 1; the margin term is from Touvron et al., "Llama 2",
    arXiv:2307.09288, eq. 2.

    ``loss_i = -log sigmoid(r_c,i - r_r,i - m_i)``, computed with ``logsigmoid`` so it stays finite
    for large negative differences.

    Args:
        chosen_rewards: (B,) scores of the chosen completions.
        rejected_rewards: (B,) scores of the rejected completions.
        margin: optional (B,) required gap between them (e.g. from a preference strength rating).

    Returns:
        (B,) per-example loss; the trainer takes the mean.
    """
    _check_pair(chosen_rewards, rejected_rewards)
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin.to(difference.dtype)
    return -F.logsigmoid(difference)


def center_rewards_penalty(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Auxiliary loss that pulls the reward model's outputs towards zero mean.

    Paper: Eisenstein et al., "Helping or Herding? Reward Model Ensembles Mitigate but do not
    Eliminate Reward Hacking", arXiv:2312.09244. The Bradley-Terry loss only sees differences, so
    the scale's offset is free; this term pins it. The trainer adds
    ``center_rewards_coefficient * penalty`` to the loss (a coefficient of 0.01 is the usual choice).

    ``penalty = mean_i (r_c,i + r_r,i)^2``

    Args:
        chosen_rewards: (B,).
        rejected_rewards: (B,).

    Returns:
        scalar.
    """
    _check_pair(chosen_rewards, rejected_rewards)
    return ((chosen_rewards + rejected_rewards) ** 2).mean()


@torch.no_grad()
def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Logging metrics for a batch of reward-model scores.

    Keys: ``accuracy`` (fraction with r_c > r_r; ties count as wrong), ``margin`` (mean r_c - r_r),
    ``mean_reward``, ``std_reward`` (population std over the 2B scores), ``min_reward``,
    ``max_reward``.
    """
    _check_pair(chosen_rewards, rejected_rewards)
    chosen = chosen_rewards.detach().double()
    rejected = rejected_rewards.detach().double()
    all_rewards = torch.cat([chosen, rejected])
    return {
        "accuracy": (chosen > rejected).double().mean().item(),
        "margin": (chosen - rejected).mean().item(),
        "mean_reward": all_rewards.mean().item(),
        "std_reward": all_rewards.std(unbiased=False).item(),
        "min_reward": all_rewards.min().item(),
        "max_reward": all_rewards.max().item(),
    }
