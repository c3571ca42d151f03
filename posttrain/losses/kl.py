"""Per-token estimators of KL(policy || reference) from sampled tokens.

Reference: John Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html.
For a token sampled from the policy, with ``x = ref_logps - logps = log(pi_ref / pi)``:

* k1 = ``-x``: unbiased, high variance, can be negative per token;
* k2 = ``x^2 / 2``: biased (low bias when the policies are close), always >= 0;
* k3 = ``exp(x) - 1 - x``: unbiased and always >= 0 (the default of GRPO).

All take ``logps`` and ``ref_logps`` of any equal shape (usually (B, T)) and return the same shape;
masking and averaging are the caller's (:mod:`posttrain.ops.masked`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from posttrain.losses.registry import Registry

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator", field="kl_estimator")


@KL_ESTIMATORS.register("k1")
def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k1 = ``logps - ref_logps``; shapes (...) -> (...)."""
    return logps - ref_logps


@KL_ESTIMATORS.register("k2")
def kl_k2(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k2 = ``0.5 * (logps - ref_logps)^2``; shapes (...) -> (...)."""
    return 0.5 * (logps - ref_logps) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 = ``exp(ref_logps - logps) - (ref_logps - logps) - 1``; shapes (...) -> (...).

    Computed as ``expm1(x) - x``: near x = 0 (policy close to reference, the usual case) the naive
    ``exp(x) - 1 - x`` loses most digits and can round below zero; ``expm1`` keeps it >= 0.
    """
    log_ratio = ref_logps - logps
    return torch.expm1(log_ratio) - log_ratio


def kl_divergence(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate by estimator name ("k1", "k2" or "k3"); shapes (...) -> (...)."""
    return KL_ESTIMATORS.get(estimator)(logps, ref_logps)
