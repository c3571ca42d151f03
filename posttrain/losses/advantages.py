"""Advantages for online RL: group-relative (GRPO), leave-one-out (RLOO), GAE (PPO), KL-shaped rewards.

Group layout: a batch of N = P * G completions holds G completions for each of P prompts, stored
contiguously: rows ``g*G .. g*G + G - 1`` share prompt g.

A reward of ``NaN`` marks a completion no reward function could score: it is left out of its
group's statistics and gets an advantage of 0 (it carries no signal either way).

Statistics over the whole batch (``scale_rewards="batch"``, GDPO's whitening, RLOO's
``normalize``) come from a ``batch_mean_std`` argument, ``values -> (mean, std)``: by default
:func:`local_mean_std` over the values given; a trainer running on several processes passes
:func:`posttrain.ops.distributed.global_mean_std`, so each process's share of the batch is
normalised by the statistics of the whole batch, as one process holding it all would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from posttrain.errors import ConfigError, DataError
from posttrain.losses.kl import kl_divergence
from posttrain.losses.registry import Registry
from posttrain.ops.masked import masked_sum

SCALE_REWARDS = ("group", "batch", "none")

# values (any shape, NaN = absent) -> (mean, unbiased std), 0-dim tensors
BatchMeanStd = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def local_mean_std(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std of the non-NaN ``values``, from their count, sum and sum of squares in float64.

    The same formula as :func:`posttrain.ops.distributed.global_mean_std` on one process: std is 0 for
    fewer than two values, the mean NaN for none. Returns 0-dim float64 tensors.
    """
    values = values.detach().double()
    keep = ~torch.isnan(values)
    kept = torch.where(keep, values, torch.zeros_like(values))
    count, total, total_sq = keep.sum().double(), kept.sum(), (kept * kept).sum()
    mean = total / count if count > 0 else torch.tensor(float("nan"), dtype=torch.float64, device=values.device)
    if count < 2:
        return mean, torch.zeros((), dtype=torch.float64, device=values.device)
    return mean, ((total_sq - count * mean * mean) / (count - 1)).clamp_min(0.0).sqrt()


@dataclass
class GroupStats:
    """Per-group statistics of the rewards, for logging; each (P,) for P prompts."""

    mean: torch.Tensor
    std: torch.Tensor

    @property
    def frac_zero_std(self) -> float:
        """Fraction of groups whose rewards are all equal (no learning signal under GRPO)."""
        zero = torch.isclose(self.std, torch.zeros_like(self.std))
        return zero.float().mean().item() if zero.numel() else 0.0


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1:
        raise ConfigError(f"the group size must be at least 1; got {group_size}", field="num_generations",
                          fix="generate at least 2 completions per prompt")  # fmt: skip
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise DataError(
            "rewards must be a vector holding whole groups of completions",
            expected=f"shape (P * {group_size},)",
            found=f"shape {tuple(rewards.shape)}",
            fix="make the batch size a multiple of num_generations",
        )
    return rewards.view(-1, group_size)


