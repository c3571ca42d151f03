"""GRPO's optional loss terms around the per-token objective: which tokens the policy term counts
(high-entropy tokens, sequences still on policy) and the entropy bonus with its adaptive coefficient.

The math is in :mod:`posttrain.losses.entropy` and :func:`posttrain.losses.policy.off_policy_sequence_mask`;
this module holds what a trainer adds to it: statistics over every process, the accumulation
scaling, and the controller state that a checkpoint must carry for an exact resume.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from posttrain.errors import ConfigError
from posttrain.losses.entropy import (
    adaptive_entropy_coef,
    applied_entropy_coef,
    high_entropy_mask,
    mean_token_entropy,
)
from posttrain.losses.policy import off_policy_sequence_mask
from posttrain.ops.distributed import all_gather_1d, all_reduce_sum


def check_entropy_options(config: Any) -> None:
    """ConfigError for values of the entropy and off-policy fields that mean nothing."""
    checks = [
        (0.0 <= config.top_entropy_quantile <= 1.0, "top_entropy_quantile",
         f"top_entropy_quantile must be in [0, 1], got {config.top_entropy_quantile}", "use e.g. 0.2, or 1.0 for all tokens"),
        (config.off_policy_mask_threshold is None or config.off_policy_mask_threshold > 0, "off_policy_mask_threshold",
         f"off_policy_mask_threshold must be > 0, got {config.off_policy_mask_threshold}", "use e.g. 0.5, or leave it unset"),
        (config.entropy_coef_min <= config.entropy_coef_max, "entropy_coef_min",
         f"entropy_coef_min ({config.entropy_coef_min}) is above entropy_coef_max ({config.entropy_coef_max})",
         "make entropy_coef_min <= entropy_coef_max"),
        (config.entropy_coef_delta >= 0, "entropy_coef_delta",
         f"entropy_coef_delta must be >= 0, got {config.entropy_coef_delta}", "use e.g. 0.005"),
    ]
    for ok, name, problem, fix in checks:
        if not ok:
            raise ConfigError(problem, field=name, fix=fix)


def policy_token_weights(
    args: Any, advantages: torch.Tensor, logps: torch.Tensor, old_logps: torch.Tensor, entropy: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, float]]:
    """``(policy_weights, entropy_mask, metrics)`` of one micro-batch; ``None`` where a term is off.

    ``policy_weights`` (B, T) or (B, 1) multiplies the policy term: the high-entropy token mask
    (``top_entropy_quantile < 1``, threshold over every process's tokens) times the off-policy sequence
    mask (``off_policy_mask_threshold``; KL measured from ``old_logps``, the sampling policy's log-probs,
    which equal the current ones on policy, so nothing is dropped then). ``entropy_mask`` is the token
    mask the entropy bonus shares.
    """
    weights, entropy_mask, metrics = None, None, {}
    if args.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropy, mask, args.top_entropy_quantile, gather=all_gather_1d)
        weights = entropy_mask.to(logps.dtype)
    if args.off_policy_mask_threshold is not None:
        keep = off_policy_sequence_mask(advantages, logps, old_logps, mask, args.off_policy_mask_threshold)
        has_tokens = mask.bool().any(dim=-1)
        counts = all_reduce_sum(torch.stack([(1.0 - keep.squeeze(-1))[has_tokens].sum(), has_tokens.sum().float()]))
        metrics["off_policy_masked_fraction"] = float(counts[0] / counts[1].clamp(min=1.0))
        weights = keep if weights is None else weights * keep
    return weights, entropy_mask, metrics


class EntropyBonus:
    """``- c * H``: the entropy bonus of the loss, ``H`` the mean entropy of the micro-batch's tokens the
    policy term counts (over every process), ``c`` fixed (``entropy_coef``) or adapted once per optimizer
    step (``use_adaptive_entropy``): moved by ``entropy_coef_delta`` towards the step's mean entropy
    staying above ``entropy_target`` and applied only once that entropy is at or below the target.
    """

    def __init__(self, args: Any) -> None:
        self.args = args
        self.coef = float(args.entropy_coef)
        self.last_entropy = math.inf  # mean entropy of the previous optimizer step (none yet)
        self._window: torch.Tensor | None = None  # [entropy sum, token count] of this step's micro-batches

    @property
    def enabled(self) -> bool:
        return self.args.entropy_coef != 0.0 or self.args.use_adaptive_entropy

    def loss_term(self, entropy: torch.Tensor, mask: torch.Tensor, *, training: bool, accumulation_steps: int,
                  num_processes: int, end_of_step: bool) -> tuple[torch.Tensor, dict[str, float]]:
        """``(term to add to the loss, metrics)`` for one micro-batch; ``entropy`` differentiable (B, T)."""
        args = self.args
        weights = mask.to(entropy.dtype)
        count = all_reduce_sum(weights.sum())
        # times the processes: data parallelism averages the gradients, the mean is over every process's tokens
        bonus = mean_token_entropy(entropy, weights, token_count=count) * num_processes
        coef = applied_entropy_coef(self.coef, self.last_entropy, adaptive=args.use_adaptive_entropy,
                                    target=args.entropy_target)
        term = -coef * bonus / (accumulation_steps if training else 1)
        metrics: dict[str, float] = {}
        if training and args.use_adaptive_entropy:
            stats = torch.stack([(entropy.detach() * weights).sum(), weights.sum()])
            self._window = stats if self._window is None else self._window + stats
            if end_of_step:
                totals = all_reduce_sum(self._window)
                step_entropy = float(totals[0] / totals[1].clamp(min=1.0))
                self.coef = adaptive_entropy_coef(self.coef, step_entropy, target=args.entropy_target,
                                                  delta=args.entropy_coef_delta, coef_min=args.entropy_coef_min,
                                                  coef_max=args.entropy_coef_max)
                self.last_entropy = step_entropy
                self._window = None
        if training and end_of_step:
            metrics["entropy_coef"] = self.coef
        return term, metrics

    def state_dict(self) -> dict[str, float]:
        """What a checkpoint holds (taken at an optimizer-step boundary, so the window is empty)."""
        return {"entropy_coef": self.coef, "last_entropy": self.last_entropy}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["entropy_coef"])
        self.last_entropy = float(state["last_entropy"])
        self._window = None
