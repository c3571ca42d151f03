"""``PPOConfig``: the fields of :class:`~posttrain.trainers.ppo.PPOTrainer` on top of ``TrainingArguments``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from posttrain.errors import ConfigError
from posttrain.trainers.config import PosttrainConfig, note_alias_once


@dataclass
class PPOConfig(PosttrainConfig):
    """Configuration of :class:`PPOTrainer`: ``TrainingArguments`` plus the fields below.

    ``per_device_train_batch_size`` is the number of prompts sampled per update (the rollout
    batch); it is split into ``num_mini_batches`` mini-batches, each further split into
    ``gradient_accumulation_steps`` micro-batches for the backward pass.
    """

    _aliases: ClassVar[dict[str, str]] = {**PosttrainConfig._aliases, "max_new_tokens": "response_length"}

    learning_rate: float = field(default=3e-6, metadata={"help": "Peak learning rate of AdamW."})
    sft_model_path: str | None = field(
        default=None, metadata={"help": "The policy to start from when no model is given (the SFT model)."}
    )
    reward_model_path: str | None = field(
        default=None, metadata={"help": "Reward model directory (a sequence classifier with one label)."}
    )
    value_model_path: str | None = field(
        default=None, metadata={"help": "Where the value model starts from (default: the reward model)."}
    )
    total_episodes: int | None = field(
        default=None,
        metadata={"help": "Completions to sample over the run (default: num_train_epochs x dataset rows)."},
    )
    response_length: int = field(default=64, metadata={"help": "Most tokens per sampled completion."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Older name of response_length."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Keep only the last N prompt tokens (None: whole prompts)."}
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (also applied to log-probs)."})
    stop_token: str | None = field(
        default="eos",
        metadata={"help": "'eos': a completion ends at the EOS token; None: always sample response_length tokens."},
    )
    stop_token_id: int | None = field(
        default=None, metadata={"help": "A token id that ends completions (instead of EOS)."}
    )
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of a completion that did not end with EOS."}
    )
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each batch of rollouts."})
    num_mini_batches: int = field(default=1, metadata={"help": "Mini-batches (optimizer steps) per pass."})
    kl_coef: float = field(default=0.05, metadata={"help": "Weight of the per-token KL penalty in the reward."})
    kl_estimator: str = field(
        default="k1", metadata={"help": "KL estimator of the penalty: 'k1' (log-ratio) or 'k3' (non-negative)."}
    )
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value update."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of GAE."})
    lam: float = field(default=0.95, metadata={"help": "Lambda of GAE (bias-variance trade-off)."})
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Scale per-token rewards to unit variance before GAE."}
    )
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Rows per gradient-free forward pass when scoring rollouts (bounds memory)."}
    )
    num_sample_generations: int = field(
        default=10, metadata={"help": "Times over the run to write sample completions to completions.jsonl (0: never)."}
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Turn dropout off in policy and value model (stable PPO ratios)."}
    )

    rollout_max_batch_tokens: int | None = field(
        default=None,
        metadata={"help": "Most KV-cache positions the sampler holds at once, rows x (prompt + response_length): "
                  "a larger batch is sampled in slices, with the same completions (None: all at once)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = {"response_length": self.response_length, "num_ppo_epochs": self.num_ppo_epochs,
                    "num_mini_batches": self.num_mini_batches,
                    "local_rollout_forward_batch_size": self.local_rollout_forward_batch_size}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}", field=name, fix=f"set --{name} 1 or more")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 for PPO, got {self.temperature}", field="temperature",
                              fix="sample with e.g. --temperature 0.7 (PPO needs stochastic rollouts)")
        if self.stop_token not in ("eos", None):
            raise ConfigError(f"stop_token must be 'eos' or None, got {self.stop_token!r}", field="stop_token",
                              fix="use --stop_token eos, or --stop_token_id N for another token")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"unknown kl_estimator {self.kl_estimator!r}", field="kl_estimator", fix="use 'k1' or 'k3'")
        batch = self.per_device_train_batch_size
        if batch % self.num_mini_batches:
            raise ConfigError(
                f"per_device_train_batch_size ({batch}) must be divisible by num_mini_batches ({self.num_mini_batches})",
                field="num_mini_batches", fix="choose num_mini_batches among the divisors of the batch size",
            )
        mini = batch // self.num_mini_batches
        if mini % self.gradient_accumulation_steps:
            raise ConfigError(
                f"each mini-batch ({mini} prompts) must split into gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}) equal micro-batches",
                field="gradient_accumulation_steps",
                fix="make per_device_train_batch_size / num_mini_batches divisible by gradient_accumulation_steps",
            )


def older_name(value, older, old_name: str, new_name: str):
    """``older`` (a value passed under PPOTrainer's older argument name) where given, else ``value``; both is an error."""
    if older is None:
        return value
    if value is not None:
        raise ConfigError(f"both {new_name} and {old_name} were given", field=old_name,
                          fix=f"pass only {new_name} ({old_name} is its older name)")
    note_alias_once(old_name, new_name, "PPOTrainer")
    return older


def resolve_ppo_args(args, config, model) -> PPOConfig:
    """The PPOConfig of ``args`` (or of the older ``config=``), resolved as every trainer resolves its config."""
    from posttrain.trainers.base import resolve_args

    args = older_name(args, config, "config", "args")
    return resolve_args(args, model if model is not None else "policy", PPOConfig, "PPO")