def _nan_std(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased std ignoring NaN; NaN where fewer than two values are present."""
    valid = ~torch.isnan(values)
    count = valid.sum() if dim is None else valid.sum(dim)
    mean = torch.nanmean(values) if dim is None else torch.nanmean(values, dim=dim, keepdim=True)
    squares = torch.where(valid, (values - mean) ** 2, torch.zeros_like(values))
    total = squares.sum() if dim is None else squares.sum(dim)
    variance = total / (count - 1).clamp_min(1)
    return torch.where(count > 1, variance.sqrt(), torch.full_like(variance, float("nan")))


def _group_stats(rewards: torch.Tensor, group_size: int) -> GroupStats:
    grouped = _grouped(rewards, group_size)
    std = _nan_std(grouped, dim=1) if group_size > 1 else torch.zeros_like(grouped[:, 0])
    return GroupStats(mean=torch.nanmean(grouped, dim=1), std=std)


def group_relative_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale_rewards: str = "group",
    eps: float = 1e-4,
    batch_mean_std: BatchMeanStd = local_mean_std,
) -> tuple[torch.Tensor, GroupStats]:
    """GRPO advantages: each reward relative to its group's mean, optionally divided by a std.

    Papers: Shao et al., "DeepSeekMath", arXiv:2402.03300 (GRPO, sec. 4.1.2); Liu et al.,
    "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv:2503.20783 (Dr. GRPO:
    no std scaling); batch scaling from Liu et al., "Part I: Tricks or Traps? A Deep Dive into RL for
    LLM Reasoning", arXiv:2508.08221.

    ``A_i = (r_i - mean_g(r)) / (std + eps)`` where std is the group's (``"group"``), the whole
    batch's (``"batch"``), or none at all (``"none"``: ``A_i = r_i - mean_g(r)``). Stds are unbiased
    (Bessel-corrected). ``NaN`` rewards are skipped and get ``A = 0``.

    Args:
        rewards: (N,) with N = P * group_size.
        group_size: completions per prompt (G).
        scale_rewards: "group", "batch" or "none".
        eps: added to the std.
        batch_mean_std: the batch statistics for ``"batch"`` (pass a global one on several processes).

    Returns:
        ``(advantages (N,), GroupStats)`` with the per-group mean and std (P,) (``frac_zero_std``
        is the fraction of groups whose rewards are all equal).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ConfigError(f"unknown scale_rewards {scale_rewards!r}", field="scale_rewards",
                          fix="use 'group', 'batch' or 'none'")  # fmt: skip
    grouped = _grouped(rewards, group_size)
    group_mean = torch.nanmean(grouped, dim=1)
    group_std = _nan_std(grouped, dim=1) if group_size > 1 else torch.zeros_like(group_mean)
    advantages = grouped - group_mean.unsqueeze(1)
    if scale_rewards == "group":
        advantages = advantages / (group_std.unsqueeze(1) + eps)
    elif scale_rewards == "batch":
        _, batch_std = batch_mean_std(rewards)
        advantages = advantages / (batch_std.to(advantages.dtype) + eps)
    advantages = torch.nan_to_num(advantages.reshape(-1), nan=0.0)
    return advantages, GroupStats(mean=group_mean, std=group_std)


