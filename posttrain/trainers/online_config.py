"""``OnlineConfig``, the configuration GRPO and RLOO share, and how a config becomes a generation schedule."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar

from posttrain.errors import ConfigError
from posttrain.losses.policy import CISPO_DEFAULT_EPSILON_HIGH
from posttrain.trainers.agent_config import AgentFields
from posttrain.trainers.config import PosttrainConfig
from posttrain.trainers.online_options import resolve_online_options
from posttrain.trainers.vllm_options import VLLMOptions

logger = logging.getLogger("posttrain")


@dataclass
class OnlineConfig(AgentFields, VLLMOptions, PosttrainConfig):
    """Fields every group-sampling online method (GRPO, RLOO) shares, on top of ``TrainingArguments``
    (the agent ones in :class:`~posttrain.trainers.agent_config.AgentFields`, the vLLM ones in
    :class:`~posttrain.trainers.vllm_options.VLLMOptions`)."""

    _aliases: ClassVar[dict[str, str]] = {**PosttrainConfig._aliases, "max_new_tokens": "max_completion_length"}
    # the smallest group a method's advantage estimator can work with
    _min_generations: ClassVar[int] = 2

    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate of AdamW."})
    num_generations: int = field(
        default=8, metadata={"help": "Completions sampled per prompt (the group size G)."}
    )
    num_generations_eval: int | None = field(
        default=None, metadata={"help": "Completions per prompt during evaluation (default: num_generations)."}
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Keep at most this many prompt tokens, cutting from the left (None: no limit)."}
    )
    max_completion_length: int = field(default=256, metadata={"help": "Most tokens sampled per completion."})
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "TRL's weight of a Mixture-of-Experts router loss. The online methods do not add that "
                  "loss: only None or 0 is accepted (a model config asking for it gets one warning)."},
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature; log-probs in the loss use the same temperature."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling probability mass (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Sample among the k most likely tokens (0: off)."})
    min_p: float | None = field(
        default=None, metadata={"help": "Drop tokens below min_p times the top token's probability (None: off)."}
    )
    repetition_penalty: float = field(default=1.0, metadata={"help": "CTRL-style repetition penalty (1.0: off)."})
    stop_strings: list[str] | None = field(
        default=None, metadata={"help": "Stop a completion once its text contains one of these strings."}
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={"help": "Completions generated at once, over all processes (default: derived from steps_per_generation)."},
    )
    steps_per_generation: int | None = field(
        default=None,
        metadata={
            "help": "Micro-steps served by one generation (default: gradient_accumulation_steps, raised to a multiple "
            "that makes the generation batch hold whole groups)."
        },
    )
    rollout_max_batch_tokens: int | None = field(
        default=None,
        metadata={"help": "Most KV-cache positions the sampler holds at once, rows x (prompt + max_completion_length): "
                  "a larger generation batch is sampled in slices, with the same completions (None: all at once)."},
    )
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle the prompts each epoch."})
    share_prompt_forward: bool = field(
        default=True,
        metadata={"help": "In the training forward, run a prompt shared by several completions once and attend to "
                  "its KV cache (Llama, Qwen2, Qwen3; same values and gradients)."},
    )
    use_vllm: bool = field(
        default=False, metadata={"help": "Sample with vLLM: in this process (vllm_mode='colocate', CUDA GPU and vllm "
                                 "needed) or on a `posttrain vllm-serve` server (vllm_mode='server')."}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "Fraction of GPU memory vLLM may take (use_vllm only)."}
    )
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "Longest prompt + completion vLLM must hold (use_vllm only)."}
    )
    beta: float = field(default=0.0, metadata={"help": "KL coefficient against the reference model; 0 loads no reference."})
    num_iterations: int = field(
        default=1, metadata={"help": "Optimisation passes over each generated batch (mu in the GRPO paper)."}
    )
    epsilon: float = field(default=0.2, metadata={"help": "Lower clip range of the importance ratio: 1 - epsilon."})
    epsilon_high: float | None = field(
        default=None,
        metadata={"help": "Upper clip range 1 + epsilon_high (default: epsilon; DAPO uses 0.28). With loss_type=cispo "
                  "it caps the ratio itself: default 5.0 (MiniMax-M1)."},
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weight of each reward function in the total reward (default: all 1)."}
    )
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "Completions that hit max_completion_length without EOS get no loss (DAPO)."}
    )
    disable_dropout: bool = field(default=False, metadata={"help": "Set every dropout probability of the policy to 0."})
    sync_ref_model: bool = field(
        default=False, metadata={"help": "Move the reference toward the policy every ref_model_sync_steps (TR-DPO)."}
    )
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "TR-DPO mixing weight of the policy."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "Optimizer steps between reference updates."})
    log_completions: bool = field(
        default=False,
        metadata={"help": "Every logging_steps, print a table of sampled completions and append it to completions.jsonl."},
    )
    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "Rows of the completions table printed (None: all; the file gets all)."}
    )
    max_new_tokens: int | None = field(default=None, metadata={"help": "Older name of max_completion_length."})
    # TRL's generation and logging options, resolved in posttrain.trainers.online_options
    generation_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Sampling settings that override the fields of the same name (top_p, top_k, min_p, "
                  "repetition_penalty, stop_strings); any other key is refused. A dict, or JSON on the command line."},
    )
    chat_template_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Extra variables for the chat template when rendering conversational prompts "
                  "(e.g. {\"enable_thinking\": false})."},
    )
    cache_implementation: str | None = field(
        default=None, metadata={"help": "KV cache of the sampler: only 'dynamic' (what posttrain's sampler keeps)."}
    )
    pad_to_multiple_of: int | str | None = field(
        default=None,
        metadata={"help": "Pad each training micro-batch's prompt and completion lengths to multiples of this "
                  "('auto': no padding, as TRL off AWS Neuron)."},
    )
    ds3_gather_for_generation: bool = field(
        default=True,
        metadata={"help": "Sample from the whole (gathered) policy under DeepSpeed ZeRO-3; False is refused."},
    )
    log_unique_prompts: bool = field(
        default=False,
        metadata={"help": "The printed (and wandb) completions table shows one row per distinct prompt; "
                  "completions.jsonl keeps every row."},
    )
    log_multimodal: bool = field(
        default=True,
        metadata={"help": "Log images with completions. Prompts here are text only, so there is nothing to log "
                  "either way."},
    )
    use_transformers_continuous_batching: bool = field(
        default=False, metadata={"help": "Refused: posttrain samples with its own batched sampler."}
    )
    transformers_continuous_batching_config: dict | str | None = field(
        default=None, metadata={"help": "Refused with use_transformers_continuous_batching."}
    )
    use_transformers_paged: bool = field(
        default=False, metadata={"help": "Older name of use_transformers_continuous_batching (refused)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.router_aux_loss_coef:
            raise ConfigError(
                f"router_aux_loss_coef={self.router_aux_loss_coef}: GRPO and RLOO do not add a Mixture-of-Experts "
                "router loss to the policy loss", field="router_aux_loss_coef",
                fix="leave it unset (or 0); SFT and DPO add it",
            )
        resolve_online_options(self)
        self._check_values()
        self._check_vllm_options()
        if self.use_vllm and self.rollout_max_batch_tokens is not None:
            raise ConfigError("rollout_max_batch_tokens slices the built-in sampler; vLLM pages its own KV cache",
                              field="rollout_max_batch_tokens", fix="leave it unset with use_vllm (vLLM sizes its "
                              "cache from vllm_gpu_memory_utilization)")
        self.min_p = 0.0 if self.min_p is None else self.min_p
        if self.epsilon_high is None:  # CISPO caps the ratio itself (not 1 + epsilon): 0.2 would shrink every weight
            cispo = getattr(self, "loss_type", None) == "cispo"
            self.epsilon_high = CISPO_DEFAULT_EPSILON_HIGH if cispo else self.epsilon
        self.steps_per_generation, self.generation_batch_size = resolve_generation_schedule(
            per_device_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            num_generations=self.num_generations,
            world_size=self.world_size,
            steps_per_generation=self.steps_per_generation,
            generation_batch_size=self.generation_batch_size,
        )

    def _check_values(self) -> None:
        method = type(self).__name__.replace("Config", "")
        checks = [
            (self.num_generations >= self._min_generations, "num_generations",
             f"{method} compares completions within a group, so it needs num_generations >= {self._min_generations}, "
             f"got {self.num_generations}", "use e.g. --num_generations 4"),
            (self.num_generations_eval is None or self.num_generations_eval >= 1, "num_generations_eval",
             f"num_generations_eval must be >= 1, got {self.num_generations_eval}", "use e.g. 2, or leave it unset"),
            (self.max_completion_length >= 1, "max_completion_length",
             f"max_completion_length must be >= 1, got {self.max_completion_length}", "use e.g. 256"),
            (self.max_prompt_length is None or self.max_prompt_length >= 1, "max_prompt_length",
             f"max_prompt_length must be >= 1, got {self.max_prompt_length}", "use e.g. 512, or leave it unset"),
            (self.temperature > 0, "temperature",
             f"temperature must be > 0 for training (log-probs are divided by it), got {self.temperature}",
             "use 1.0, or e.g. 0.7 for less diverse samples"),
            (self.num_iterations >= 1, "num_iterations", f"num_iterations must be >= 1, got {self.num_iterations}",
             "use 1 (one pass over each generation) or more"),
            (self.epsilon > 0 and (self.epsilon_high is None or self.epsilon_high > 0), "epsilon",
             f"clip ranges must be > 0, got epsilon={self.epsilon}, epsilon_high={self.epsilon_high}", "use e.g. 0.2"),
            (self.beta >= 0, "beta", f"beta must be >= 0, got {self.beta}", "use 0 (no KL term) or e.g. 0.04"),
            (self.beta > 0 or not self.sync_ref_model, "sync_ref_model",
             "sync_ref_model moves the reference model, and beta = 0 loads none", "drop it, or set beta > 0"),
            (not self.auto_find_batch_size, "auto_find_batch_size",
             "auto_find_batch_size would shrink the batch below whole groups of num_generations completions",
             "drop --auto_find_batch_size and lower per_device_train_batch_size instead"),
        ]
        for ok, field_name, problem, fix in checks:
            if not ok:
                raise ConfigError(problem, field=field_name, fix=fix)


def resolve_generation_schedule(
    *,
    per_device_batch_size: int,
    gradient_accumulation_steps: int,
    num_generations: int,
    world_size: int = 1,
    steps_per_generation: int | None = None,
    generation_batch_size: int | None = None,
) -> tuple[int, int]:
    """``(steps_per_generation, generation_batch_size)`` for a config; ``generation_batch_size`` is global.

    Each process generates ``per_device_batch_size * steps_per_generation`` completions at once, which
    must be whole groups of ``num_generations``. Unset, ``steps_per_generation`` is the smallest
    multiple of ``gradient_accumulation_steps`` that satisfies this; a value set by the user that
    does not is a :class:`ConfigError`.
    """
    if steps_per_generation is not None and generation_batch_size is not None:
        raise ConfigError(
            "generation_batch_size and steps_per_generation were both set", field="steps_per_generation",
            fix="set one of them (generation_batch_size = per_device_train_batch_size * world size * steps_per_generation)",
        )
    global_micro_batch = per_device_batch_size * world_size
    if generation_batch_size is not None:
        if generation_batch_size < 1 or generation_batch_size % global_micro_batch:
            raise ConfigError(
                f"generation_batch_size ({generation_batch_size}) must be a positive multiple of "
                f"per_device_train_batch_size x processes ({global_micro_batch})", field="generation_batch_size",
                fix=f"use a multiple of {global_micro_batch}, or leave it unset",
            )
        steps_per_generation = generation_batch_size // global_micro_batch
        chosen = False
    elif steps_per_generation is not None:
        if steps_per_generation < 1:
            raise ConfigError(f"steps_per_generation must be >= 1, got {steps_per_generation}",
                              field="steps_per_generation", fix="leave it unset to follow gradient_accumulation_steps")
        chosen = False
    else:
        completions = per_device_batch_size * gradient_accumulation_steps
        steps_per_generation = gradient_accumulation_steps * (num_generations // math.gcd(completions, num_generations))
        chosen = True
    per_process = per_device_batch_size * steps_per_generation
    if per_process % num_generations:
        raise ConfigError(
            f"each generation would hold {per_process} completions per process (per_device_train_batch_size "
            f"{per_device_batch_size} x steps_per_generation {steps_per_generation}), not whole groups of "
            f"num_generations={num_generations}", field="num_generations",
            fix="make per_device_train_batch_size x steps_per_generation a multiple of num_generations, "
            "or leave steps_per_generation and generation_batch_size unset",
        )
    if chosen and steps_per_generation > gradient_accumulation_steps:
        logger.info(
            "one generation of %d completions (%d prompts x %d) now serves %d optimizer steps: "
            "per_device_train_batch_size x gradient_accumulation_steps = %d is not a multiple of num_generations",
            per_process, per_process // num_generations, num_generations,
            steps_per_generation // gradient_accumulation_steps, per_device_batch_size * gradient_accumulation_steps,
        )
    return steps_per_generation, per_process * world_size
