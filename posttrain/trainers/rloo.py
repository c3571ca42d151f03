"""REINFORCE Leave-One-Out: ``RLOOConfig`` and ``RLOOTrainer``.

RLOO (Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
Human Feedback in LLMs", arXiv:2402.14740; Kool et al., 2019) samples G completions per prompt and
uses, as each completion's baseline, the mean reward of the *other* G - 1: an unbiased,
critic-free REINFORCE estimator. The update treats each completion as one action: its summed
log-prob, a sequence-level importance ratio, PPO clipping when a batch is reused.

The KL towards the reference goes either into the reward (the paper's choice: ``beta`` x the
completion's summed KL estimate is subtracted from its score before the baseline) or into the loss
(``beta`` x the summed per-token KL, averaged over completions), chosen by ``kl_in_reward``.
Sampling, rewards and the buffered schedule are shared with GRPO (:mod:`posttrain.trainers.online`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from posttrain.errors import ConfigError
from posttrain.losses.advantages import ADVANTAGE_ESTIMATORS, kl_penalized_scores
from posttrain.losses.kl import KL_ESTIMATORS, kl_divergence
from posttrain.losses.policy import sequence_clipped_policy_loss
from posttrain.ops.distributed import global_mean_std
from posttrain.ops.masked import masked_mean, masked_sum
from posttrain.rollout.sequences import RolloutSequences
from posttrain.trainers.online import OnlineConfig, OnlineTrainer, ScoredRollout


@dataclass
class RLOOConfig(OnlineConfig):
    """Configuration of :class:`RLOOTrainer`: ``TrainingArguments``, the shared online fields, and these."""

    num_generations: int = field(default=2, metadata={"help": "Completions sampled per prompt (k in the RLOO paper)."})
    beta: float = field(default=0.05, metadata={"help": "KL coefficient against the reference model; 0 loads no reference."})
    kl_in_reward: bool = field(
        default=True,
        metadata={"help": "Subtract beta x the completion's summed KL from its reward (True, as in the paper), "
                  "or add beta x the summed per-token KL to the loss (False)."},
    )
    kl_estimator: str | None = field(
        default=None,
        metadata={"help": "KL estimator: k1, k2 or k3 (default: k1 in the reward, k3 in the loss)."},
    )
    normalize_advantages: bool = field(
        default=False, metadata={"help": "Whiten the advantages over each generation batch (mean 0, std 1)."}
    )
    reward_clip_range: list[float] | None = field(
        default=None, metadata={"help": "Clip the total reward to [min, max] before the baseline, e.g. -1 1."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl_estimator is None:
            self.kl_estimator = "k1" if self.kl_in_reward else "k3"
        KL_ESTIMATORS.canonical(self.kl_estimator)  # ConfigError listing the known names
        if self.reward_clip_range is not None:
            bounds = list(self.reward_clip_range)
            if len(bounds) != 2 or not bounds[0] < bounds[1]:
                raise ConfigError(f"reward_clip_range must be two numbers min < max, got {self.reward_clip_range}",
                                  field="reward_clip_range", fix="use e.g. --reward_clip_range -1 1")
            self.reward_clip_range = [float(bounds[0]), float(bounds[1])]


class RLOOTrainer(OnlineTrainer):
    """REINFORCE with a leave-one-out baseline over each prompt's group.

    ``RLOOTrainer(model, reward_funcs, args=RLOOConfig(...), train_dataset=..., peft_config=...)``;
    see :class:`posttrain.trainers.online.OnlineTrainer` for every argument.
    """

    method_name: ClassVar[str] = "RLOO"
    config_class: ClassVar[type] = RLOOConfig

    def needs_generation_logps(self, mode: str) -> bool:
        # the KL in the reward is measured at sampling time, so the sampling policy's log-probs are needed
        kl_at_sampling = self.args.beta > 0 and self.args.kl_in_reward
        return kl_at_sampling or super().needs_generation_logps(mode)

    def compute_advantages(self, scored: ScoredRollout, rows: RolloutSequences) -> tuple[torch.Tensor, dict[str, float]]:
        args = self.args
        rewards = scored.rewards
        if args.reward_clip_range is not None:
            rewards = rewards.clamp(*args.reward_clip_range)
        metrics: dict[str, float] = {}
        if args.beta > 0 and args.kl_in_reward:
            mask = rows.completion_mask
            rewards = kl_penalized_scores(rewards, rows.old_logps, rows.ref_logps, mask, args.beta, args.kl_estimator)
            per_token_kl = kl_divergence(rows.old_logps, rows.ref_logps, args.kl_estimator)
            metrics["kl"] = self.masked_mean(per_token_kl, mask)
        advantages, stats = ADVANTAGE_ESTIMATORS.get("rloo")(
            rewards, scored.group_size, normalize=args.normalize_advantages, batch_mean_std=global_mean_std
        )
        metrics["frac_reward_zero_std"] = stats.frac_zero_std
        return advantages, metrics

    def compute_loss(self, model, inputs: RolloutSequences, return_outputs: bool = False, num_items_in_batch=None):
        if return_outputs:
            raise ConfigError("RLOOTrainer.compute_loss returns no model outputs", field="return_outputs",
                              fix="call it with return_outputs=False")
        args = self.args
        logps, entropy = self.policy_logps(model, inputs)
        mask = inputs.loss_mask
        sequence_logps = masked_sum(logps, mask, dim=-1)
        # on-policy (the batch is used before any optimizer step) the old policy is the current one
        if inputs.old_logps is not None:
            old_sequence_logps = masked_sum(inputs.old_logps, mask, dim=-1)
        else:
            old_sequence_logps = sequence_logps.detach()
        per_sequence_loss, metrics = sequence_clipped_policy_loss(
            sequence_logps, old_sequence_logps, inputs.advantages, epsilon_low=args.epsilon,
            epsilon_high=args.epsilon_high,
        )
        loss = per_sequence_loss.mean()
        if args.beta > 0 and not args.kl_in_reward:
            per_token_kl = kl_divergence(logps, inputs.ref_logps, args.kl_estimator)
            loss = loss + args.beta * masked_sum(per_token_kl, mask, dim=-1).mean()
            metrics["kl"] = masked_mean(per_token_kl.detach(), mask).item()
        loss = loss / self.loss_normaliser_for_accumulation()
        self.record_metrics({**metrics, "entropy": self.masked_mean(entropy, mask)})
        return loss