def turn_level_advantages(
    turn_rewards: torch.Tensor,
    final_rewards: torch.Tensor,
    group_size: int,
    scale_rewards: str = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Turn-level credit for multi-turn episodes: each sampled turn's reward-to-go, relative to the group.

    In the spirit of multi-turn GRPO with turn-level rewards (Zeng et al., "Reinforcing Multi-Turn
    Reasoning in LLM Agents via Turn-Level Credit Assignment", arXiv:2505.11821). With ``r_{i,t}`` the
    reward of turn ``t`` of completion ``i`` and ``R_i`` its final (trajectory) reward:

        ``G_{i,t} = sum_{k >= t} r_{i,k} + R_i``  (reward-to-go; ``G_{i,0}`` is the whole return)
        ``A_{i,t} = (G_{i,t} - mean_j G_{j,t}) / (std_j G_{j,t} + eps)``

    where ``j`` runs over the completions of the same prompt that reached turn ``t`` (unbiased std;
    ``"none"`` only centres). A turn the episode never reached (``NaN`` in ``turn_rewards``), a turn
    only one completion of its group reached, and a completion with a ``NaN`` final reward get ``A = 0``.

    Args:
        turn_rewards: (N, T) float, ``NaN`` past each episode's last turn (missing rewards of reached turns: 0).
        final_rewards: (N,) float.
        group_size: completions per prompt (G).
        scale_rewards: "group" or "none".

    Returns:
        (N, T) advantages.
    """
    if scale_rewards not in ("group", "none"):
        raise ConfigError(f"turn-level credit supports scale_rewards 'group' or 'none', got {scale_rewards!r}",
                          field="scale_rewards", fix="use scale_rewards='group' or 'none' with credit_assignment='turn'")
    _grouped(final_rewards, group_size)  # shape check
    reached = ~torch.isnan(turn_rewards)
    rewards = torch.nan_to_num(turn_rewards, nan=0.0)
    to_go = rewards.flip(1).cumsum(1).flip(1) + final_rewards.unsqueeze(1)
    to_go = torch.where(reached, to_go, torch.full_like(to_go, float("nan")))
    grouped = to_go.view(-1, group_size, to_go.shape[1])  # (P, G, T)
    centred = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale_rewards == "group":
        std = _nan_std(grouped.transpose(1, 2), dim=2).unsqueeze(1)  # (P, 1, T), NaN where < 2 values
        centred = centred / (std + eps)
    return torch.nan_to_num(centred.reshape(to_go.shape), nan=0.0)


def broadcast_turn_advantages(turn_advantages: torch.Tensor, turn_index: torch.Tensor) -> torch.Tensor:
    """Per-token advantages from per-turn ones: token ``c`` of row ``i`` gets ``A_{i, turn_index[i, c]}``, and 0
    where ``turn_index`` is -1 (tool-result tokens, padding).

    Shapes: ``turn_advantages (N, T)``, ``turn_index (N, C)`` long -> ``(N, C)``.
    """
    index = turn_index.clamp(min=0).to(turn_advantages.device)
    values = turn_advantages.gather(1, index)
    return torch.where(turn_index.to(values.device) >= 0, values, torch.zeros_like(values))


def leave_one_out_advantages(
    rewards: torch.Tensor,
    group_size: int,
    normalize: bool = False,
    eps: float = 1e-4,
    batch_mean_std: BatchMeanStd = local_mean_std,
) -> torch.Tensor:
    """RLOO advantages: each reward minus the mean of the other rewards of its group.

    Papers: Kool et al., "Buy 4 REINFORCE Samples, Get a Baseline for Free!" (ICLR 2019 workshop);
    Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
    Human Feedback in LLMs", arXiv:2402.14740.

    ``A_i = r_i - (1 / (G - 1)) sum_{j != i} r_j``; with ``normalize=True`` the advantages of the
    whole batch are then whitened, ``(A - mean(A)) / (std(A) + eps)``. ``NaN`` rewards are left out
    of their siblings' baselines and get ``A = 0``; with G = 1 every advantage is 0.

    Args:
        rewards: (N,) with N = P * group_size.
        group_size: completions per prompt (G).
        batch_mean_std: the batch statistics for ``normalize`` (pass a global one on several processes).

    Returns:
        (N,) advantages.
    """
    grouped = _grouped(rewards, group_size)
    if group_size == 1:
        return torch.zeros_like(rewards)
    scored = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    group_sum = torch.nansum(grouped, dim=1, keepdim=True)
    # a group with a single scored completion has no baseline: 0 / 0 = NaN, zeroed below
    baseline = (group_sum - grouped) / (scored - 1).to(grouped.dtype)
    advantages = (grouped - baseline).reshape(-1)
    if normalize:
        mean, std = batch_mean_std(advantages)
        advantages = (advantages - mean.to(advantages.dtype)) / (std.to(advantages.dtype) + eps)
    return torch.nan_to_num(advantages, nan=0.0, posinf=0.0, neginf=0.0)


def decoupled_group_advantages(
    rewards_per_function: torch.Tensor,
    reward_weights: torch.Tensor,
    group_size: int,
    eps: float = 1e-4,
    batch_mean_std: BatchMeanStd = local_mean_std,
) -> tuple[torch.Tensor, GroupStats]:
    """Normalise each reward function within its group before summing, then whiten over the batch.

    Paper: "GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward RL
    Optimization", arXiv:2601.05242.

    ``z_ik = (r_ik - mean_g(r_k)) / (std_g(r_k) + eps)``, ``s_i = sum_k w_k z_ik``,
    ``A_i = (s_i - mean(s)) / (std(s) + eps)``, NaN-aware as above.

    Args:
        rewards_per_function: (N, K) rewards of K reward functions.
        reward_weights: (K,).
        group_size: G.
        batch_mean_std: the statistics of ``s`` over the batch (pass a global one on several processes).

    Returns:
        ``(advantages (N,), GroupStats of the summed, normalised rewards s)``.
    """
    if rewards_per_function.dim() != 2:
        raise DataError("rewards_per_function must be a matrix", expected="shape (N, K)",
                        found=f"shape {tuple(rewards_per_function.shape)}")  # fmt: skip
    _grouped(rewards_per_function[:, 0], group_size)  # validates the layout
    num_functions = rewards_per_function.shape[1]
    grouped = rewards_per_function.reshape(-1, group_size, num_functions)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    std = _nan_std(grouped, dim=1).unsqueeze(1) if group_size > 1 else torch.zeros_like(mean)
    normalised = ((grouped - mean) / (std + eps)).reshape(-1, num_functions)
    unscorable = torch.isnan(rewards_per_function).all(dim=1)
    summed = (normalised * reward_weights.to(normalised.dtype)).nansum(dim=1)
    summed = torch.where(unscorable, torch.full_like(summed, float("nan")), summed)
    batch_mean, batch_std = batch_mean_std(summed)
    whitened = (summed - batch_mean.to(summed.dtype)) / (batch_std.to(summed.dtype) + eps)
    advantages = torch.nan_to_num(whitened, nan=0.0)
    return advantages, _group_stats(summed, group_size)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded completions.

    Paper: Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation", arXiv:1506.02438.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lam A_{t+1}``, where the
    value and the advantage after the last valid token are 0 (the episode ends there: no bootstrap).
    ``returns = A + V`` are the value-function targets. Entries outside ``mask`` are 0 in both
    outputs, whatever ``rewards``/``values`` hold there.

    Args:
        rewards: (B, T) per-token rewards (see :func:`token_level_kl_rewards`).
        values: (B, T) value estimates V_t of the state before token t.
        mask: (B, T) 1 for completion tokens.
        gamma: discount; lam: GAE lambda.

    Returns:
        ``(advantages (B, T), returns (B, T))``, without gradient.
    """
    with torch.no_grad():
        valid = mask.to(torch.bool)
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        rewards = torch.where(valid, rewards.to(values.dtype), zero)
        values = torch.where(valid, values, zero)
        weights = valid.to(values.dtype)
        advantages = torch.zeros_like(values)
        next_value = torch.zeros_like(values[:, 0])
        next_advantage = torch.zeros_like(values[:, 0])
        for t in reversed(range(values.shape[1])):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            advantage = (delta + gamma * lam * next_advantage) * weights[:, t]
            advantages[:, t] = advantage
            next_value, next_advantage = values[:, t], advantage
        returns = torch.where(valid, advantages + values, zero)
    return advantages, returns


def _last_valid_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask.to(torch.bool), positions, -1).max(dim=-1).values
    return last.clamp_min(0), last >= 0


def token_level_kl_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> torch.Tensor:
    """Per-token PPO-RLHF rewards: a KL penalty on every token, the sequence score on the last.

    Papers: Ziegler et al., "Fine-Tuning Language Models from Human Preferences",
    arXiv:1909.08593; Ouyang et al. (InstructGPT), arXiv:2203.02155, eq. 2.

    ``reward_t = -kl_coef * KL_t + [t = last valid token] * score``, with ``KL_t`` the per-token
    estimate of :mod:`posttrain.losses.kl` (k1 = ``logps - ref_logps`` by default). 0 outside the
    mask; a row with no valid token gets no score.

    Args:
        scores: (B,) sequence scores (reward model / reward functions).
        logps, ref_logps: (B, T) log-probs of the sampled tokens under the rollout policy and the reference.
        mask: (B, T).

    Returns:
        (B, T) rewards, without gradient.
    """
    with torch.no_grad():
        valid = mask.to(torch.bool)
        per_token_kl = kl_divergence(logps, ref_logps, kl_estimator)
        rewards = torch.where(valid, -kl_coef * per_token_kl, torch.zeros_like(per_token_kl))
        last, has_token = _last_valid_index(mask)
        bonus = torch.where(has_token, scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype))
        rewards = rewards.scatter_add(1, last.unsqueeze(1), bonus.unsqueeze(1))
    return rewards


