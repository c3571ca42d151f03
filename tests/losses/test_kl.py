"""KL estimators against Python-float formulas."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.losses.kl import KL_ESTIMATORS, kl_divergence, kl_k1, kl_k2, kl_k3

LOGPS = [-0.5, -2.0, -1.2, -0.01]
REF_LOGPS = [-0.7, -1.0, -1.2, -3.0]


def tensors():
    return torch.tensor(LOGPS, dtype=torch.float64), torch.tensor(REF_LOGPS, dtype=torch.float64)


def test_k1_k2_k3_values():
    logps, ref = tensors()
    k1 = [a - b for a, b in zip(LOGPS, REF_LOGPS)]
    k2 = [0.5 * (a - b) ** 2 for a, b in zip(LOGPS, REF_LOGPS)]
    k3 = [math.exp(b - a) - (b - a) - 1 for a, b in zip(LOGPS, REF_LOGPS)]
    torch.testing.assert_close(kl_k1(logps, ref), torch.tensor(k1, dtype=torch.float64))
    torch.testing.assert_close(kl_k2(logps, ref), torch.tensor(k2, dtype=torch.float64))
    torch.testing.assert_close(kl_k3(logps, ref), torch.tensor(k3, dtype=torch.float64))
    assert kl_k3(logps, ref)[2].item() == 0.0  # equal log-probs


def test_k3_is_never_negative_even_for_tiny_differences():
    torch.manual_seed(0)
    logps = -torch.rand(10_000) * 5
    for scale in (1e-8, 1e-5, 1e-2, 1.0, 5.0):
        ref = logps + scale * torch.randn(10_000)
        assert (kl_k3(logps, ref) >= 0).all()
        assert (kl_k2(logps, ref) >= 0).all()


def test_k1_and_k3_are_unbiased_estimates_of_the_true_kl():
    # sample tokens from p and average the estimators: both converge to KL(p || q)
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    samples = torch.multinomial(p, 200_000, replacement=True)
    logps, ref = p.log()[samples], q.log()[samples]
    assert kl_k1(logps, ref).mean().item() == pytest.approx(true_kl, abs=5e-3)
    assert kl_k3(logps, ref).mean().item() == pytest.approx(true_kl, abs=5e-3)


def test_registry_and_lookup():
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]
    logps, ref = tensors()
    torch.testing.assert_close(kl_divergence(logps, ref, "k2"), kl_k2(logps, ref))
    with pytest.raises(ConfigError, match="kl_estimator"):
        kl_divergence(logps, ref, "k4")
