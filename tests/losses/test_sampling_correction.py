"""Importance-sampling correction for the sampler/trainer gap: every mode against a scalar float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.losses.sampling_correction import (
    SAMPLING_CORRECTION_MODES,
    check_sampling_bounds,
    gap_metrics,
    sampling_correction_weights,
    sampling_gap_statistics,
)

OLD = [[-1.0, -2.0, -0.5, 0.0], [-0.3, -4.0, -1.2, -2.2], [-3.0, -0.1, -0.7, -0.9]]
SAMPLER = [[-1.5, -1.0, -0.5, 9.0], [-0.3, -2.0, -1.0, -2.0], [-1.0, -0.2, float("nan"), -0.9]]
MASK = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]]


def _reference(mode: str, clip_min, clip_max) -> list[list[float]]:
    """Per-token weights from plain Python floats (math.exp in double precision)."""
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max

    def bound(rho):
        if mode.endswith("truncate"):
            return min(max(rho, low), high)
        return rho if low <= rho <= high else 0.0

    weights = []
    for old_row, sampler_row, mask_row in zip(OLD, SAMPLER, MASK):
        gaps = [0.0 if (not m or math.isnan(s)) else o - s for o, s, m in zip(old_row, sampler_row, mask_row)]
        if mode.startswith("sequence"):
            shared = bound(math.exp(sum(gaps)))
            weights.append([shared if m else 0.0 for m in mask_row])
        else:
            weights.append([bound(math.exp(g)) if m else 0.0 for g, m in zip(gaps, mask_row)])
    return weights


@pytest.mark.parametrize("mode", SAMPLING_CORRECTION_MODES.names())
@pytest.mark.parametrize("clip_min, clip_max", [(None, 3.0), (0.5, 2.0), (0.2, None)])
def test_weights_match_the_scalar_reference(mode, clip_min, clip_max):
    if mode.endswith("truncate") and clip_min is None and clip_max is None:
        pytest.skip("rejected by the config")
    result = sampling_correction_weights(torch.tensor(OLD), torch.tensor(SAMPLER), torch.tensor(MASK), mode,
                                         clip_min=clip_min, clip_max=clip_max)
    expected = torch.tensor(_reference(mode, clip_min, clip_max), dtype=torch.float64)
    torch.testing.assert_close(result.weights.double(), expected, rtol=1e-6, atol=1e-7)
    assert result.is_sequence_level == mode.startswith("sequence")
    assert result.ratios.shape == ((3, 1) if result.is_sequence_level else (3, 4))


def test_hand_values_of_each_mode():
    old, sampler, mask = torch.tensor([[0.0, 0.0]]), torch.tensor([[-2.0, 1.0]]), torch.ones(1, 2)
    # token gaps 2 and -1: rho = e^2 = 7.39 and e^-1 = 0.368; the sequence's rho = e^1 = 2.72
    token_truncate = sampling_correction_weights(old, sampler, mask, "token_truncate", clip_min=0.5, clip_max=3.0)
    assert token_truncate.weights.tolist() == [[3.0, 0.5]]
    token_mask = sampling_correction_weights(old, sampler, mask, "token_mask", clip_min=0.5, clip_max=3.0)
    assert token_mask.weights.tolist() == [[0.0, 0.0]]
    sequence_truncate = sampling_correction_weights(old, sampler, mask, "sequence_truncate", clip_max=2.0)
    assert sequence_truncate.weights.tolist() == [[2.0, 2.0]]
    sequence_mask = sampling_correction_weights(old, sampler, mask, "sequence_mask", clip_max=3.0)
    assert sequence_mask.weights[0, 0].item() == pytest.approx(math.e) and sequence_mask.weights[0, 1] == sequence_mask.weights[0, 0]


def test_no_gradient_flows_through_the_weights_and_identical_log_probs_give_one():
    old = torch.randn(2, 5, requires_grad=True)
    result = sampling_correction_weights(old, old.detach().clone(), torch.ones(2, 5), "token_truncate", clip_max=3.0)
    assert not result.weights.requires_grad
    assert torch.equal(result.weights, torch.ones(2, 5))


def test_a_huge_sequence_gap_stays_finite():
    old, sampler = torch.zeros(1, 200), torch.full((1, 200), -5.0)  # summed gap 1000: exp overflows float32
    result = sampling_correction_weights(old, sampler, torch.ones(1, 200), "sequence_mask", clip_min=0.5, clip_max=None)
    assert torch.isfinite(result.weights).all()


def test_statistics_combine_over_processes_like_one_batch():
    old, sampler, mask = torch.tensor(OLD), torch.tensor(SAMPLER), torch.tensor(MASK)
    correction = sampling_correction_weights(old, sampler, mask, "token_truncate", clip_max=3.0)
    whole = gap_metrics(sampling_gap_statistics(old, sampler, mask, correction))
    parts = []
    for rows in (slice(0, 1), slice(1, 3)):
        part = sampling_correction_weights(old[rows], sampler[rows], mask[rows], "token_truncate", clip_max=3.0)
        parts.append(sampling_gap_statistics(old[rows], sampler[rows], mask[rows], part))
    assert gap_metrics(torch.stack(parts)) == pytest.approx(whole)
    gaps = [abs(o - s) for orow, srow, mrow in zip(OLD, SAMPLER, MASK) for o, s, m in zip(orow, srow, mrow)
            if m and not math.isnan(s)]
    assert whole["sampling/sampling_logp_difference/mean"] == pytest.approx(sum(gaps) / len(gaps))
    assert whole["sampling/sampling_logp_difference/max"] == pytest.approx(max(gaps))
    valid_weights = [w for wrow, mrow in zip(_reference("token_truncate", None, 3.0), MASK) for w, m in zip(wrow, mrow) if m]
    assert whole["sampling/importance_sampling_ratio/mean"] == pytest.approx(sum(valid_weights) / len(valid_weights))
    assert whole["sampling/importance_sampling_ratio/min"] == pytest.approx(min(valid_weights))
    assert whole["sampling/importance_sampling_ratio/max"] == pytest.approx(max(valid_weights))


def test_bounds_are_checked_as_trl_does():
    check_sampling_bounds("sequence_mask", None, 3.0)
    with pytest.raises(ConfigError, match="clip_min"):
        check_sampling_bounds("token_mask", 3.0, 2.0)
    with pytest.raises(ConfigError, match="both bounds"):
        check_sampling_bounds("token_truncate", None, None)
    with pytest.raises(ConfigError, match="vllm_importance_sampling_mode"):
        check_sampling_bounds("token_clip", None, 3.0)


# ----------------------------------------------------------------------------- in the policy losses


def test_policy_losses_weigh_the_policy_term_and_not_the_kl_term():
    from posttrain.losses.policy import clipped_policy_loss

    torch.manual_seed(0)
    logps, old, ref = -torch.rand(3, 5), -torch.rand(3, 5), -torch.rand(3, 5)
    advantages, mask = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1] * 5])
    weights = torch.rand(3, 5) * 2 * mask
    common = dict(epsilon_low=0.2, epsilon_high=0.2)
    policy_only, _ = clipped_policy_loss(logps, old, advantages, mask, **common)
    with_kl, _ = clipped_policy_loss(logps, old, advantages, mask, ref_logps=ref, kl_coef=0.1, **common)
    weighted, _ = clipped_policy_loss(logps, old, advantages, mask, ref_logps=ref, kl_coef=0.1,
                                      sampling_weights=weights, **common)
    torch.testing.assert_close(weighted, policy_only * weights + (with_kl - policy_only))


def test_vespo_folds_the_sampler_weights_into_its_sequence_ratio():
    from posttrain.losses.policy import vespo_gamma_weights

    torch.manual_seed(1)
    logps, old = -torch.rand(2, 4), -torch.rand(2, 4)
    mask, advantages = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), torch.tensor([0.5, -1.0])
    weights = (0.5 + torch.rand(2, 4)) * mask
    folded = vespo_gamma_weights(logps, old, advantages, mask, sampling_weights=weights)
    # pi / pi_old * pi_old / pi_sampler = pi / pi_sampler: the same as an old policy shifted by log w
    shifted = vespo_gamma_weights(logps, old - torch.log(weights.clamp(min=1e-8)) * mask, advantages, mask)
    torch.testing.assert_close(folded, shifted)
    assert not torch.allclose(folded, vespo_gamma_weights(logps, old, advantages, mask))


def test_truncated_sampling_is_flagged_once(caplog):
    from types import SimpleNamespace

    from posttrain.rollout.sequences import RolloutSequences
    from posttrain.trainers.sampler_gap import SamplerGapMonitor

    args = SimpleNamespace(top_p=0.9, top_k=0, min_p=0.0, repetition_penalty=1.0, bf16=False, fp16=False)
    monitor = SamplerGapMonitor("server")
    for _ in range(2):
        rows = RolloutSequences(prompt_ids=torch.ones(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.long),
                                completion_ids=torch.ones(2, 3, dtype=torch.long), completion_mask=torch.ones(2, 3, dtype=torch.long),
                                loss_mask=torch.ones(2, 3, dtype=torch.long), is_truncated=torch.zeros(2, dtype=torch.bool),
                                old_logps=-torch.ones(2, 3), sampler_logps=-0.9 * torch.ones(2, 3))
        with caplog.at_level("WARNING", logger="posttrain"):
            metrics = monitor.inspect(rows, args, lambda t: t, corrects=True, mode_name="token_truncate", clip_min=None,
                                      clip_max=3.0)
        assert metrics["sampling/sampling_logp_difference/mean"] == pytest.approx(0.1)
        assert rows.sampling_weights is not None
    assert sum("top_k / top_p" in record.message for record in caplog.records) == 1