def kl_penalized_scores(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> torch.Tensor:
    """Sequence scores minus the completion's summed KL (RLOO's reward shaping, arXiv:2402.14740).

    ``score_i - kl_coef * sum_t mask_it KL_it``; scores (B,), the rest (B, T); returns (B,), no gradient.
    """
    with torch.no_grad():
        per_token_kl = kl_divergence(logps, ref_logps, kl_estimator)
        return scores - kl_coef * masked_sum(per_token_kl, mask, dim=-1).to(scores.dtype)


# Every entry: ``estimator(rewards (N,), group_size, **options) -> (advantages (N,), GroupStats)``.
AdvantageEstimator = Callable[..., tuple[torch.Tensor, GroupStats]]
ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator", field="advantage_estimator")


@ADVANTAGE_ESTIMATORS.register("grpo")
def _grpo_estimator(rewards: torch.Tensor, group_size: int, **options) -> tuple[torch.Tensor, GroupStats]:
    return group_relative_advantages(rewards, group_size, **options)


@ADVANTAGE_ESTIMATORS.register("rloo")
def _rloo_estimator(rewards: torch.Tensor, group_size: int, **options) -> tuple[torch.Tensor, GroupStats]:
    return leave_one_out_advantages(rewards, group_size, **options), _group_stats(rewards, group_size)
