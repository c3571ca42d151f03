"""Group Relative Policy Optimization: ``GRPOConfig`` and ``GRPOTrainer``.

GRPO (Shao et al., "DeepSeekMath", arXiv:2402.03300) samples G completions per prompt, scores them
with reward functions, and uses each completion's reward relative to its group as the advantage:
no value model. The policy is updated with PPO's clipped objective per token, optionally with a
k3 KL penalty towards a frozen reference (``beta > 0``).

Every step of the loop is a call into the library: sampling in :mod:`posttrain.rollout`, rewards in
:mod:`posttrain.rewards`, advantages in :mod:`posttrain.losses.advantages`, the per-token objective
and its reduction in :mod:`posttrain.losses.policy`; the buffered generation schedule is shared
with RLOO (:mod:`posttrain.trainers.online`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from posttrain.errors import ConfigError
from posttrain.losses.advantages import SCALE_REWARDS, decoupled_group_advantages, group_relative_advantages
from posttrain.losses.policy import (
    IMPORTANCE_SAMPLING_LEVELS,
    POLICY_LOSS_AGGREGATIONS,
    aggregate_token_loss,
    cispo_policy_loss,
    clipped_policy_loss,
    sapo_policy_loss,
    vespo_policy_loss,
)
from posttrain.models.lm_head import compute_head_in_float32
from posttrain.ops.distributed import global_mean_std
from posttrain.rollout.sequences import RolloutSequences
from posttrain.trainers.grpo_terms import EntropyBonus, check_entropy_options, policy_token_weights
from posttrain.trainers.online import OnlineConfig, OnlineTrainer, ScoredRollout
from posttrain.trainers.vllm_options import SamplingCorrectionOptions

MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")

logger = logging.getLogger("posttrain")


@dataclass
class GRPOConfig(SamplingCorrectionOptions, OnlineConfig):
    """Configuration of :class:`GRPOTrainer`: ``TrainingArguments``, the shared online fields, these, and the
    importance-sampling correction (:class:`~posttrain.trainers.vllm_options.SamplingCorrectionOptions`)."""

    loss_type: str = field(
        default="dapo",
        metadata={
            "help": "How token losses become one number: dapo (sum / tokens in the accumulated batch), grpo (mean of "
            "per-sequence means), bnpo (sum / tokens in the micro-batch), dr_grpo (sum / (B * max_completion_length)), "
            "cispo, sapo, luspo, vespo (each with its own per-token objective)."
        },
    )
    scale_rewards: str = field(
        default="group",
        metadata={"help": "Divide centred rewards by the std of the group ('group'), of the batch ('batch'), or not ('none')."},
    )
    importance_sampling_level: str = field(
        default="token", metadata={"help": "Importance ratio per token ('token') or per sequence ('sequence', GSPO)."}
    )
    multi_objective_aggregation: str = field(
        default="sum_then_normalize",
        metadata={"help": "Several reward functions: weighted sum then normalise, or normalise each then sum (GDPO)."},
    )
    delta: float | None = field(
        default=None, metadata={"help": "Cap the unclipped ratio at delta (two-sided clipping, INTELLECT-2)."}
    )
    use_bias_correction_kl: bool = field(
        default=True, metadata={"help": "Multiply the KL term by the importance ratio (unbiased KL gradient off-policy)."}
    )
    sapo_temperature_pos: float = field(default=1.0, metadata={"help": "SAPO gate temperature where A > 0."})
    sapo_temperature_neg: float = field(default=1.05, metadata={"help": "SAPO gate temperature where A <= 0."})
    vespo_k_pos: float = field(default=2.0, metadata={"help": "VESPO kernel power k where A >= 0 (weighs down w < 1)."})
    vespo_lambda_pos: float = field(
        default=3.0, metadata={"help": "VESPO kernel decay lambda where A >= 0 (weighs down w > 1)."}
    )
    vespo_k_neg: float = field(default=3.0, metadata={"help": "VESPO kernel power k where A < 0."})
    vespo_lambda_neg: float = field(default=2.0, metadata={"help": "VESPO kernel decay lambda where A < 0."})
    # token selection, entropy bonus, off-policy masking and the head's precision (posttrain.trainers.grpo_terms)
    top_entropy_quantile: float = field(
        default=1.0,
        metadata={"help": "Train the policy term only on the top rho fraction of tokens by entropy (Beyond the "
                  "80/20 Rule: 0.2); 1.0 keeps all tokens, 0.0 only the highest-entropy one."},
    )
    entropy_coef: float = field(
        default=0.0,
        metadata={"help": "Subtract entropy_coef x the mean token entropy from the loss (an exploration bonus, "
                  "the same for every loss_type); the starting value under use_adaptive_entropy."},
    )
    use_adaptive_entropy: bool = field(
        default=False,
        metadata={"help": "Skywork-OR1 adaptive entropy control: after each optimizer step, raise entropy_coef by "
                  "entropy_coef_delta if the step's mean entropy is <= entropy_target, else lower it; the bonus "
                  "applies only while the entropy is at or below the target."},
    )
    entropy_coef_min: float = field(default=0.0, metadata={"help": "Lowest entropy_coef under adaptive control."})
    entropy_coef_max: float = field(default=1.0, metadata={"help": "Highest entropy_coef under adaptive control."})
    entropy_coef_delta: float = field(
        default=0.005, metadata={"help": "Change of entropy_coef per optimizer step under adaptive control."}
    )
    entropy_target: float = field(
        default=0.2,
        metadata={"help": "Mean token entropy (nats) adaptive control keeps above, over the tokens the policy term "
                  "counts; set it near the entropy logged early in training."},
    )
    off_policy_mask_threshold: float | None = field(
        default=None,
        metadata={"help": "Drop from the policy term each sequence with a negative advantage whose mean token KL "
                  "from the sampling policy exceeds this (DeepSeek-V3.2 delta, e.g. 0.5); None: off."},
    )
    cast_lm_head_to_fp32: bool = field(
        default=False,
        metadata={"help": "Compute the output head's product in float32 for every log-prob of the loss (policy and "
                  "reference; ScaleRL), whatever the model's dtype. Sampling is unchanged."},
    )
    log_completions_hub_repo: str | None = field(
        default=None,
        metadata={"help": "Refused: posttrain writes completions.jsonl to output_dir and never uploads on its own."},
    )

    def __post_init__(self) -> None:
        # older configs and the CLI write scale_rewards as a boolean
        self.scale_rewards = {True: "group", False: "none", "true": "group", "false": "none", "True": "group",
                              "False": "none"}.get(self.scale_rewards, self.scale_rewards)
        super().__post_init__()
        POLICY_LOSS_AGGREGATIONS.canonical(self.loss_type)  # ConfigError listing the known names
        choices = [("scale_rewards", self.scale_rewards, SCALE_REWARDS),
                   ("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS),
                   ("multi_objective_aggregation", self.multi_objective_aggregation, MULTI_OBJECTIVE_AGGREGATIONS)]
        for name, value, allowed in choices:
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}", field=name, fix=f"use one of {', '.join(allowed)}")
        check_entropy_options(self)
        if self.log_completions_hub_repo:
            raise ConfigError(
                f"log_completions_hub_repo={self.log_completions_hub_repo!r}: posttrain does not upload to the Hub "
                "during training (it runs offline)", field="log_completions_hub_repo",
                fix="drop it; with log_completions the rows go to output_dir/completions.jsonl, which you can push "
                "with huggingface_hub.upload_file after the run",
            )
        self._check_sampling_correction()
        if (self.loss_type == "vespo" and self.use_vllm and self.vllm_importance_sampling_correction
                and not self.vllm_importance_sampling_mode.startswith("token")):
            raise ConfigError("loss_type='vespo' folds the sampler correction into its sequence weight token by token",
                              field="vllm_importance_sampling_mode", fix="use token_truncate or token_mask, or set "
                              "vllm_importance_sampling_correction=False")
        if (self.loss_type == "vespo" and not self.use_vllm and (self.bf16 or self.fp16)
                and self.vllm_importance_sampling_correction and not self.vllm_importance_sampling_mode.startswith("token")):
            logger.warning("loss_type='vespo' takes only token_* importance-sampling modes; the bf16 sampler's gap is "
                           "logged but not corrected (set vllm_importance_sampling_mode='token_truncate' to correct it)")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            logger.warning("loss_type='vespo' weighs each sequence by its whole-sequence ratio itself; "
                           "importance_sampling_level='%s' only changes the KL term's ratio", self.importance_sampling_level)


class GRPOTrainer(OnlineTrainer):
    """Group Relative Policy Optimization.

    ``GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset=..., peft_config=...)``;
    see :class:`posttrain.trainers.online.OnlineTrainer` for every argument.
    """

    method_name: ClassVar[str] = "GRPO"
    config_class: ClassVar[type] = GRPOConfig
    supports_turn_credit: ClassVar[bool] = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.entropy_bonus = EntropyBonus(self.args)
        if self.args.cast_lm_head_to_fp32:
            policy = self.accelerator.unwrap_model(self.model)
            reference = self.reference.model if self.reference is not None else None
            if not all(compute_head_in_float32(model) for model in (policy, reference) if model is not None):
                raise ConfigError(
                    "cast_lm_head_to_fp32 needs a plain linear output head; this model's head is wrapped (e.g. a "
                    "LoRA adapter on lm_head) or transforms its logits in a way the chunked head does not know",
                    field="cast_lm_head_to_fp32", fix="remove lm_head from the adapter's target_modules, or drop the flag",
                )

    def loop_state(self) -> dict:
        return {"entropy_bonus": self.entropy_bonus.state_dict()}

    def restore_loop_state(self, state: dict) -> None:
        if "entropy_bonus" in state:
            self.entropy_bonus.load_state_dict(state["entropy_bonus"])

    def compute_advantages(self, scored: ScoredRollout, rows: RolloutSequences) -> tuple[torch.Tensor, dict[str, float]]:
        if self.args.credit_assignment == "turn":
            from posttrain.trainers.agent import turn_credit_advantages

            return turn_credit_advantages(scored, self.args.scale_rewards), {}
        if self.args.multi_objective_aggregation == "normalize_then_sum":
            weights = torch.tensor(self.args.reward_weights or [1.0] * len(scored.reward_names),
                                   dtype=torch.float32, device=scored.rewards.device)
            advantages, stats = decoupled_group_advantages(scored.rewards_per_function, weights, scored.group_size,
                                                           batch_mean_std=global_mean_std)
        else:
            advantages, stats = group_relative_advantages(scored.rewards, scored.group_size, self.args.scale_rewards,
                                                          batch_mean_std=global_mean_std)
        return advantages, {"frac_reward_zero_std": stats.frac_zero_std}

    def sampling_correction(self) -> dict | None:
        args = self.args
        if not args.vllm_importance_sampling_correction:
            return None
        if args.loss_type == "vespo" and not args.vllm_importance_sampling_mode.startswith("token"):
            return None  # in-process bf16 sampling with a sequence mode; use_vllm refuses this in the config
        return {"mode_name": args.vllm_importance_sampling_mode, "clip_min": args.vllm_importance_sampling_clip_min,
                "clip_max": args.vllm_importance_sampling_clip_max}

    def compute_loss(self, model, inputs: RolloutSequences, return_outputs: bool = False, num_items_in_batch=None):
        if return_outputs:
            raise ConfigError("GRPOTrainer.compute_loss returns no model outputs", field="return_outputs",
                              fix="call it with return_outputs=False")
        args = self.args
        logps, entropy = self.policy_logps(model, inputs, entropy_grad=self.entropy_bonus.enabled)
        mask = inputs.loss_mask
        # on-policy (the batch is used before any optimizer step) the old policy is the current one
        old_logps = inputs.old_logps if inputs.old_logps is not None else logps.detach()
        policy_weights, entropy_mask, term_metrics = policy_token_weights(args, inputs.advantages, logps, old_logps,
                                                                          entropy, mask)
        kl_options = dict(ref_logps=inputs.ref_logps, kl_coef=args.beta, kl_estimator="k3",
                          use_bias_correction_kl=args.use_bias_correction_kl,
                          importance_sampling_level=args.importance_sampling_level, policy_weights=policy_weights,
                          sampling_weights=inputs.sampling_weights)  # pi_old / pi_sampler (TIS / MIS), or None
        loss_type = POLICY_LOSS_AGGREGATIONS.canonical(args.loss_type)
        if args.loss_type == "cispo":
            per_token_loss, metrics = cispo_policy_loss(logps, old_logps, inputs.advantages, mask,
                                                        epsilon_high=args.epsilon_high, **kl_options)
        elif args.loss_type == "sapo":
            per_token_loss, metrics = sapo_policy_loss(
                logps, old_logps, inputs.advantages, mask, temperature_pos=args.sapo_temperature_pos,
                temperature_neg=args.sapo_temperature_neg, **kl_options,
            )
        elif args.loss_type == "vespo":
            per_token_loss, metrics = vespo_policy_loss(
                logps, old_logps, inputs.advantages, mask, k_pos=args.vespo_k_pos, lambda_pos=args.vespo_lambda_pos,
                k_neg=args.vespo_k_neg, lambda_neg=args.vespo_lambda_neg, **kl_options,
            )
        else:
            per_token_loss, metrics = clipped_policy_loss(
                logps, old_logps, inputs.advantages, mask, epsilon_low=args.epsilon, epsilon_high=args.epsilon_high,
                delta=args.delta, **kl_options,
            )
        loss = aggregate_token_loss(per_token_loss, mask, loss_type, max_completion_length=args.max_completion_length,
                                    num_items_in_batch=inputs.num_items_in_batch)
        if loss_type == "dapo":
            if self.model.training:  # normalised by the window's tokens on all processes: undo DDP's averaging
                loss = loss * self.accelerator.num_processes
        else:
            loss = loss / self.loss_normaliser_for_accumulation()
        if self.entropy_bonus.enabled:
            bonus_mask = mask if entropy_mask is None else mask * entropy_mask
            training = self.model.training
            term, bonus_metrics = self.entropy_bonus.loss_term(
                entropy, bonus_mask, training=training, accumulation_steps=self.current_gradient_accumulation_steps,
                num_processes=self.accelerator.num_processes, end_of_step=self.accelerator.sync_gradients,
            )
            loss = loss + term
            term_metrics.update(bonus_metrics)
        self.record_metrics({**metrics, **term_metrics, "entropy": self.masked_mean(entropy, mask)})
        return loss
