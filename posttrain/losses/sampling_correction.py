"""Importance-sampling correction for the gap between the sampler's and the trainer's log-probs.

An inference engine (vLLM, a generation server, a bf16 sampler) does not compute exactly the
probabilities the trainer's forward computes: kernels, precision and batch shapes differ. Its
completions are then drawn from ``pi_sampler``, not from the ``pi_old`` the policy loss assumes, and the
gradient is biased. Truncated importance sampling (TIS; Yao et al., "Your Efficient RL Framework
Secretly Brings You Off-Policy RL Training", 2025) reweighs each token's loss by

    rho_t = pi_old(y_t) / pi_sampler(y_t) = exp(old_logps_t - sampler_logps_t)

(per token), or each sequence's by ``rho = exp(sum_t (old_logps_t - sampler_logps_t))`` (per
sequence), and bounds the weight to ``[clip_min, clip_max]``: ``*_truncate`` clips it there,
``*_mask`` sets it to 0 outside (masked IS, MIS). The modes and bounds are TRL's
(``vllm_importance_sampling_mode``, ``..._clip_min``, ``..._clip_max``).

Shapes: ``old_logps``, ``sampler_logps``, ``mask`` are ``(B, T)`` over completion tokens. Tokens a
sampler could not score carry NaN in ``sampler_logps`` and get weight 1 (no correction).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from posttrain.errors import ConfigError
from posttrain.losses.registry import Registry

#: upper bound on a log-weight before ``exp``: a sequence's summed gap can overflow float32 otherwise
MAX_LOG_WEIGHT = 20.0

Bound = Callable[[torch.Tensor, float | None, float | None], torch.Tensor]
SAMPLING_CORRECTION_MODES: Registry[Bound] = Registry("importance-sampling mode", field="vllm_importance_sampling_mode")


@dataclass
class SamplingCorrection:
    """What :func:`sampling_correction_weights` returns.

    Attributes:
        weights: ``(B, T)`` detached weights to multiply each token's loss by (a sequence mode puts its
            sequence's weight on every token), 0 outside ``mask``.
        ratios: the bounded weights the statistics are taken over: ``(B, T)`` for token modes (read
            them where ``mask`` is set), ``(B, 1)`` for sequence modes (one per sequence).
        is_sequence_level: whether ``ratios`` holds one value per sequence.
    """

    weights: torch.Tensor
    ratios: torch.Tensor
    is_sequence_level: bool


def _truncate(ratio: torch.Tensor, clip_min: float | None, clip_max: float | None) -> torch.Tensor:
    """``clamp(rho, clip_min, clip_max)``; a None bound is open."""
    return torch.clamp(ratio, min=clip_min, max=clip_max)


def _mask(ratio: torch.Tensor, clip_min: float | None, clip_max: float | None) -> torch.Tensor:
    """``rho`` where ``clip_min <= rho <= clip_max``, else 0; a None bound is open."""
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


SAMPLING_CORRECTION_MODES.register("token_truncate")(_truncate)
SAMPLING_CORRECTION_MODES.register("token_mask")(_mask)
SAMPLING_CORRECTION_MODES.register("sequence_truncate")(_truncate)
SAMPLING_CORRECTION_MODES.register("sequence_mask")(_mask)


def sampler_log_gap(old_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` ``old_logps - sampler_logps`` on valid tokens, 0 on padding and where the sampler gave NaN."""
    gap = (old_logps.float() - sampler_logps.float()).nan_to_num(nan=0.0)
    return torch.where(mask.to(torch.bool), gap, torch.zeros((), dtype=gap.dtype, device=gap.device))


