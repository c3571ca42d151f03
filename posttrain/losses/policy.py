"""Policy-gradient objectives for online RL (PPO, GRPO and its variants, RLOO) and the value loss.

A policy loss is computed in two steps:

1. a per-token loss (B, T) from the new and old log-probs and the advantages:
   :func:`clipped_policy_loss` (PPO / GRPO / DAPO / GSPO), :func:`cispo_policy_loss`,
   :func:`sapo_policy_loss`, :func:`vespo_policy_loss`; each can add a per-token KL penalty towards a
   reference policy;
2. a reduction to a scalar, chosen by name: :func:`aggregate_token_loss` over
   :data:`POLICY_LOSS_AGGREGATIONS` ("grpo", "bnpo", "dr_grpo", "dapo", "luspo").

RLOO works on whole sequences instead (:func:`sequence_clipped_policy_loss`); PPO adds
:func:`clipped_value_loss` for its critic.

Shapes: ``logps``, ``old_logps``, ``ref_logps``, ``mask`` are (B, T) over completion tokens;
``advantages`` is (B,) (one per sequence, GRPO) or (B, T) (per token, PPO). Entries outside the mask
never reach a loss or a gradient, whatever they hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from posttrain.errors import ConfigError
from posttrain.losses.kl import kl_divergence
from posttrain.losses.registry import Registry
from posttrain.ops.masked import masked_count, masked_mean, masked_sum

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def importance_log_weights(
    logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, level: str = "token"
) -> torch.Tensor:
    """Log importance weights ``log(pi / pi_old)``: per token (B, T), or per sequence (B, 1).

    ``"sequence"`` is GSPO's (Zheng et al., "Group Sequence Policy Optimization", arXiv:2507.18071):
    the mean log-ratio over the sequence's valid tokens, i.e. the log of the length-normalised
    sequence ratio, shared by all of its tokens.
    """
    valid = mask.to(torch.bool)
    log_ratio = torch.where(valid, logps - old_logps, torch.zeros((), dtype=logps.dtype, device=logps.device))
    if level == "token":
        return log_ratio
    if level == "sequence":
        return masked_mean(log_ratio, valid, dim=-1).unsqueeze(-1)
    raise ConfigError(f"unknown importance_sampling_level {level!r}", field="importance_sampling_level",
                      fix="use 'token' or 'sequence'")  # fmt: skip


def _as_columns(advantages: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B,) -> (B, 1); per-token (B, T) advantages get 0 on padding, so NaN there cannot reach a gradient."""
    if advantages.dim() == 1:
        return advantages.to(dtype).unsqueeze(-1)
    zero = torch.zeros((), dtype=dtype, device=advantages.device)
    return torch.where(mask.to(torch.bool), advantages.to(dtype), zero)


