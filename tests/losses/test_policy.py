"""Policy and value losses against loops over Python floats."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.losses.policy import (
    POLICY_LOSS_AGGREGATIONS,
    aggregate_token_loss,
    cispo_policy_loss,
    clipped_policy_loss,
    clipped_value_loss,
    sapo_policy_loss,
    sequence_clipped_policy_loss,
    vespo_policy_loss,
)

# log-ratios chosen to land inside, below and above the clip range [0.8, 1.28]
OLD = [[-1.0, -2.0, -0.5, -1.0], [-0.7, -1.1, -3.0, -1.0], [-2.0, -0.2, -1.0, -1.0]]
LOG_RATIO = [[0.05, -0.5, 0.4, 0.0], [0.3, -0.1, 0.02, 0.0], [-0.3, 0.6, 0.1, 0.0]]
MASK = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
ADVANTAGES = [1.0, -0.5, 2.0]
EPS_LOW, EPS_HIGH = 0.2, 0.28


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def new_logps():
    return (t(OLD) + t(LOG_RATIO)).requires_grad_()


def clip(x, low, high):
    return min(max(x, low), high)


def reference_token_loss(advantage_of, ratio_of, kl_of=None, kl_coef=0.0, bias_correction=True):
    out = [[0.0] * 4 for _ in range(3)]
    for b in range(3):
        for step in range(4):
            if not MASK[b][step]:
                continue
            ratio, advantage = ratio_of(b, step), advantage_of(b, step)
            value = -min(ratio * advantage, clip(ratio, 1 - EPS_LOW, 1 + EPS_HIGH) * advantage)
            if kl_coef:
                value += kl_coef * kl_of(b, step) * (ratio if bias_correction else 1.0)
            out[b][step] = value
    return out


def test_token_level_clipped_loss_values_and_clip_metrics():
    loss, metrics = clipped_policy_loss(new_logps(), t(OLD), t(ADVANTAGES), torch.tensor(MASK),
                                        epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)  # fmt: skip
    expected = reference_token_loss(lambda b, s: ADVANTAGES[b], lambda b, s: math.exp(LOG_RATIO[b][s]))
    torch.testing.assert_close(loss, t(expected))
    # valid tokens: 9. low-clipped (ratio < 0.8, A < 0): none (row 1 has A < 0, ratios 1.35, 0.90, 1.02).
    # high-clipped (ratio > 1.28, A > 0): row 0 token 2 (1.49), row 2 token 1 (1.82) -> 2 of 9
    assert metrics["clip_ratio/low_mean"] == 0.0
    assert metrics["clip_ratio/high_mean"] == pytest.approx(2 / 9)
    assert metrics["clip_ratio/region_mean"] == pytest.approx(2 / 9)
    assert metrics["clip_ratio/high_max"] == pytest.approx(1 / 2)  # row 2: 1 of its 2 tokens
    assert metrics["clip_ratio/low_min"] == 0.0


def test_low_clip_is_counted_for_negative_advantages():
    advantages = [-1.0, -1.0, -1.0]
    _, metrics = clipped_policy_loss(new_logps(), t(OLD), t(advantages), torch.tensor(MASK),
                                     epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)  # fmt: skip
    # ratio < 0.8: row 0 token 1 (0.61); row 2 token 0 (0.74)
    assert metrics["clip_ratio/low_mean"] == pytest.approx(2 / 9)
    assert metrics["clip_ratio/high_mean"] == 0.0
    assert metrics["clip_ratio/low_min"] == 0.0  # row 1 has none


def test_gradient_is_minus_ratio_times_advantage_unless_clipped():
    logps = new_logps()
    loss, _ = clipped_policy_loss(logps, t(OLD), t(ADVANTAGES), torch.tensor(MASK),
                                  epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)  # fmt: skip
    loss.sum().backward()
    for b in range(3):
        for step in range(4):
            ratio, advantage = math.exp(LOG_RATIO[b][step]), ADVANTAGES[b]
            clipped_active = (advantage > 0 and ratio > 1 + EPS_HIGH) or (advantage < 0 and ratio < 1 - EPS_LOW)
            expected = 0.0 if (not MASK[b][step] or clipped_active) else -advantage * ratio
            assert logps.grad[b, step].item() == pytest.approx(expected, abs=1e-12)


def test_sequence_level_ratio_is_the_exp_of_the_mean_log_ratio():
    loss, metrics = clipped_policy_loss(new_logps(), t(OLD), t(ADVANTAGES), torch.tensor(MASK), epsilon_low=EPS_LOW,
                                        epsilon_high=EPS_HIGH, importance_sampling_level="sequence")  # fmt: skip
    sequence_ratio = []
    for b in range(3):
        valid = [LOG_RATIO[b][s] for s in range(4) if MASK[b][s]]
        sequence_ratio.append(math.exp(sum(valid) / len(valid)))
    expected = reference_token_loss(lambda b, s: ADVANTAGES[b], lambda b, s: sequence_ratio[b])
    torch.testing.assert_close(loss, t(expected))
    # sequence ratios: 1.0, 1.065, 1.16 -> nothing clipped; fractions count sequences
    assert metrics["clip_ratio/region_mean"] == 0.0


def test_per_token_advantages_and_two_sided_delta():
    advantages = [[1.0, 1.0, 1.0, float("nan")], [-1.0, 2.0, 0.5, 1.0], [-3.0, 1.0, float("inf"), 0.0]]
    logps = new_logps()
    loss, _ = clipped_policy_loss(logps, t(OLD), t(advantages), torch.tensor(MASK), epsilon_low=EPS_LOW,
                                  epsilon_high=EPS_HIGH, delta=1.3)  # fmt: skip
    expected = [[0.0] * 4 for _ in range(3)]
    for b in range(3):
        for s in range(4):
            if MASK[b][s]:
                ratio, a = math.exp(LOG_RATIO[b][s]), advantages[b][s]
                expected[b][s] = -min(min(ratio, 1.3) * a, clip(ratio, 1 - EPS_LOW, 1 + EPS_HIGH) * a)
    torch.testing.assert_close(loss, t(expected))
    loss.sum().backward()
    assert torch.isfinite(logps.grad).all()


def test_kl_penalty_with_and_without_bias_correction():
    ref = t(OLD) - 0.3
    k3 = lambda b, s: math.exp(-0.3 - LOG_RATIO[b][s]) - (-0.3 - LOG_RATIO[b][s]) - 1  # noqa: E731
    for correction in (True, False):
        loss, metrics = clipped_policy_loss(new_logps(), t(OLD), t(ADVANTAGES), torch.tensor(MASK),
                                            epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, ref_logps=ref, kl_coef=0.04,
                                            use_bias_correction_kl=correction)  # fmt: skip
        expected = reference_token_loss(lambda b, s: ADVANTAGES[b], lambda b, s: math.exp(LOG_RATIO[b][s]),
                                        k3, 0.04, correction)  # fmt: skip
        torch.testing.assert_close(loss, t(expected))
        weighted = [k3(b, s) * (math.exp(LOG_RATIO[b][s]) if correction else 1.0)
                    for b in range(3) for s in range(4) if MASK[b][s]]  # fmt: skip
        assert metrics["kl"] == pytest.approx(sum(weighted) / len(weighted))
    with pytest.raises(ConfigError, match="reference"):
        clipped_policy_loss(new_logps(), t(OLD), t(ADVANTAGES), torch.tensor(MASK), kl_coef=0.1)


def test_gradcheck_clipped_loss_with_kl():
    mask = torch.tensor(MASK)

    def fn(logps):
        loss, _ = clipped_policy_loss(logps, t(OLD), t(ADVANTAGES), mask, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                                      importance_sampling_level="sequence", ref_logps=t(OLD) - 0.3, kl_coef=0.1)
        return aggregate_token_loss(loss, mask, "grpo")

    assert torch.autograd.gradcheck(fn, (new_logps(),))


def test_padding_with_infinite_logps_keeps_gradients_finite():
    logps = (t(OLD) + t(LOG_RATIO)).masked_fill(torch.tensor(MASK) == 0, float("-inf")).requires_grad_()
    loss, _ = clipped_policy_loss(logps, t(OLD), t(ADVANTAGES), torch.tensor(MASK), ref_logps=t(OLD), kl_coef=0.1,
                                  importance_sampling_level="sequence")  # fmt: skip
    aggregate_token_loss(loss, torch.tensor(MASK), "dapo").backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logps.grad).all()


# ----- CISPO, SAPO, RLOO ------------------------------------------------------------------------


def test_cispo_value_and_gradient():
    logps = new_logps()
    loss, metrics = cispo_policy_loss(logps, t(OLD), t(ADVANTAGES), torch.tensor(MASK), epsilon_high=1.3)
    loss.sum().backward()
    high = 0
    for b in range(3):
        for s in range(4):
            ratio = math.exp(LOG_RATIO[b][s])
            weight = min(ratio, 1.3)
            logp = OLD[b][s] + LOG_RATIO[b][s]
            expected = -weight * ADVANTAGES[b] * logp if MASK[b][s] else 0.0
            assert loss[b, s].item() == pytest.approx(expected, abs=1e-12)
            assert logps.grad[b, s].item() == pytest.approx(-weight * ADVANTAGES[b] if MASK[b][s] else 0.0)
            high += MASK[b][s] and ratio > 1.3 and ADVANTAGES[b] > 0
    assert metrics["cispo_clip_ratio"] == pytest.approx(high / 9)


def test_sapo_soft_gate():
    loss, _ = sapo_policy_loss(new_logps(), t(OLD), t(ADVANTAGES), torch.tensor(MASK),
                               temperature_pos=1.0, temperature_neg=1.05)  # fmt: skip
    for b in range(3):
        tau = 1.0 if ADVANTAGES[b] > 0 else 1.05
        for s in range(4):
            ratio = math.exp(LOG_RATIO[b][s])
            gate = 4.0 / tau / (1.0 + math.exp(-tau * (ratio - 1.0)))
            expected = -gate * ADVANTAGES[b] if MASK[b][s] else 0.0
            assert loss[b, s].item() == pytest.approx(expected, abs=1e-12)


def test_vespo_weights_each_sequence_by_its_gamma_kernel():
    logps = new_logps()
    loss, metrics = vespo_policy_loss(logps, t(OLD), t(ADVANTAGES), torch.tensor(MASK))
    phis = []
    for b in range(3):
        # the whole-sequence ratio (summed, not averaged, log-ratio) through w^k exp(lambda (1 - w))
        w = math.exp(sum(LOG_RATIO[b][s] for s in range(4) if MASK[b][s]))
        k, lam = (2.0, 3.0) if ADVANTAGES[b] >= 0 else (3.0, 2.0)
        phis.append(w**k * math.exp(lam * (1 - w)))
    expected = [[-phis[b] * ADVANTAGES[b] * (OLD[b][s] + LOG_RATIO[b][s]) * MASK[b][s] for s in range(4)] for b in range(3)]
    torch.testing.assert_close(loss, t(expected))
    # the weight is a constant of the gradient: d loss / d logp = -phi * A
    loss.sum().backward()
    torch.testing.assert_close(logps.grad, t([[-phis[b] * ADVANTAGES[b] * MASK[b][s] for s in range(4)] for b in range(3)]))
    valid_phis = [phis[b] for b in range(3) for s in range(4) if MASK[b][s]]
    assert metrics["vespo/phi_seq_mean"] == pytest.approx(sum(valid_phis) / len(valid_phis))


def test_vespo_on_policy_weight_is_one_and_far_off_policy_sequences_fade():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    old = t([[-1.0, -2.0, float("-inf")], [-1.0, -1.0, -1.0]])
    logps = t([[-1.0, -2.0, 0.0], [29.0, 29.0, 29.0]]).requires_grad_()  # row 1: log-ratio 30 per token, clamped
    loss, _ = vespo_policy_loss(logps, old, t([0.5, -1.0]), mask, k_pos=1.5, lambda_pos=2.5)
    torch.testing.assert_close(loss[0], t([0.5, 1.0, 0.0]))  # phi(1) = 1: the plain policy gradient
    assert loss[1].abs().max().item() == 0.0  # w = e^20: phi = exp(2 + 3*20 - 2 e^20) = 0
    loss.sum().backward()
    assert torch.isfinite(logps.grad).all()


def test_sequence_clipped_policy_loss():
    logps = t([-10.0, -5.0, -7.0, -3.0]).requires_grad_()
    old = t([-10.5, -5.0, -6.0, -3.1])
    advantages = t([1.0, -1.0, -2.0, 0.5])
    loss, metrics = sequence_clipped_policy_loss(logps, old, advantages, epsilon_low=0.2, epsilon_high=0.2)
    expected = []
    for lp, o, a in zip(logps.tolist(), old.tolist(), advantages.tolist()):
        ratio = math.exp(lp - o)
        expected.append(-min(ratio * a, clip(ratio, 0.8, 1.2) * a))
    torch.testing.assert_close(loss, t(expected))
    # ratios 1.65 (A>0: high), 1.0, 0.37 (A<0: low), 1.105
    assert metrics["clip_ratio/high_mean"] == 0.25 and metrics["clip_ratio/low_mean"] == 0.25
    assert metrics["clip_ratio/region_mean"] == 0.5


# ----- aggregation ------------------------------------------------------------------------------


def test_vespo_aggregates_as_dapo():
    per_token, mask = t([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[1, 1], [1, 0]])
    assert aggregate_token_loss(per_token, mask, "vespo", num_items_in_batch=6).item() == pytest.approx(1.0)


def test_aggregations():
    per_token = t([[1.0, 2.0, 3.0, 100.0], [4.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    total = 1 + 2 + 3 + 4 + 8
    assert aggregate_token_loss(per_token, mask, "grpo").item() == pytest.approx((2.0 + 4.0 + 2.0) / 3)
    assert aggregate_token_loss(per_token, mask, "bnpo").item() == pytest.approx(total / 8)
    assert aggregate_token_loss(per_token, mask, "dr_grpo", max_completion_length=16).item() == pytest.approx(
        total / (3 * 16)
    )
    assert aggregate_token_loss(per_token, mask, "dapo").item() == pytest.approx(total / 8)
    assert aggregate_token_loss(per_token, mask, "dapo", num_items_in_batch=40).item() == pytest.approx(total / 40)
    assert aggregate_token_loss(per_token, mask, "luspo").item() == pytest.approx((6 + 4 + 8) / 3)
    assert POLICY_LOSS_AGGREGATIONS.get("cispo") is POLICY_LOSS_AGGREGATIONS.get("dapo")
    assert POLICY_LOSS_AGGREGATIONS.get("sapo") is POLICY_LOSS_AGGREGATIONS.get("grpo")


def test_aggregation_errors():
    per_token, mask = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(ConfigError, match="max_completion_length"):
        aggregate_token_loss(per_token, mask, "dr_grpo")
    with pytest.raises(ConfigError, match="'grpo'"):
        aggregate_token_loss(per_token, mask, "ppo2")


# ----- value loss -------------------------------------------------------------------------------


def test_clipped_value_loss():
    values = t([[1.0, 0.5, 3.0], [0.0, -1.0, 9.0]]).requires_grad_()
    old_values = t([[0.8, 0.0, 2.0], [0.1, -0.5, 0.0]])
    returns = t([[2.0, 0.4, 2.5], [0.0, -2.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, metrics = clipped_value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    terms, clipped_count = [], 0
    for b in range(2):
        for s in range(3):
            if not mask[b, s]:
                continue
            v, o, r = values[b, s].item(), old_values[b, s].item(), returns[b, s].item()
            unclipped, clipped = (v - r) ** 2, (clip(v, o - 0.2, o + 0.2) - r) ** 2
            terms.append(max(unclipped, clipped))
            clipped_count += clipped > unclipped
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms))
    assert metrics["vf_clipfrac"] == pytest.approx(clipped_count / 5)
    loss.backward()
    assert torch.isfinite(values.grad).all()


def test_off_policy_sequence_mask_drops_negative_advantage_sequences_that_drifted():
    """DeepSeek-V3.2 eq. 9 by hand: mean KL_i = mean_t (log pi_old - log pi); keep if A >= 0 or KL_i <= delta."""
    from posttrain.losses.policy import off_policy_sequence_mask

    logps = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, -9.0], [-3.0, -3.0, -3.0], [-1.0, -1.0, -1.0]])
    sampling = torch.tensor([[-0.2, -1.0, -9.0], [-1.1, -0.9, float("nan")], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [0, 0, 0]])
    advantages = torch.tensor([-1.0, -0.5, 2.0, -1.0])
    # KL: row 0 (0.8 + 1.0) / 2 = 0.9; row 1 (-0.1 + 0.1 + 0 [NaN]) / 3 = 0; row 2 = 2.0 (A > 0); row 3 no tokens: 0
    keep = off_policy_sequence_mask(advantages, logps, sampling, mask, threshold=0.5)
    assert keep.shape == (4, 1)
    assert keep.squeeze(1).tolist() == [0.0, 1.0, 1.0, 1.0]
    assert off_policy_sequence_mask(advantages, logps, sampling, mask, threshold=0.95).squeeze(1).tolist() == [1.0] * 4


def test_policy_weights_scale_the_policy_term_and_not_the_kl_term():
    from posttrain.losses.policy import clipped_policy_loss

    logps = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]], dtype=torch.float64)
    old = logps + 0.1
    ref = logps - 0.3
    mask = torch.ones(2, 2)
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    weights = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    options = dict(ref_logps=ref, kl_coef=0.5, use_bias_correction_kl=False)
    full, _ = clipped_policy_loss(logps, old, advantages, mask, **options)
    policy_only, _ = clipped_policy_loss(logps, old, advantages, mask)
    weighted, _ = clipped_policy_loss(logps, old, advantages, mask, policy_weights=weights, **options)
    assert torch.allclose(weighted, full - policy_only * (1 - weights))
