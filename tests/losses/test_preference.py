"""DPO-family losses against per-example values computed with Python floats (math module)."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.errors import ConfigError, DataError
from posttrain.losses.preference import (
    PREFERENCE_LOSSES,
    PreferenceLogps,
    RunningMean,
    combined_preference_loss,
    dpo_rewards,
    f_divergence_scores,
)
from posttrain.losses.token_weighting import length_desensitized_logps, log_sum_squared_probs, wpo_weights

POLICY_CHOSEN = [-5.0, -9.5, -3.2]
POLICY_REJECTED = [-6.1, -8.0, -7.7]
REF_CHOSEN = [-5.4, -9.0, -4.0]
REF_REJECTED = [-5.9, -8.6, -6.5]
CHOSEN_TOKENS = [4.0, 7.0, 3.0]
REJECTED_TOKENS = [5.0, 6.0, 8.0]
BETA = 0.5


def make_logps(dtype=torch.float64, requires_grad=False) -> PreferenceLogps:
    def t(values):
        return torch.tensor(values, dtype=dtype, requires_grad=requires_grad)

    return PreferenceLogps(
        policy_chosen=t(POLICY_CHOSEN),
        policy_rejected=t(POLICY_REJECTED),
        ref_chosen=torch.tensor(REF_CHOSEN, dtype=dtype),
        ref_rejected=torch.tensor(REF_REJECTED, dtype=dtype),
        chosen_num_tokens=torch.tensor(CHOSEN_TOKENS, dtype=dtype),
        rejected_num_tokens=torch.tensor(REJECTED_TOKENS, dtype=dtype),
    )


# ----- independent scalar reference -------------------------------------------------------------


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def chosen_ratio(i: int) -> float:
    return POLICY_CHOSEN[i] - REF_CHOSEN[i]


def rejected_ratio(i: int) -> float:
    return POLICY_REJECTED[i] - REF_REJECTED[i]


def expected(loss_type: str, beta: float, eps: float = 0.0, tau: float = 0.05, delta: float = 0.0) -> list[float]:
    n = len(POLICY_CHOSEN)
    out = []
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            a = sorted(POLICY_CHOSEN[i] - POLICY_REJECTED[i] for i in range(n))
            b = sorted(REF_CHOSEN[i] - REF_REJECTED[i] for i in range(n))
        else:
            a = sorted(chosen_ratio(i) for i in range(n))
            b = sorted(rejected_ratio(i) for i in range(n))
        return [-(1 - eps) * logsig(beta * (a[k] - b[k])) - eps * logsig(-beta * (a[k] - b[k])) for k in range(n)]
    if loss_type == "sft":
        value = -sum(POLICY_CHOSEN) / sum(CHOSEN_TOKENS)
        return [value] * n
    for i in range(n):
        c, r = chosen_ratio(i), rejected_ratio(i)
        d = c - r
        if loss_type == "sigmoid":
            value = -(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d)
        elif loss_type == "sigmoid_norm":
            dn = c / CHOSEN_TOKENS[i] - r / REJECTED_TOKENS[i]
            value = -(1 - eps) * logsig(beta * dn) - eps * logsig(-beta * dn)
        elif loss_type == "hinge":
            value = max(0.0, 1 - beta * d)
        elif loss_type == "ipo":
            dn = c / CHOSEN_TOKENS[i] - r / REJECTED_TOKENS[i]
            value = (dn - 1 / (2 * beta)) ** 2
        elif loss_type == "ipo_sum":
            value = (d - 1 / (2 * beta)) ** 2
        elif loss_type == "robust":
            value = ((1 - eps) * -logsig(beta * d) - eps * -logsig(-beta * d)) / (1 - 2 * eps)
        elif loss_type == "exo_pair":
            q = sig(beta * d)
            value = q * (math.log(q) - math.log(1 - eps)) + (1 - q) * (math.log(1 - q) - math.log(eps))
        elif loss_type == "discopop":
            z = beta * d
            m = sig(z / tau)
            value = (1 - m) * -logsig(z) + m * math.exp(-z)
        elif loss_type == "nca_pair":
            value = -logsig(beta * c) - 0.5 * logsig(-beta * c) - 0.5 * logsig(-beta * r)
        elif loss_type == "bco_pair":
            value = -logsig(beta * c - delta) - logsig(-(beta * r - delta))
        elif loss_type == "sppo_hard":
            value = (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
        elif loss_type == "apo_zero":
            value = 1 - sig(beta * c) + sig(beta * r)
        elif loss_type == "apo_down":
            value = sig(beta * c) + 1 - sig(beta * (c - r))
        else:
            raise AssertionError(loss_type)
        out.append(value)
    return out


# ----- each loss --------------------------------------------------------------------------------

CASES = [
    ("sigmoid", 0.0, {}),
    ("sigmoid", 0.1, {}),
    ("sigmoid_norm", 0.0, {}),
    ("hinge", 0.0, {}),
    ("ipo", 0.0, {}),
    ("robust", 0.1, {}),
    ("robust", 0.0, {}),
    ("exo_pair", 0.01, {}),
    ("discopop", 0.0, {}),
    ("discopop", 0.0, {"discopop_tau": 0.5}),
    ("nca_pair", 0.0, {}),
    ("bco_pair", 0.0, {}),
    ("sppo_hard", 0.0, {}),
    ("aot", 0.0, {}),
    ("aot", 0.2, {}),
    ("aot_unpaired", 0.1, {}),
    ("apo_zero", 0.0, {}),
    ("apo_down", 0.0, {}),
    ("sft", 0.0, {}),
]


@pytest.mark.parametrize("loss_type,eps,options", CASES)
@pytest.mark.parametrize("beta", [0.1, BETA])
def test_loss_matches_hand_computation(loss_type, eps, options, beta):
    loss = PREFERENCE_LOSSES.get(loss_type)(make_logps(), beta=beta, label_smoothing=eps, **options)
    reference = expected(loss_type, beta, eps, tau=options.get("discopop_tau", 0.05))
    assert loss.shape == (3,)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, torch.tensor(reference, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type", PREFERENCE_LOSSES.names())
def test_every_loss_in_float32_matches_float64(loss_type):
    wide = PREFERENCE_LOSSES.get(loss_type)(make_logps(torch.float64), beta=BETA, label_smoothing=0.01)
    narrow = PREFERENCE_LOSSES.get(loss_type)(make_logps(torch.float32), beta=BETA, label_smoothing=0.01)
    assert narrow.dtype == torch.float32
    torch.testing.assert_close(narrow.double(), wide, rtol=1e-5, atol=1e-6)


def test_every_trl_loss_type_is_registered():
    trl_loss_types = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}  # fmt: skip
    assert trl_loss_types <= set(PREFERENCE_LOSSES.names())
    assert PREFERENCE_LOSSES.get("aot_pair") is PREFERENCE_LOSSES.get("aot_unpaired")


def test_ipo_averaging_is_an_option():
    summed = PREFERENCE_LOSSES.get("ipo")(make_logps(), beta=BETA, average_log_probs=False)
    torch.testing.assert_close(summed, torch.tensor(expected("ipo_sum", BETA), dtype=torch.float64))
    averaged = PREFERENCE_LOSSES.get("ipo")(make_logps(), beta=BETA)
    assert not torch.allclose(summed, averaged)


def test_exo_pair_without_label_smoothing_uses_the_paper_default():
    loss = PREFERENCE_LOSSES.get("exo_pair")(make_logps(), beta=BETA, label_smoothing=0.0)
    torch.testing.assert_close(loss, torch.tensor(expected("exo_pair", BETA, eps=1e-3), dtype=torch.float64))


def test_robust_rejects_a_flip_rate_of_one_half():
    with pytest.raises(ConfigError, match="label_smoothing"):
        PREFERENCE_LOSSES.get("robust")(make_logps(), beta=BETA, label_smoothing=0.5)


def test_bco_pair_running_mean_is_explicit_state():
    running = RunningMean()
    logps = make_logps()
    batch_mean = sum(BETA * chosen_ratio(i) + BETA * rejected_ratio(i) for i in range(3)) / 6
    first = PREFERENCE_LOSSES.get("bco_pair")(logps, beta=BETA, running_mean=running)
    assert running.count == 1 and running.mean == pytest.approx(batch_mean, abs=1e-12)
    torch.testing.assert_close(first, torch.tensor(expected("bco_pair", BETA, delta=batch_mean), dtype=torch.float64))

    # second batch: shifted log-probs; the shift is the mean of the two batch means
    shifted = make_logps()
    shifted.policy_chosen = shifted.policy_chosen + 1.0
    second_mean = batch_mean + BETA * 1.0 / 2
    PREFERENCE_LOSSES.get("bco_pair")(shifted, beta=BETA, running_mean=running)
    assert running.mean == pytest.approx((batch_mean + second_mean) / 2, abs=1e-12)

    # evaluation does not move it; a restored copy continues identically
    before = running.mean
    PREFERENCE_LOSSES.get("bco_pair")(logps, beta=BETA, running_mean=running, update_running_mean=False)
    assert running.mean == before
    restored = RunningMean()
    restored.load_state_dict(running.state_dict())
    assert restored.mean == running.mean and restored.count == 2


def test_policy_equal_to_reference_gives_log2_and_zero_rewards():
    values = torch.tensor(POLICY_CHOSEN, dtype=torch.float64)
    other = torch.tensor(POLICY_REJECTED, dtype=torch.float64)
    logps = PreferenceLogps(values, other, values.clone(), other.clone())
    loss = PREFERENCE_LOSSES.get("sigmoid")(logps, beta=0.1)
    torch.testing.assert_close(loss, torch.full((3,), math.log(2.0), dtype=torch.float64))
    chosen_rewards, rejected_rewards = dpo_rewards(logps, beta=0.1)
    assert torch.count_nonzero(chosen_rewards) == 0 and torch.count_nonzero(rejected_rewards) == 0
    _, metrics = combined_preference_loss(logps, ["sigmoid"], beta=0.1)
    assert metrics["rewards/chosen"] == 0.0 and metrics["rewards/margins"] == 0.0
    assert metrics["rewards/accuracies"] == 0.0  # ties are not counted as correct
    assert metrics["loss/sigmoid"] == pytest.approx(math.log(2.0), abs=1e-12)


def test_sigmoid_gradient_matches_hand_derivation():
    logps = make_logps(requires_grad=True)
    PREFERENCE_LOSSES.get("sigmoid")(logps, beta=BETA).sum().backward()
    # d/d(policy_chosen) of -log sigma(beta * d) = -beta * sigma(-beta * d); the rejected one has the opposite sign
    for i in range(3):
        d = chosen_ratio(i) - rejected_ratio(i)
        assert logps.policy_chosen.grad[i].item() == pytest.approx(-BETA * sig(-BETA * d), abs=1e-12)
        assert logps.policy_rejected.grad[i].item() == pytest.approx(BETA * sig(-BETA * d), abs=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust", "exo_pair", "discopop", "nca_pair", "apo_down",
                                       "aot", "sigmoid_norm"])  # fmt: skip
def test_gradcheck(loss_type):
    def fn(policy_chosen, policy_rejected):
        logps = make_logps()
        logps.policy_chosen, logps.policy_rejected = policy_chosen, policy_rejected
        return PREFERENCE_LOSSES.get(loss_type)(logps, beta=BETA, label_smoothing=0.1)

    inputs = (torch.tensor(POLICY_CHOSEN, dtype=torch.float64, requires_grad=True),
              torch.tensor(POLICY_REJECTED, dtype=torch.float64, requires_grad=True))  # fmt: skip
    assert torch.autograd.gradcheck(fn, inputs)


# ----- f-divergences ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_scores(kind):
    alpha = 0.3
    x = [-1.5, 0.0, 0.7]
    if kind == "forward_kl":
        reference = [1 - math.exp(-v) for v in x]
    elif kind == "js_divergence":
        reference = [math.log(2 * math.exp(v) / (math.exp(v) + 1)) for v in x]
    else:
        reference = [(math.exp(v) ** (alpha - 1) - 1) / (alpha - 1) for v in x]
    scores = f_divergence_scores(torch.tensor(x, dtype=torch.float64), kind, alpha)
    torch.testing.assert_close(scores, torch.tensor(reference, dtype=torch.float64))


def test_sigmoid_with_forward_kl():
    loss = PREFERENCE_LOSSES.get("sigmoid")(make_logps(), beta=BETA, f_divergence_type="forward_kl")
    reference = []
    for i in range(3):
        d = (1 - math.exp(-chosen_ratio(i))) - (1 - math.exp(-rejected_ratio(i)))
        reference.append(-logsig(BETA * d))
    torch.testing.assert_close(loss, torch.tensor(reference, dtype=torch.float64))


def test_f_divergence_is_refused_for_losses_without_a_valid_form():
    with pytest.raises(ConfigError, match="f_divergence_type"):
        combined_preference_loss(make_logps(), ["sigmoid", "nca_pair"], beta=BETA, f_divergence_type="js_divergence")
    with pytest.raises(ConfigError, match="f_divergence_type"):
        combined_preference_loss(make_logps(), ["sigmoid"], beta=BETA, f_divergence_type="tv")


# ----- mixtures, RPO, weighting -----------------------------------------------------------------


def test_mixture_of_losses_with_weights():
    loss, metrics = combined_preference_loss(
        make_logps(), ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], beta=BETA
    )
    components = {name: sum(expected(name, BETA)) / 3 for name in ("sigmoid", "bco_pair", "sft")}
    total = 0.8 * components["sigmoid"] + 0.2 * components["bco_pair"] + 1.0 * components["sft"]
    assert loss.item() == pytest.approx(total, abs=1e-12)
    for name, value in components.items():
        assert metrics[f"loss/{name}"] == pytest.approx(value, abs=1e-12)


def test_default_weights_are_one():
    loss, _ = combined_preference_loss(make_logps(), ["hinge", "apo_zero"], beta=BETA)
    total = sum(expected("hinge", BETA)) / 3 + sum(expected("apo_zero", BETA)) / 3
    assert loss.item() == pytest.approx(total, abs=1e-12)


def test_rpo_adds_alpha_times_chosen_nll():
    base, _ = combined_preference_loss(make_logps(), ["sigmoid"], beta=BETA)
    with_rpo, metrics = combined_preference_loss(make_logps(), ["sigmoid"], beta=BETA, rpo_alpha=0.5)
    nll = -sum(POLICY_CHOSEN) / sum(CHOSEN_TOKENS)
    assert with_rpo.item() == pytest.approx(base.item() + 0.5 * nll, abs=1e-12)
    assert metrics["loss/nll"] == pytest.approx(nll, abs=1e-12)
    given, _ = combined_preference_loss(
        make_logps(), ["sigmoid"], beta=BETA, rpo_alpha=2.0, chosen_nll=torch.tensor(1.25, dtype=torch.float64)
    )
    assert given.item() == pytest.approx(base.item() + 2.5, abs=1e-12)


def test_metrics_are_batch_means_of_rewards_and_logps():
    _, metrics = combined_preference_loss(make_logps(), ["sigmoid"], beta=BETA)
    chosen = [BETA * chosen_ratio(i) for i in range(3)]
    rejected = [BETA * rejected_ratio(i) for i in range(3)]
    assert metrics["rewards/chosen"] == pytest.approx(sum(chosen) / 3, abs=1e-12)
    assert metrics["rewards/rejected"] == pytest.approx(sum(rejected) / 3, abs=1e-12)
    assert metrics["rewards/margins"] == pytest.approx((sum(chosen) - sum(rejected)) / 3, abs=1e-12)
    assert metrics["rewards/accuracies"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 3)
    assert metrics["logps/chosen"] == pytest.approx(sum(POLICY_CHOSEN) / 3, abs=1e-12)
    assert metrics["logps/rejected"] == pytest.approx(sum(POLICY_REJECTED) / 3, abs=1e-12)
    assert all(isinstance(value, float) for value in metrics.values())


def test_pair_weights_scale_each_pair_and_carry_no_gradient():
    weights = torch.tensor([0.5, 1.0, 0.25], dtype=torch.float64, requires_grad=True)
    logps = make_logps(requires_grad=True)
    loss, _ = combined_preference_loss(logps, ["sigmoid"], beta=BETA, pair_weights=weights)
    reference = sum(w * v for w, v in zip([0.5, 1.0, 0.25], expected("sigmoid", BETA))) / 3
    assert loss.item() == pytest.approx(reference, abs=1e-12)
    loss.backward()
    assert weights.grad is None


def test_wpo_weights_from_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, dtype=torch.float64)
    tokens = torch.randint(0, 6, (2, 4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    token_logps = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    weights = wpo_weights(token_logps, log_sum_squared_probs(logits), mask)
    for b in range(2):
        terms = []
        for t in range(4):
            if mask[b, t]:
                probs = [math.exp(v) for v in logits[b, t].tolist()]
                z = sum(probs)
                probs = [p / z for p in probs]
                terms.append(math.log(probs[tokens[b, t]]) - math.log(sum(p * p for p in probs)))
        assert weights[b].item() == pytest.approx(math.exp(sum(terms) / len(terms)), rel=1e-6)


def test_sorting_losses_refuse_pair_weights():
    with pytest.raises(ConfigError, match="use_weighting"):
        combined_preference_loss(make_logps(), ["aot"], beta=BETA, pair_weights=torch.ones(3, dtype=torch.float64))


def test_length_desensitized_logps():
    chosen = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], dtype=torch.float64)
    rejected = torch.tensor([[-0.5, -0.5, 0.0, 0.0]], dtype=torch.float64)
    chosen_mask = torch.tensor([[1, 1, 1, 1]])
    rejected_mask = torch.tensor([[1, 1, 0, 0]])
    chosen_logps, rejected_logps = length_desensitized_logps(chosen, chosen_mask, rejected, rejected_mask, 0.3)
    assert chosen_logps.item() == pytest.approx(-1 - 2 + 0.3 * (-3 - 4), abs=1e-14)
    assert rejected_logps.item() == pytest.approx(-1.0)
    plain, _ = length_desensitized_logps(chosen, chosen_mask, rejected, rejected_mask, 1.0)
    assert plain.item() == pytest.approx(-10.0)


# ----- bad input --------------------------------------------------------------------------------


def test_unknown_loss_type_lists_the_known_ones():
    with pytest.raises(ConfigError, match="'sigmoid'") as info:
        combined_preference_loss(make_logps(), ["sigmod"], beta=BETA)
    assert "loss_type" in str(info.value) and "sigmod" in str(info.value)


def test_configuration_errors():
    with pytest.raises(ConfigError, match="loss_weights"):
        combined_preference_loss(make_logps(), ["sigmoid", "ipo"], [1.0], beta=BETA)
    with pytest.raises(ConfigError, match="twice"):
        combined_preference_loss(make_logps(), ["sigmoid", "sigmoid"], beta=BETA)
    with pytest.raises(ConfigError, match="beta"):
        combined_preference_loss(make_logps(), ["sigmoid"], beta=0.0)
    with pytest.raises(ConfigError, match="discopop_taus"):
        combined_preference_loss(make_logps(), ["discopop"], beta=BETA, discopop_taus=0.1)


def test_missing_token_counts_and_bad_shapes_are_data_errors():
    logps = make_logps()
    logps.chosen_num_tokens = None
    with pytest.raises(DataError, match="chosen_num_tokens"):
        PREFERENCE_LOSSES.get("ipo")(logps, beta=BETA)
    with pytest.raises(DataError, match="ref_chosen"):
        PreferenceLogps(torch.zeros(3), torch.zeros(3), torch.zeros(2), torch.zeros(3))


def test_nll_terms_use_the_plain_sums_under_length_weighting():
    # LD-DPO weighs the sums that the preference terms compare; sft and RPO are likelihoods of every token
    plain = [-6.5, -9.5, -4.1]
    logps = make_logps()
    logps.policy_chosen_plain = torch.tensor(plain, dtype=torch.float64)
    nll = -sum(plain) / sum(CHOSEN_TOKENS)
    sft = PREFERENCE_LOSSES.get("sft")(logps, beta=BETA)
    torch.testing.assert_close(sft, torch.full((3,), nll, dtype=torch.float64))
    loss, metrics = combined_preference_loss(logps, ["sigmoid"], beta=BETA, rpo_alpha=0.5)
    sigmoid = sum(-logsig(BETA * (chosen_ratio(i) - rejected_ratio(i))) for i in range(3)) / 3
    assert loss.item() == pytest.approx(sigmoid + 0.5 * nll, abs=1e-12)
    assert metrics["loss/nll"] == pytest.approx(nll, abs=1e-12)
    # the preference terms still read the weighted sums
    assert metrics["logps/chosen"] == pytest.approx(sum(POLICY_CHOSEN) / 3, abs=1e-12)
