"""Loss functions: pure functions of tensors, one module per family.

* :mod:`~posttrain.losses.reward`: Bradley-Terry reward-model loss.
* :mod:`~posttrain.losses.preference`: DPO and its variants (``PREFERENCE_LOSSES``).
* :mod:`~posttrain.losses.kl`: per-token KL estimators (``KL_ESTIMATORS``).
* :mod:`~posttrain.losses.advantages`: GRPO, RLOO, GAE (``ADVANTAGE_ESTIMATORS``).
* :mod:`~posttrain.losses.policy`: clipped policy objectives and their aggregation
  (``POLICY_LOSS_AGGREGATIONS``), the PPO value loss.
* :mod:`~posttrain.losses.sft`: token-level NLL.
"""

from __future__ import annotations

from posttrain.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    GroupStats,
    decoupled_group_advantages,
    gae,
    group_relative_advantages,
    kl_penalized_scores,
    leave_one_out_advantages,
    token_level_kl_rewards,
)
from posttrain.losses.kl import KL_ESTIMATORS, kl_divergence, kl_k1, kl_k2, kl_k3
from posttrain.losses.policy import (
    POLICY_LOSS_AGGREGATIONS,
    aggregate_token_loss,
    cispo_policy_loss,
    clipped_policy_loss,
    clipped_value_loss,
    importance_log_weights,
    sapo_policy_loss,
    sequence_clipped_policy_loss,
)
from posttrain.losses.preference import (
    PREFERENCE_LOSSES,
    PreferenceLogps,
    RunningMean,
    chosen_token_nll,
    combined_preference_loss,
    dpo_rewards,
    f_divergence_scores,
    preference_metrics,
    validate_preference_config,
)
from posttrain.losses.token_weighting import length_desensitized_logps, log_sum_squared_probs, wpo_weights
from posttrain.losses.registry import Registry
from posttrain.losses.reward import bradley_terry_loss, center_rewards_penalty, reward_metrics

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "POLICY_LOSS_AGGREGATIONS",
    "PREFERENCE_LOSSES",
    "GroupStats",
    "PreferenceLogps",
    "Registry",
    "RunningMean",
    "aggregate_token_loss",
    "bradley_terry_loss",
    "center_rewards_penalty",
    "chosen_token_nll",
    "cispo_policy_loss",
    "clipped_policy_loss",
    "clipped_value_loss",
    "combined_preference_loss",
    "decoupled_group_advantages",
    "dpo_rewards",
    "f_divergence_scores",
    "gae",
    "group_relative_advantages",
    "importance_log_weights",
    "kl_divergence",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalized_scores",
    "leave_one_out_advantages",
    "length_desensitized_logps",
    "log_sum_squared_probs",
    "preference_metrics",
    "reward_metrics",
    "sapo_policy_loss",
    "sequence_clipped_policy_loss",
    "token_level_kl_rewards",
    "validate_preference_config",
    "wpo_weights",
]