def sampling_correction_weights(
    old_logps: torch.Tensor,
    sampler_logps: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "sequence_mask",
    *,
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> SamplingCorrection:
    """Bounded importance weights ``pi_old / pi_sampler`` per token or per sequence (see the module docstring).

    * ``token_truncate``: ``w_t = clamp(exp(d_t), clip_min, clip_max)``;
    * ``token_mask``: ``w_t = exp(d_t)`` inside ``[clip_min, clip_max]``, else 0;
    * ``sequence_truncate`` / ``sequence_mask``: the same on ``exp(sum_t d_t)``, shared by the sequence's tokens;

    with ``d_t = old_logps_t - sampler_logps_t`` on valid tokens (:func:`sampler_log_gap`). No gradient
    flows through the weights. Returns a :class:`SamplingCorrection`.
    """
    bound = SAMPLING_CORRECTION_MODES.get(mode)
    with torch.no_grad():
        gap = sampler_log_gap(old_logps, sampler_logps, mask)
        sequence_level = mode.startswith("sequence")
        log_ratio = gap.sum(dim=-1, keepdim=True) if sequence_level else gap
        ratios = bound(torch.exp(log_ratio.clamp(max=MAX_LOG_WEIGHT)), clip_min, clip_max)
        valid = mask.to(torch.bool)
        weights = torch.where(valid, ratios.expand(valid.shape), torch.zeros((), dtype=ratios.dtype, device=ratios.device))
    return SamplingCorrection(weights=weights, ratios=ratios, is_sequence_level=sequence_level)


def check_sampling_bounds(mode: str, clip_min: float | None, clip_max: float | None) -> None:
    """ConfigError for a mode that is not registered or bounds that cannot work (TRL's rules)."""
    SAMPLING_CORRECTION_MODES.canonical(mode)
    if clip_min is not None and clip_max is not None and clip_min >= clip_max:
        raise ConfigError(
            f"vllm_importance_sampling_clip_min ({clip_min}) must be below vllm_importance_sampling_clip_max ({clip_max})",
            field="vllm_importance_sampling_clip_min", fix="e.g. clip_min=0.5, clip_max=3.0, or leave clip_min unset",
        )
    if mode.endswith("_truncate") and clip_min is None and clip_max is None:
        raise ConfigError(
            f"vllm_importance_sampling_mode={mode!r} clips the weights, and both bounds are None",
            field="vllm_importance_sampling_clip_max", fix="set vllm_importance_sampling_clip_max (e.g. 3.0)",
        )


#: the order of :func:`sampling_gap_statistics`' values, for gathering them as one tensor
GAP_STATISTICS = ("gap_sum", "gap_count", "gap_max", "ratio_sum", "ratio_count", "ratio_min", "ratio_max")


def sampling_gap_statistics(
    old_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, correction: SamplingCorrection | None = None
) -> torch.Tensor:
    """``(7,)`` float32 partial statistics of the sampler/trainer gap, in :data:`GAP_STATISTICS` order, so that
    several processes can be combined by summing sums and counts and taking the max / min of extremes.

    The gap ``|old_logps_t - sampler_logps_t|`` is read over valid tokens whose sampler log-prob is not NaN;
    the ratios over ``correction.ratios`` (valid tokens, or one per sequence with a valid token). Empty sets
    give count 0, max ``-inf`` and min ``+inf``.
    """
    with torch.no_grad():
        valid = mask.to(torch.bool)
        gap = (old_logps.float() - sampler_logps.float()).abs()
        gap = gap[valid & ~torch.isnan(gap)]
        if correction is None:
            ratios = torch.zeros(0, device=gap.device)
        elif correction.is_sequence_level:
            ratios = correction.ratios.squeeze(-1)[valid.any(dim=-1)].float()
        else:
            ratios = correction.ratios[valid].float()

        def extreme(values: torch.Tensor, largest: bool) -> torch.Tensor:
            if values.numel() == 0:
                return torch.tensor(-math.inf if largest else math.inf, device=values.device)
            return values.max() if largest else values.min()

        return torch.stack([
            gap.sum(), torch.tensor(float(gap.numel()), device=gap.device), extreme(gap, True),
            ratios.sum(), torch.tensor(float(ratios.numel()), device=gap.device), extreme(ratios, False),
            extreme(ratios, True),
        ]).float()


def gap_metrics(statistics: torch.Tensor) -> dict[str, float]:
    """TRL's metric names from ``(K, 7)`` (or ``(7,)``) statistics of :func:`sampling_gap_statistics`, one row per
    process: ``sampling/sampling_logp_difference/mean|max`` and, when ratios were given,
    ``sampling/importance_sampling_ratio/min|mean|max``."""
    rows = statistics.reshape(-1, len(GAP_STATISTICS))
    gap_count, ratio_count = float(rows[:, 1].sum()), float(rows[:, 4].sum())
    metrics = {
        "sampling/sampling_logp_difference/mean": float(rows[:, 0].sum()) / gap_count if gap_count else 0.0,
        "sampling/sampling_logp_difference/max": float(rows[:, 2].max()) if gap_count else 0.0,
    }
    if ratio_count:
        metrics["sampling/importance_sampling_ratio/min"] = float(rows[:, 5].min())
        metrics["sampling/importance_sampling_ratio/mean"] = float(rows[:, 3].sum()) / ratio_count
        metrics["sampling/importance_sampling_ratio/max"] = float(rows[:, 6].max())
    return metrics
