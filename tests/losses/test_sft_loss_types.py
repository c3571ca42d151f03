"""SFT loss types (``loss_type``): NLL and DFT, checked by hand in float64."""

import math

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.losses.sft import SFT_LOSSES, dft_from_logps, nll_from_logps


def test_dft_value_and_gradient_by_hand():
    probs = [0.5, 0.25, 0.9]
    weights = [1 / 3] * 3
    logps = torch.tensor([math.log(p) for p in probs], dtype=torch.float64, requires_grad=True)
    loss = dft_from_logps(logps, torch.tensor(weights, dtype=torch.float64))
    expected = -sum(w * p * math.log(p) for w, p in zip(weights, probs))
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()
    # the probability is a constant weight: d loss / d log p_i = -w_i * p_i (no p_i * log p_i term)
    assert logps.grad.tolist() == pytest.approx([-w * p for w, p in zip(weights, probs)], abs=1e-12)


def test_dft_is_nll_scaled_per_token_by_the_probability():
    logps = torch.log(torch.tensor([0.2, 0.7], dtype=torch.float64))
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    nll_terms = [nll_from_logps(logps[i:i + 1], weights[i:i + 1]).item() for i in range(2)]
    dft = dft_from_logps(logps, weights).item()
    assert dft == pytest.approx(0.2 * nll_terms[0] + 0.7 * nll_terms[1], abs=1e-12)
    # a certain token (p = 1) costs nothing under either loss
    assert dft_from_logps(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)).item() == 0.0


def test_registry_names_and_chunked_nll_alias():
    assert SFT_LOSSES.get("chunked_nll") is nll_from_logps
    assert SFT_LOSSES.get("dft") is dft_from_logps
    with pytest.raises(ConfigError, match="loss_type|nll"):
        SFT_LOSSES.get("focal")