def _rate(indicator: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of a 0/1 indicator over valid tokens, or over sequences when it has one column."""
    indicator = indicator.float()
    if indicator.shape[-1] == 1:
        return indicator.mean().item()
    return masked_mean(indicator, mask).item()


def _sequence_rates(indicator: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean of an indicator over the sequences that have valid tokens."""
    indicator = indicator.float()
    if indicator.shape[-1] == 1:
        return indicator.squeeze(-1)
    has_tokens = mask.to(torch.bool).any(dim=-1)
    return masked_mean(indicator, mask, dim=-1)[has_tokens]


def _finish(
    per_token_loss: torch.Tensor,
    logps: torch.Tensor,
    mask: torch.Tensor,
    ratio: torch.Tensor,
    metrics: dict[str, float],
    ref_logps: torch.Tensor | None,
    kl_coef: float,
    kl_estimator: str,
    use_bias_correction_kl: bool,
    policy_weights: torch.Tensor | None = None,
    sampling_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weigh the policy term by ``policy_weights`` ((B, T) or (B, 1), e.g. 0/1 masks) and by the sampler
    correction ``sampling_weights`` (:mod:`posttrain.losses.sampling_correction`; (B, T), no gradient), add
    the KL penalty (weighed by neither, as in TRL), broadcast to (B, T) and zero the padding."""
    valid = mask.to(torch.bool)
    zero = torch.zeros((), dtype=per_token_loss.dtype, device=per_token_loss.device)
    if policy_weights is not None:
        per_token_loss = per_token_loss * policy_weights.to(per_token_loss.dtype)
    if sampling_weights is not None:
        per_token_loss = per_token_loss * sampling_weights.to(per_token_loss.dtype)
    if kl_coef:
        if ref_logps is None:
            raise ConfigError("a KL penalty needs the reference log-probs", field="beta",
                              fix="pass ref_logps, or set the KL coefficient (beta) to 0")  # fmt: skip
        per_token_kl = kl_divergence(torch.where(valid, logps, zero), torch.where(valid, ref_logps, zero), kl_estimator)
        if use_bias_correction_kl:
            # DeepSeek-V3.2 (arXiv:2512.02556): weighting by the (differentiable) ratio makes the KL
            # gradient the unbiased reverse-KL gradient when sampling from pi_old
            per_token_kl = per_token_kl * ratio
        metrics["kl"] = masked_mean(per_token_kl.detach().expand(valid.shape), valid).item()
        per_token_loss = per_token_loss + kl_coef * per_token_kl
    per_token_loss = per_token_loss.expand(valid.shape)
    return torch.where(valid, per_token_loss, zero)


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    use_bias_correction_kl: bool = True,
    policy_weights: torch.Tensor | None = None,
    sampling_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate objective of PPO, with GRPO/DAPO/GSPO options, per token.

    Papers: Schulman et al., "Proximal Policy Optimization Algorithms", arXiv:1707.06347 (eq. 7);
    Yu et al., "DAPO", arXiv:2503.14476 (asymmetric "clip-higher" bounds); Zheng et al., "GSPO",
    arXiv:2507.18071 (sequence-level ratio); two-sided clipping ``delta`` from "INTELLECT-2",
    arXiv:2505.07291; the KL term from Shao et al., "DeepSeekMath", arXiv:2402.03300 (eq. 3).

    With ``rho = pi / pi_old`` (per token, or GSPO's per-sequence ratio) and advantage A:

    ``loss_t = -min(min(rho, delta) A, clip(rho, 1 - eps_low, 1 + eps_high) A) + kl_coef * KL_t``

    where ``min(rho, delta)`` applies only when ``delta`` is set, and ``KL_t`` is the
    ``kl_estimator`` estimate against ``ref_logps`` (multiplied by ``rho`` when
    ``use_bias_correction_kl``). ``epsilon_high`` defaults to ``epsilon_low``.

    Args:
        logps: (B, T) log-probs under the current policy (with gradient).
        old_logps: (B, T) log-probs under the policy that sampled the tokens.
        advantages: (B,) or (B, T).
        mask: (B, T) completion tokens.
        policy_weights: optional (B, T) or (B, 1) multiplier of the policy term, not of the KL term (the
            high-entropy token mask, the off-policy sequence mask; the other per-token losses take it too).

    Returns:
        ``(per_token_loss (B, T), metrics)``; the loss is 0 outside the mask. Metrics (floats):
        ``clip_ratio/low_mean`` (rho < 1 - eps_low with A < 0), ``clip_ratio/high_mean``
        (rho > 1 + eps_high with A > 0), ``clip_ratio/region_mean`` (either), as fractions of valid
        tokens (of sequences at sequence level); ``clip_ratio/low_min`` and ``clip_ratio/high_max``
        over per-sequence fractions; ``kl`` (mean per-token KL, ratio-weighted when
        ``use_bias_correction_kl``, which makes it an estimate for the current policy) when ``kl_coef`` is non-zero.
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    log_weights = importance_log_weights(logps, old_logps, mask, importance_sampling_level)
    ratio = torch.exp(log_weights)
    advantages = _as_columns(advantages, mask, ratio.dtype)
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    capped_ratio = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token_loss = -torch.min(capped_ratio * advantages, clipped_ratio * advantages)

    with torch.no_grad():
        low = (ratio < 1.0 - epsilon_low) & (advantages < 0)
        high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
        low_per_sequence, high_per_sequence = _sequence_rates(low, mask), _sequence_rates(high, mask)
        metrics = {
            "clip_ratio/low_mean": _rate(low, mask),
            "clip_ratio/high_mean": _rate(high, mask),
            "clip_ratio/region_mean": _rate(low | high, mask),
            "clip_ratio/low_min": low_per_sequence.min().item() if low_per_sequence.numel() else 0.0,
            "clip_ratio/high_max": high_per_sequence.max().item() if high_per_sequence.numel() else 0.0,
        }
    per_token_loss = _finish(per_token_loss, logps, mask, ratio, metrics, ref_logps, kl_coef, kl_estimator,
                             use_bias_correction_kl, policy_weights, sampling_weights)  # fmt: skip
    return per_token_loss, metrics


def off_policy_sequence_mask(
    advantages: torch.Tensor,
    logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """Off-policy sequence masking (DeepSeek-AI, "DeepSeek-V3.2", arXiv:2512.02556, eq. 9).

    A sequence with a negative advantage whose mean per-token KL from the sampling policy,
    ``KL_i = sum_t m_it (log pi_sampling - log pi_theta) / sum_t m_it``, exceeds ``threshold`` (the
    paper's delta) is dropped from the policy loss: it was sampled by a policy too far from the current
    one to learn from its mistakes. Sequences with ``A >= 0`` are always kept. Log-probs that are NaN
    (tokens the sampler could not score) count as zero KL.

    Shapes: ``advantages`` (B,) (or (B, T): the sign test is then per token); ``logps``,
    ``sampling_logps``, ``mask`` (B, T). Returns (B, 1) (or (B, T)) float, 1 = keep, without gradient.
    """
    with torch.no_grad():
        weights = mask.to(logps.dtype)
        log_gap = torch.nan_to_num(sampling_logps.to(logps.dtype) - logps.detach(), nan=0.0)
        mean_kl = (log_gap * weights).sum(-1, keepdim=True) / weights.sum(-1, keepdim=True).clamp(min=1.0)
        columns = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
        return ((columns >= 0) | (mean_kl <= threshold)).to(logps.dtype)


#: CISPO's cap on the importance weight when the user sets none (MiniMax-M1's epsilon_max; ScaleRL uses 5.0).
#: It caps the ratio itself, not 1 + epsilon, so PPO's 0.2 would scale every token's gradient down to 0.2 or less.
CISPO_DEFAULT_EPSILON_HIGH = 5.0


def cispo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_high: float = CISPO_DEFAULT_EPSILON_HIGH,
    importance_sampling_level: str = "token",
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    use_bias_correction_kl: bool = True,
    policy_weights: torch.Tensor | None = None,
    sampling_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CISPO: clip the importance weight itself, keep every token's gradient.

    Paper: MiniMax, "MiniMax-M1", arXiv:2506.13585 (eq. 4); ``epsilon_high`` is the cap on the
    ratio (ScaleRL, arXiv:2510.13786, recommends 5.0).

    ``loss_t = -sg(min(rho, epsilon_high)) * A * log pi_t (+ kl_coef * KL_t)``, where ``sg`` stops the
    gradient. Shapes as :func:`clipped_policy_loss`. Metric ``cispo_clip_ratio``: fraction of valid
    tokens with ``rho > epsilon_high`` and A > 0 (plus ``kl``). Aggregate with "dapo".
    """
    ratio = torch.exp(importance_log_weights(logps, old_logps, mask, importance_sampling_level))
    advantages = _as_columns(advantages, mask, ratio.dtype)
    weight = torch.clamp(ratio, max=epsilon_high).detach()
    valid = mask.to(torch.bool)
    safe_logps = torch.where(valid, logps, torch.zeros((), dtype=logps.dtype, device=logps.device))
    per_token_loss = -weight * advantages * safe_logps
    with torch.no_grad():
        metrics = {"cispo_clip_ratio": _rate((ratio > epsilon_high) & (advantages > 0), mask)}
    per_token_loss = _finish(per_token_loss, logps, mask, ratio, metrics, ref_logps, kl_coef, kl_estimator,
                             use_bias_correction_kl, policy_weights, sampling_weights)  # fmt: skip
    return per_token_loss, metrics


def sapo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature_pos: float = 1.0,
    temperature_neg: float = 1.05,
    importance_sampling_level: str = "token",
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    use_bias_correction_kl: bool = True,
    policy_weights: torch.Tensor | None = None,
    sampling_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SAPO: a smooth, temperature-controlled gate in place of the hard clip.

    Paper: "Soft Adaptive Policy Optimization", arXiv:2511.20347.

    ``loss_t = -(4 / tau) sigma(tau (rho - 1)) * A (+ kl_coef * KL_t)`` with ``tau = temperature_pos``
    where A > 0 and ``temperature_neg`` otherwise; its gradient at rho = 1 equals the unclipped
    policy gradient. Shapes as :func:`clipped_policy_loss`. Aggregate with "grpo".
    """
    ratio = torch.exp(importance_log_weights(logps, old_logps, mask, importance_sampling_level))
    advantages = _as_columns(advantages, mask, ratio.dtype)
    temperature = torch.where(
        advantages > 0,
        torch.tensor(temperature_pos, dtype=ratio.dtype, device=ratio.device),
        torch.tensor(temperature_neg, dtype=ratio.dtype, device=ratio.device),
    )
    per_token_loss = -torch.sigmoid(temperature * (ratio - 1.0)) * (4.0 / temperature) * advantages
    metrics: dict[str, float] = {}
    per_token_loss = _finish(per_token_loss, logps, mask, ratio, metrics, ref_logps, kl_coef, kl_estimator,
                             use_bias_correction_kl, policy_weights, sampling_weights)  # fmt: skip
    return per_token_loss, metrics


#: VESPO's clamp on log-ratios: each token's to [-20, 20], the sequence's to [log 1e-8, 20]; keeps exp finite.
VESPO_TOKEN_LOG_RATIO_BOUND = 20.0
VESPO_SEQUENCE_LOG_RATIO_BOUNDS = (math.log(1e-8), 20.0)


def vespo_gamma_weights(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
    sampling_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """VESPO's reshaping kernel ``phi(w) = w^k exp(lambda (1 - w))`` of the sequence importance weight, without gradient.

    ``w = exp(sum_t log(pi_t / pi_old_t))`` over the sequence's valid tokens: the whole-sequence ratio,
    not length-normalised (each token's log-ratio clamped to [-20, 20], the sum to [log 1e-8, 20]).
    ``phi(1) = 1``; it peaks at ``w = k / lambda`` and decays on both sides, so sequences the policy has
    moved far from (w near 0 or large) get a small weight instead of a hard clip. ``(k, lambda)`` is
    ``(k_pos, lambda_pos)`` where A >= 0 and ``(k_neg, lambda_neg)`` where A < 0 (lambda floored at 1e-4).

    ``sampling_weights`` (B, T), per-token sampler corrections ``pi_old / pi_sampler``, join the sequence
    ratio in log space (each clamped to [log 1e-8, 20]), so ``w`` measures ``pi / pi_sampler``.

    Returns (B, 1) for (B,) advantages, (B, T) for per-token ones.
    """
    with torch.no_grad():
        valid = mask.to(torch.bool)
        zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
        bound = VESPO_TOKEN_LOG_RATIO_BOUND
        log_ratio = torch.where(valid, (logps - old_logps).clamp(-bound, bound), zero)
        log_w = log_ratio.sum(dim=-1, keepdim=True)
        if sampling_weights is not None:
            log_correction = torch.log(sampling_weights.to(logps.dtype)).clamp(*VESPO_SEQUENCE_LOG_RATIO_BOUNDS)
            log_w = log_w + torch.where(valid, log_correction, zero).sum(dim=-1, keepdim=True)
        log_w = log_w.clamp(*VESPO_SEQUENCE_LOG_RATIO_BOUNDS)
        advantages = _as_columns(advantages, mask, logps.dtype)
        non_negative = advantages >= 0
        k = torch.where(non_negative, float(k_pos), float(k_neg)).to(logps.dtype)
        lam = torch.where(non_negative, float(lambda_pos), float(lambda_neg)).to(logps.dtype).clamp(min=1e-4)
        # in log space: log phi = lambda + k log w - lambda w
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def vespo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
    importance_sampling_level: str = "token",
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    use_bias_correction_kl: bool = True,
    policy_weights: torch.Tensor | None = None,
    sampling_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """VESPO: a smooth, asymmetric Gamma-shaped weight on the sequence importance ratio in place of clipping.

    Paper: "VESPO: Variational Sequence-Level Soft Policy Optimization for Stable Off-Policy LLM
    Training", arXiv:2602.10693. The defaults are TRL's (``vespo_k_pos=2, vespo_lambda_pos=3,
    vespo_k_neg=3, vespo_lambda_neg=2``).

    ``loss_t = -sg(phi(w)) * A * log pi_t (+ kl_coef * KL_t)``, with ``phi`` and the sequence ratio
    ``w`` of :func:`vespo_gamma_weights`; its gradient is ``phi(w) A grad log pi_t``, the policy
    gradient reweighted per sequence. ``importance_sampling_level`` only sets the ratio that the KL
    term's bias correction uses (as in :func:`clipped_policy_loss`); the kernel always reads the whole
    sequence's ratio. Shapes as :func:`clipped_policy_loss`; aggregate with "dapo".
    Metric ``vespo/phi_seq_mean``: the mean weight over valid tokens (plus ``kl``).
    """
    phi = vespo_gamma_weights(logps, old_logps, advantages, mask, k_pos=k_pos, lambda_pos=lambda_pos, k_neg=k_neg,
                              lambda_neg=lambda_neg, sampling_weights=sampling_weights)
    advantages = _as_columns(advantages, mask, logps.dtype)
    valid = mask.to(torch.bool)
    safe_logps = torch.where(valid, logps, torch.zeros((), dtype=logps.dtype, device=logps.device))
    per_token_loss = -phi * advantages * safe_logps
    with torch.no_grad():
        metrics = {"vespo/phi_seq_mean": masked_mean(phi.expand(valid.shape), valid).item()}
    ratio = torch.exp(importance_log_weights(logps, old_logps, mask, importance_sampling_level))
    per_token_loss = _finish(per_token_loss, logps, mask, ratio, metrics, ref_logps, kl_coef, kl_estimator,
                             use_bias_correction_kl, policy_weights)  # fmt: skip
    return per_token_loss, metrics


def sequence_clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipping on whole sequences, RLOO's objective (Ahmadian et al., arXiv:2402.14740).

    ``rho = exp(logp - logp_old)`` on summed sequence log-probs;
    ``loss_i = -min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i)``.

    Args:
        logps, old_logps: (B,) summed completion log-probs.
        advantages: (B,).

    Returns:
        ``(per_sequence_loss (B,), metrics)`` with the clip-ratio metrics of
        :func:`clipped_policy_loss` over sequences.
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old_logps)
    advantages = advantages.to(ratio.dtype)
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_sequence_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    with torch.no_grad():
        low = ((ratio < 1.0 - epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1.0 + epsilon_high) & (advantages > 0)).float()
        empty = ratio.numel() == 0
        metrics = {
            "clip_ratio/low_mean": 0.0 if empty else low.mean().item(),
            "clip_ratio/high_mean": 0.0 if empty else high.mean().item(),
            "clip_ratio/region_mean": 0.0 if empty else torch.maximum(low, high).mean().item(),
            "clip_ratio/low_min": 0.0 if empty else low.min().item(),
            "clip_ratio/high_max": 0.0 if empty else high.max().item(),
        }
    return per_sequence_loss, metrics


Aggregation = Callable[..., torch.Tensor]
POLICY_LOSS_AGGREGATIONS: Registry[Aggregation] = Registry("policy loss type", field="loss_type")


@POLICY_LOSS_AGGREGATIONS.register("grpo", "sapo")
def _aggregate_grpo(per_token_loss, mask, *, max_completion_length=None, num_items_in_batch=None):
    return masked_mean(per_token_loss, mask, dim=-1).mean()


@POLICY_LOSS_AGGREGATIONS.register("bnpo")
def _aggregate_bnpo(per_token_loss, mask, *, max_completion_length=None, num_items_in_batch=None):
    return masked_mean(per_token_loss, mask)


@POLICY_LOSS_AGGREGATIONS.register("dr_grpo")
def _aggregate_dr_grpo(per_token_loss, mask, *, max_completion_length=None, num_items_in_batch=None):
    if not max_completion_length:
        raise ConfigError("the 'dr_grpo' loss divides by max_completion_length, which is not set",
                          field="max_completion_length", fix="set max_completion_length")  # fmt: skip
    return masked_sum(per_token_loss, mask) / (per_token_loss.shape[0] * max_completion_length)


@POLICY_LOSS_AGGREGATIONS.register("dapo", "cispo", "vespo")
def _aggregate_dapo(per_token_loss, mask, *, max_completion_length=None, num_items_in_batch=None):
    count = masked_count(per_token_loss, mask) if num_items_in_batch is None else num_items_in_batch
    count = torch.as_tensor(count, dtype=per_token_loss.dtype, device=per_token_loss.device).clamp_min(1.0)
    return masked_sum(per_token_loss, mask) / count


@POLICY_LOSS_AGGREGATIONS.register("luspo")
def _aggregate_luspo(per_token_loss, mask, *, max_completion_length=None, num_items_in_batch=None):
    return masked_sum(per_token_loss, mask, dim=-1).mean()


def aggregate_token_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "dapo",
    *,
    max_completion_length: int | None = None,
    num_items_in_batch: torch.Tensor | int | float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss (B, T) to a scalar; the choice sets how tokens and sequences are weighed.

    * ``grpo`` (also for ``sapo``): mean over sequences of each sequence's token mean
      (DeepSeekMath, arXiv:2402.03300). Tokens of short completions weigh more.
    * ``bnpo``: token sum / valid tokens in this batch. PPO's masked mean.
    * ``dr_grpo``: token sum / (B * max_completion_length) (Dr. GRPO, arXiv:2503.20783): a constant
      normaliser, no length bias.
    * ``dapo`` (also for ``cispo`` and ``vespo``): token sum / ``num_items_in_batch`` (DAPO, arXiv:2503.14476):
      pass the number of valid tokens in the whole accumulated batch (across micro-batches and
      devices, divided as the caller's reduction needs) so every token weighs the same; without it,
      the local token count.
    * ``luspo``: per-sequence token sum, averaged over sequences (LUSPO, arXiv:2602.05261; meant
      for ``importance_sampling_level="sequence"``).

    Division by the number of gradient-accumulation steps, where wanted, is the trainer's.
    Returns a scalar.
    """
    return POLICY_LOSS_AGGREGATIONS.get(loss_type)(
        per_token_loss, mask, max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch
    )


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped value-function loss.

    Papers: Schulman et al., arXiv:1707.06347; clipping as in the OpenAI baselines PPO2
    implementation, described in Engstrom et al., "Implementation Matters in Deep RL",
    arXiv:2005.12729.

    ``v_clip = clip(v, v_old - c, v_old + c)``;
    ``loss = 0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2))``.

    Args:
        values: (B, T) current value predictions (with gradient).
        old_values: (B, T) predictions at rollout time.
        returns: (B, T) targets (from :func:`posttrain.losses.advantages.gae`).
        mask: (B, T).
        cliprange_value: c.

    Returns:
        ``(loss scalar, metrics)``: ``vf_clipfrac`` (fraction of valid tokens where the clipped term
        is the larger) and ``vpred`` (mean prediction).
    """
    valid = mask.to(torch.bool)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(valid, values, zero)
    old_values = torch.where(valid, old_values.to(values.dtype), zero)
    returns = torch.where(valid, returns.to(values.dtype), zero)
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        metrics = {
            "vf_clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask).item(),
            "vpred": masked_mean(values.detach(), mask).item(),
        }
    return loss, metrics
