"""Online DPO: ``OnlineDPOConfig`` and ``OnlineDPOTrainer``.

Guo et al., "Direct Language Model Alignment from Online AI Feedback", arXiv:2402.04792. At every
step the policy samples two completions per prompt; a reward model (or several reward functions)
or a pairwise judge says which is better; the DPO loss (sigmoid or IPO) is taken on that fresh
pair against the frozen reference. The data is always on-policy, so there is no offline
preference dataset to collect, only prompts (:func:`posttrain.data.prompts.prepare_prompt_dataset`).
Each pair travels as :class:`~posttrain.rollout.sequences.RolloutSequences`, the layout every online
method shares.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from posttrain.data.prompts import prepare_prompt_dataset
from posttrain.errors import ConfigError, RewardFunctionError
from posttrain.models.lm_head import token_logps
from posttrain.models.wrappers import unwrap_model_keep_peft
from posttrain.rollout.sequences import RolloutSequences
from posttrain.trainers.base import PosttrainTrainer, apply_peft, load_pretrained, resolve_args, resolve_processing_class
from posttrain.trainers.config import PosttrainConfig, note_alias_once
from posttrain.trainers.online_checkpoint import ResumableOnlineLoop
from posttrain.trainers.reference import disable_dropout, reference_description, resolve_reference

logger = logging.getLogger("posttrain")

ONLINE_DPO_LOSS_TYPES = ("sigmoid", "ipo")


# ----------------------------------------------------------------------------- online DPO


@dataclass
class OnlineDPOConfig(PosttrainConfig):
    """Configuration of :class:`OnlineDPOTrainer`: ``TrainingArguments`` plus the fields below.

    ``per_device_train_batch_size`` counts prompts; each step samples two completions per prompt.
    """

    _aliases: ClassVar[dict[str, str]] = {**PosttrainConfig._aliases, "max_new_tokens": "max_completion_length"}

    learning_rate: float = field(default=5e-7, metadata={"help": "Peak learning rate of AdamW."})
    reward_model_path: str | None = field(
        default=None, metadata={"help": "Reward model directory that ranks the two completions."}
    )
    beta: list[float] = field(
        default_factory=lambda: [0.1],
        metadata={"help": "KL strength (IPO's tau); a list gives one value per epoch, the last one kept."},
    )
    loss_type: str = field(default="sigmoid", metadata={"help": "DPO loss on each fresh pair: 'sigmoid' or 'ipo'."})
    max_completion_length: int = field(default=64, metadata={"help": "Most tokens per sampled completion."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Older name of max_completion_length."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Keep only the last N prompt tokens (None: whole prompts)."}
    )
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Keep the k most likely tokens (0: off)."})
    min_p: float = field(default=0.0, metadata={"help": "Drop tokens below min_p x the top probability (0: off)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Penalty on repeated tokens (1.0: off)."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of a completion that did not end with EOS."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of the reward functions (default: 1 each)."}
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off in the policy."})
    share_prompt_forward: bool = field(
        default=True,
        metadata={"help": "In the training forward, run a prompt shared by several completions once and attend to "
                  "its KV cache (Llama, Qwen2, Qwen3; same values and gradients)."},
    )
    rollout_max_batch_tokens: int | None = field(
        default=None,
        metadata={"help": "Most KV-cache positions the sampler holds at once, rows x (prompt + max_completion_length): "
                  "a larger batch is sampled in slices, with the same completions (None: all at once)."},
    )
    use_vllm: bool = field(default=False, metadata={"help": "Sample with vLLM (needs vllm and a CUDA GPU)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_vllm and self.rollout_max_batch_tokens is not None:
            raise ConfigError("rollout_max_batch_tokens slices the built-in sampler; vLLM pages its own KV cache",
                              field="rollout_max_batch_tokens", fix="leave it unset with use_vllm")
        if isinstance(self.beta, (int, float)):
            self.beta = [float(self.beta)]
        if not self.beta or any(b <= 0 for b in self.beta):
            raise ConfigError(f"beta must be positive, got {self.beta}", field="beta", fix="use e.g. --beta 0.1")
        if len(self.beta) == 1:
            self.beta = self.beta[0]
        if self.loss_type not in ONLINE_DPO_LOSS_TYPES:
            raise ConfigError(f"unknown loss_type {self.loss_type!r} for online DPO", field="loss_type",
                              fix=f"use one of {', '.join(ONLINE_DPO_LOSS_TYPES)}")
        if not isinstance(self.max_completion_length, int) or self.max_completion_length < 1:
            raise ConfigError(f"max_completion_length must be a positive integer, got {self.max_completion_length!r}",
                              field="max_completion_length", fix="e.g. --max_completion_length 64")


class OnlineDPOTrainer(ResumableOnlineLoop, PosttrainTrainer):
    """DPO on pairs sampled from the policy as it trains, ranked by a reward model or a judge.

    Args:
        model: the policy (a model or a path).
        ref_model: the frozen reference (default: a frozen copy, or the base model with the adapter
            off under PEFT).
        reward_funcs: a reward model (instance or path), a reward function
            ``f(prompts, completions, **kwargs) -> list[float]``, or a list of them (summed with
            ``args.reward_weights``). ``reward_model=`` is accepted as an older name.
        judge: instead of rewards, a callable ``judge(prompts, [[completion_a, completion_b], ...])``
            returning, per prompt, the index (0 or 1) of the better completion; an object with a
            ``.judge`` method of that signature works too.
        args: an :class:`OnlineDPOConfig`.
        train_dataset / eval_dataset: prompts (any dataset with a ``prompt`` column; extra columns
            reach the reward functions).
        processing_class: the tokenizer (``tokenizer=`` accepted).
        reward_processing_classes: tokenizers of reward models that do not share the policy's.
        peft_config: train a LoRA adapter instead of all weights.
    """

    method_name: ClassVar[str] = "OnlineDPO"
    config_class: ClassVar[type] = OnlineDPOConfig
    completion_length_field: ClassVar[str | None] = "max_completion_length"

    def __init__(
        self,
        model: str | nn.Module,
        ref_model: str | nn.Module | None = None,
        reward_funcs=None,
        args: OnlineDPOConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        peft_config=None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
        *,
        judge=None,
        reward_model=None,
        reward_processing_class=None,
        tokenizer=None,
    ) -> None:
        args = resolve_args(args, model, OnlineDPOConfig, self.method_name)
        processing_class = resolve_processing_class(processing_class, tokenizer, model, type(self).__name__, args)
        self._tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self._init_metrics()
        policy = apply_peft(load_pretrained(model, args), peft_config, args)
        if args.disable_dropout:
            disable_dropout(policy)
        self.reference = resolve_reference(policy, ref_model, args, adapter_is_new=peft_config is not None)
        logger.info(reference_description(self.reference, ref_model))
        self.judge = judge
        self.reward_computer = self._reward_computer(reward_funcs, reward_model, judge, args,
                                                     reward_processing_classes, reward_processing_class)
        if train_dataset is not None:
            train_dataset = prepare_prompt_dataset(train_dataset, self._tokenizer, args.max_prompt_length,
                                                   args.dataset_num_proc, "train")
        if eval_dataset is not None:
            eval_dataset = prepare_prompt_dataset(eval_dataset, self._tokenizer, args.max_prompt_length,
                                                  args.dataset_num_proc, "eval")
        if data_collator is None:
            from posttrain.data.collate import PromptCollator

            data_collator = PromptCollator(self._tokenizer.pad_token_id)
        super().__init__(
            model=policy, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, compute_metrics=compute_metrics,
            callbacks=callbacks, optimizers=optimizers, preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self.loss_is_scaled_for_ga = False
        self.reference.prepare(self.accelerator)
        for scorer in getattr(self.reward_computer, "reward_funcs", []):
            if hasattr(scorer, "model") and isinstance(scorer.model, nn.Module):
                scorer.model.to(self.accelerator.device)
        self._micro_step: int | None = None  # training micro-steps so far: the sampling round
        self._eval_generations = 0
        self._vllm_engine = None

    def _reward_computer(self, reward_funcs, reward_model, judge, args, processing_classes, processing_class):
        funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else ([reward_funcs] if reward_funcs is not None else [])
        funcs = list(funcs)
        if reward_model is not None:
            note_alias_once("reward_model", "reward_funcs", type(self).__name__)
            funcs.append(reward_model)
        if not funcs and args.reward_model_path:
            funcs.append(args.reward_model_path)
        if judge is not None and funcs:
            raise ConfigError("both a judge and reward functions were given", field="judge",
                              fix="rank pairs with either a judge or reward models/functions, not both")
        if judge is not None:
            return None
        if not funcs:
            raise ConfigError("online DPO needs a way to rank completions", field="reward_funcs",
                              fix="pass reward_funcs=<reward model or function>, a judge=..., or --reward_model_path DIR")
        if processing_class is not None:
            note_alias_once("reward_processing_class", "reward_processing_classes", type(self).__name__)
            processing_classes = processing_class
        if not isinstance(processing_classes, (list, tuple)):
            processing_classes = [processing_classes] * len(funcs)
        if len(processing_classes) != len(funcs):
            raise ConfigError(f"{len(processing_classes)} reward_processing_classes for {len(funcs)} reward functions",
                              field="reward_processing_classes", fix="pass one tokenizer per reward function (None for plain functions)")
        processing_classes = [tok if tok is not None or not isinstance(func, nn.Module) else self._reward_tokenizer(func)
                               for func, tok in zip(funcs, processing_classes)]
        from posttrain.rewards import RewardComputer, resolve_reward_funcs

        return RewardComputer(resolve_reward_funcs(funcs, processing_classes), reward_weights=args.reward_weights)

    def _reward_tokenizer(self, reward_model: nn.Module):
        """The tokenizer saved beside a reward model instance, else the policy's (the usual shared base)."""
        from transformers import AutoTokenizer

        source = getattr(getattr(reward_model, "config", None), "_name_or_path", "")
        if source:
            try:
                return AutoTokenizer.from_pretrained(source)
            except (OSError, ValueError):
                pass
        return self._tokenizer

    @property
    def beta(self) -> float:
        """The KL strength of the current epoch (``args.beta`` may list one value per epoch)."""
        if isinstance(self.args.beta, (list, tuple)):
            epoch = int(self.state.epoch or 0)
            return float(self.args.beta[min(epoch, len(self.args.beta) - 1)])
        return float(self.args.beta)

    # -- generation and ranking

    def _generate(self, model: nn.Module, inputs: dict[str, Any]):
        from posttrain.rollout import SamplingParams, make_rollout_engine

        args = self.args
        policy = unwrap_model_keep_peft(model)
        if args.use_vllm:
            if self._vllm_engine is None:
                self._vllm_engine = make_rollout_engine("vllm", policy, self._tokenizer)
            self._vllm_engine.load_weights(policy)
            engine = self._vllm_engine
        else:
            engine = make_rollout_engine("hf", policy, self._tokenizer, max_batch_tokens=args.rollout_max_batch_tokens)
        sampling = SamplingParams(max_completion_length=args.max_completion_length, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                                  repetition_penalty=args.repetition_penalty)
        with self.sampling_precision():
            return engine.generate(inputs["prompt_input_ids"], prompt_mask=inputs["prompt_attention_mask"],
                                   num_generations=2, sampling=sampling,
                                   prompt_keys=self._prompt_keys(len(inputs["prompt_input_ids"])))

    def _prompt_keys(self, num_prompts: int) -> torch.Tensor:
        """Sampling keys of this process's prompts: (seed, micro-step, position in the global batch).

        Process ``p`` holds positions ``p * B .. p * B + B - 1`` of each global batch (accelerate deals
        consecutive batches round-robin), so a pair is drawn the same way on 1 or N processes, and a
        resumed run draws what the uninterrupted one would have.
        """
        from posttrain.rollout.sampling import sampling_keys

        process = self.accelerator.process_index
        if self.model.training:
            start = process * self.args.per_device_train_batch_size
            return sampling_keys(self.args.seed, "train", self._micro_step, positions=range(start, start + num_prompts))
        self._eval_generations += 1
        start = process * self.args.per_device_eval_batch_size
        return sampling_keys(self.args.seed, "eval", self.state.global_step, self._eval_generations,
                             positions=range(start, start + num_prompts))

    def _rank(self, inputs: dict[str, Any], generated) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``first_wins`` (B,) bool: completion 0 of each pair is the better; and the (2B,) scores if any."""
        texts = generated.decode_completions(self._tokenizer)
        num_prompts = generated.num_prompts
        prompts = inputs.get("prompt") or self._tokenizer.batch_decode(
            [ids[m.bool()].tolist() for ids, m in zip(inputs["prompt_input_ids"], inputs["prompt_attention_mask"])],
            skip_special_tokens=False,
        )
        device = generated.completion_ids.device
        if self.judge is not None:
            pairs = [[texts[2 * g], texts[2 * g + 1]] for g in range(num_prompts)]
            judge = getattr(self.judge, "judge", self.judge)
            name = getattr(judge, "__qualname__", type(self.judge).__name__)
            try:
                choices = list(judge(list(prompts), pairs))
            except Exception as error:  # noqa: BLE001 - re-raised with the judge's name
                raise RewardFunctionError(f"the judge {name} raised {type(error).__name__}: {error}") from error
            if len(choices) != num_prompts or any(c not in (0, 1) for c in choices):
                raise RewardFunctionError(
                    f"the judge {name} must return one index (0 or 1) per prompt: expected {num_prompts} "
                    f"values, got {choices!r}"
                )
            return torch.tensor([c == 0 for c in choices], device=device), None
        conversational = bool(prompts) and isinstance(prompts[0], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        columns = {k: [v for v in values for _ in range(2)] for k, values in inputs.items()
                   if k not in ("prompt", "prompt_input_ids", "prompt_attention_mask") and isinstance(values, list)}
        output = self.reward_computer([p for p in prompts for _ in range(2)], completions,
                                      generated.completion_token_lists(), columns, trainer_state=self.state)
        scores = torch.nan_to_num(output.total.to(device).float(), nan=0.0)
        if self.args.missing_eos_penalty is not None:
            scores = scores - self.args.missing_eos_penalty * generated.is_truncated.float()
        self._record_reward_function_metrics(output)
        self.record_metrics(self.mean_logged_metrics(output.logged_metrics))
        if output.extra_columns and not getattr(self, "_warned_extra_columns", False):
            self._warned_extra_columns = True
            logger.warning("online DPO keeps no completions table: the columns reward functions add with log_extra "
                           "(%s) are not written anywhere; log_metric values are logged.", ", ".join(output.extra_columns))
        return scores[0::2] >= scores[1::2], scores

    def _record_reward_function_metrics(self, output) -> None:
        names = list(getattr(output, "names", []) or [])
        per_function = getattr(output, "per_function", None)
        if per_function is None or len(names) < 2:
            return
        for column, name in enumerate(names):
            values = per_function[:, column]
            values = values[~torch.isnan(values)]
            if values.numel():
                self.record_metrics({f"rewards/{name}": values.float().mean().item()})

    # -- the loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from posttrain.losses.preference import PreferenceLogps, combined_preference_loss

        generated = self._generate(model, inputs)
        seq = RolloutSequences.from_batch(generated)
        first_wins, scores = self._rank(inputs, generated)
        num_prompts = generated.num_prompts
        pairs = torch.arange(num_prompts, device=first_wins.device) * 2
        chosen = pairs + (~first_wins).long()
        rejected = pairs + first_wins.long()

        chunk = self.args.logits_chunk_size
        prompt_width = seq.prompt_width if self.args.share_prompt_forward else None
        policy = token_logps(model, seq.input_ids, seq.target_mask, seq.attention_mask, seq.position_ids,
                             chunk_size=chunk, prompt_width=prompt_width)
        reference = self.reference.token_logps(model, seq.input_ids, seq.target_mask, seq.attention_mask,
                                                seq.position_ids, chunk_size=chunk, prompt_width=prompt_width)
        policy_sums, ref_sums = policy.sequence_sums(), reference.sequence_sums()
        lengths = policy.token_counts()
        logps = PreferenceLogps(policy_sums[chosen], policy_sums[rejected], ref_sums[chosen], ref_sums[rejected],
                                lengths[chosen], lengths[rejected])
        # on-policy IPO keeps summed log-probs: its target margin is 1 / (2 beta) per completion
        loss, metrics = combined_preference_loss(logps, [self.args.loss_type], beta=self.beta,
                                                 average_log_probs=False)
        self._record_online_metrics(metrics, policy, reference, generated, scores, chosen, rejected)
        return (loss, {"loss": loss}) if return_outputs else loss

    @torch.no_grad()
    def _record_online_metrics(self, metrics, policy, reference, generated, scores, chosen, rejected) -> None:
        from posttrain.losses.kl import kl_k1

        kl = (kl_k1(policy.logps.detach(), reference.logps) * policy.mask).sum(-1)
        values = {name: value for name, value in metrics.items() if not name.startswith("loss/")}
        values.update({
            "objective/kl": self.gather_mean(kl),
            "objective/entropy": self.gather_mean(-policy.sequence_sums().detach()),
            "objective/non_score_reward": self.gather_mean(-self.beta * kl),
            "val/contain_eos_token": self.gather_mean((~generated.is_truncated).float()),
            "completions/mean_length": self.gather_mean(generated.completion_lengths.float()),
            "beta": self.beta,
        })
        if scores is not None:
            values["objective/scores"] = self.gather_mean(scores)
            values["objective/scores_margin"] = self.gather_mean(scores[chosen] - scores[rejected])
            values["objective/rlhf_reward"] = self.gather_mean(scores - self.beta * kl)
        self.record_metrics(values)
