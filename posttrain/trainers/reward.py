"""Reward modeling: ``RewardConfig`` and ``RewardTrainer``.

A reward model is a sequence classifier with one output (``num_labels=1``): the score of a whole
prompt + completion, read at its last token, the completion's EOS, whatever the padding (the rule
PPO and the reward-model scorer read it by: :mod:`posttrain.models.reward_scoring`). It learns
from preference pairs with the Bradley-Terry loss ``-log sigma(r_chosen - r_rejected - margin)``
(an optional ``margin`` column asks for a larger gap on some pairs), plus, optionally, ``center_rewards_coefficient`` times
``mean (r_chosen + r_rejected)^2`` to keep the scores centred on zero. Chosen and rejected
sequences go through the model in one batch of 2B rows.

Pairs longer than ``max_length`` follow ``overlong_policy``: dropped (default, with a count in the
log), truncated, or reported as a data error. The saved directory is an ordinary
``AutoModelForSequenceClassification`` that ``transformers.pipeline("text-classification")`` loads.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from posttrain.data.collate import PreferenceCollator
from posttrain.data.formats import DataFormat, validate_dataset
from posttrain.data.load import describe_source
from posttrain.data.sharegpt import convert_sharegpt
from posttrain.data.tokenize import tokenize_preference, truncate_pair
from posttrain.errors import ConfigError, DataError
from posttrain.losses.reward import bradley_terry_loss, center_rewards_penalty, reward_metrics
from posttrain.models.packed_attention import use_packed_attention
from posttrain.models.reward_scoring import sequence_scores
from posttrain.trainers.base import (
    PosttrainTrainer,
    apply_peft,
    load_pretrained,
    require_train_dataset,
    resolve_args,
    resolve_processing_class,
    router_aux_loss_requested,
    unwrapped_pretrained,
)
from posttrain.trainers.config import PosttrainConfig, parse_pad_to_multiple_of
from posttrain.trainers.reference import disable_dropout, require_map_style

logger = logging.getLogger("posttrain")

OVERLONG_POLICIES = ("drop", "truncate", "error")
_TOKENIZED_RENAMES = {"prompt_ids": "prompt_input_ids", "chosen_ids": "chosen_input_ids", "rejected_ids": "rejected_input_ids"}


@dataclass
class RewardConfig(PosttrainConfig):
    """Configuration of :class:`RewardTrainer`: ``TrainingArguments`` plus the fields below."""

    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate of AdamW."})
    max_length: int | None = field(
        default=1024, metadata={"help": "Longest prompt + completion in tokens (None: no limit)."}
    )
    overlong_policy: str = field(
        default="drop",
        metadata={
            "help": "Pairs whose chosen or rejected sequence exceeds max_length: 'drop' them (the count is logged), "
            "'truncate' them (completions' ends first, then the prompt's start), or 'error'."
        },
    )
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={"help": "Weight of mean (r_chosen + r_rejected)^2, pulling rewards toward zero mean (e.g. 0.01)."},
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off in the model."})
    pad_to_multiple_of: int | str | None = field(
        default=None, metadata={"help": "Pad each batch's length to a multiple of this ('auto': no padding)."}
    )
    eos_token: str | None = field(
        default=None, metadata={"help": "Token that ends each completion (default: the tokenizer's EOS)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pad_to_multiple_of = parse_pad_to_multiple_of(self.pad_to_multiple_of)
        if self.overlong_policy not in OVERLONG_POLICIES:
            raise ConfigError(f"unknown overlong_policy {self.overlong_policy!r}", field="overlong_policy",
                              fix=f"use one of {', '.join(OVERLONG_POLICIES)}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2 tokens, got {self.max_length}", field="max_length",
                              fix="pass e.g. 1024, or leave it unset")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ConfigError("center_rewards_coefficient must be >= 0", field="center_rewards_coefficient",
                              fix="use e.g. 0.01, or leave it unset")


class RewardTrainer(PosttrainTrainer):
    """Train a scalar reward model on preference pairs (Bradley-Terry).

    Args:
        model: an ``AutoModelForSequenceClassification`` with ``num_labels=1``, or a path / hub id
            (loaded with one output; a causal LM checkpoint gets a new, randomly initialised score head).
        args: a :class:`RewardConfig` (``None``: defaults, output in ``<model name>-Reward``).
        train_dataset / eval_dataset: preference data, explicit (``prompt``, ``chosen``, ``rejected``)
            or implicit prompt (``chosen``/``rejected`` are whole texts or conversations), optionally
            with a ``margin`` column; raw or already tokenized.
        processing_class: the tokenizer (``tokenizer=`` is accepted as its older name).
        peft_config: a ``peft`` config; its task type is set to ``SEQ_CLS`` so the score head trains.
    """

    method_name: ClassVar[str] = "Reward"
    config_class: ClassVar[type] = RewardConfig

    def __init__(
        self,
        model: str | nn.Module,
        args: RewardConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        peft_config=None,
        tokenizer=None,
    ) -> None:
        args = resolve_args(args, model, RewardConfig, self.method_name)
        require_train_dataset(train_dataset, type(self).__name__)
        processing_class = resolve_processing_class(processing_class, tokenizer, model, type(self).__name__, args)
        self._tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if args.eos_token is not None:
            self._tokenizer.eos_token = args.eos_token
        model = load_pretrained(model, args, auto_class=AutoModelForSequenceClassification,
                                extra_kwargs={"num_labels": 1} if isinstance(model, str) else None)
        _check_single_score(model)
        _wire_pad_token(model, self._tokenizer.pad_token_id)
        model = apply_peft(model, _sequence_classification_peft(peft_config), args)
        if args.disable_dropout:
            disable_dropout(model)
        self._init_metrics()
        self.aux_loss_enabled = router_aux_loss_requested(model, adds_router_loss=False)

        if train_dataset is not None:
            train_dataset = self._prepare_dataset(train_dataset, args, "train dataset")
        if eval_dataset is not None:
            if isinstance(eval_dataset, dict):
                eval_dataset = {k: self._prepare_dataset(v, args, f"eval dataset '{k}'") for k, v in eval_dataset.items()}
            else:
                eval_dataset = self._prepare_dataset(eval_dataset, args, "eval dataset")
        if data_collator is None:
            data_collator = PreferenceCollator(self._tokenizer.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self.loss_is_scaled_for_ga = True
        use_packed_attention(self.model)  # pairs 2,048 columns wide or more are scored padding-free

    # -- data

    def prepare_eval_dataset(self, dataset, name: str):
        return self._prepare_dataset(dataset, self.args, name)

    def _prepare_dataset(self, dataset, args: RewardConfig, name: str):
        require_map_style(dataset, name)
        columns = getattr(dataset, "column_names", None) or []
        renames = {old: new for old, new in _TOKENIZED_RENAMES.items() if old in columns and new not in columns}
        if renames:
            dataset = dataset.rename_columns(renames)
            columns = dataset.column_names
        source = describe_source(dataset, fallback=name)
        if not ("chosen_input_ids" in columns and "rejected_input_ids" in columns):
            dataset = convert_sharegpt(dataset)
            validate_dataset(dataset, (DataFormat.PREFERENCE,), source=source)
            truncating = args.overlong_policy == "truncate"
            dataset = tokenize_preference(
                dataset, self._tokenizer, max_length=args.max_length if truncating else None,
                num_proc=args.dataset_num_proc, source=source,
            )
        elif "prompt_input_ids" not in columns:  # tokenized whole sequences: an empty shared prompt
            dataset = dataset.map(lambda row: {"prompt_input_ids": []})
        return self._apply_length_policy(dataset, args, source)

    def _apply_length_policy(self, dataset, args: RewardConfig, source: str):
        if args.max_length is None:
            return dataset
        limit = args.max_length

        def lengths(batch: dict[str, list]) -> list[int]:
            return [len(p) + max(len(c), len(r)) for p, c, r in
                    zip(batch["prompt_input_ids"], batch["chosen_input_ids"], batch["rejected_input_ids"])]

        columns = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]
        if args.overlong_policy == "truncate":  # rows tokenized here are already cut; pre-tokenized ones are cut now
            return dataset.map(lambda batch: _truncated(batch, limit), batched=True, num_proc=args.dataset_num_proc)
        if args.overlong_policy == "error":
            for start, batch in _batches(dataset, columns):
                for offset, length in enumerate(lengths(batch)):
                    if length > limit:
                        raise DataError(
                            f"a sequence of this pair is {length} tokens long, over max_length={limit}",
                            source=source, row=start + offset, expected=f"at most {limit} tokens", found=str(length),
                            fix="raise --max_length, shorten the row, or set --overlong_policy drop / truncate",
                        )
            return dataset
        before = len(dataset)
        dataset = dataset.filter(lambda batch: [n <= limit for n in lengths(batch)], batched=True,
                                 num_proc=args.dataset_num_proc, desc="Dropping pairs over max_length")
        dropped = before - len(dataset)
        if dropped:
            logger.warning("%s: dropped %d of %d pairs longer than max_length=%d tokens (overlong_policy='drop').",
                           source, dropped, before, limit)
        if before and not len(dataset):
            raise DataError(f"every pair is longer than max_length={limit} tokens, so none is left to train on",
                            source=source, fix="raise --max_length or set --overlong_policy truncate")
        return dataset

    # -- loss

    def count_loss_items(self, batch: dict[str, Any]) -> torch.Tensor:
        return torch.tensor(batch["input_ids"].shape[0] // 2)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pairs = inputs["input_ids"].shape[0] // 2
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(inputs["input_ids"])
        rewards = sequence_scores(model, inputs["input_ids"], attention_mask)
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        total = bradley_terry_loss(chosen, rejected, inputs.get("margin")).sum()
        if self.args.center_rewards_coefficient:
            # the penalty is a mean over pairs; as a sum it is normalised like the main loss
            total = total + self.args.center_rewards_coefficient * center_rewards_penalty(chosen, rejected) * pairs
        normaliser = num_items_in_batch if num_items_in_batch is not None else pairs
        loss = self.scale_for_devices(total / normaliser, num_items_in_batch)

        all_chosen, all_rejected = self.accelerator.gather_for_metrics((chosen.detach(), rejected.detach()))
        self.record_metrics(reward_metrics(all_chosen, all_rejected))
        if self.model.training and inputs.get("attention_mask") is not None:
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum().reshape(1)).sum()
            self._cumulative["num_tokens"] += float(tokens.item())
        return (loss, {"loss": loss, "rewards_chosen": chosen, "rewards_rejected": rejected}) if return_outputs else loss

    def evaluation_step(self, model, inputs: dict[str, Any]):
        """Predictions (B, 2): each pair's rewards ``[chosen, rejected]``; labels (B,): zeros, the column
        of the preferred completion, so that ``argmax(predictions, -1) == labels`` is the pair accuracy."""
        loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        predictions = torch.stack([outputs["rewards_chosen"], outputs["rewards_rejected"]], dim=-1).float()
        labels = torch.zeros(predictions.shape[0], dtype=torch.long, device=predictions.device)
        return loss, predictions, labels


def _truncated(batch: dict[str, list], limit: int) -> dict[str, list]:
    out: dict[str, list] = {"prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": []}
    for prompt, chosen, rejected in zip(batch["prompt_input_ids"], batch["chosen_input_ids"], batch["rejected_input_ids"]):
        prompt, (chosen, rejected) = truncate_pair(prompt, [chosen, rejected], max_length=limit)
        out["prompt_input_ids"].append(prompt)
        out["chosen_input_ids"].append(chosen)
        out["rejected_input_ids"].append(rejected)
    return out


def _batches(dataset, columns: list[str], size: int = 4096):
    for start in range(0, len(dataset), size):
        yield start, dataset.select_columns(columns)[start : start + size]


def _check_single_score(model: nn.Module) -> None:
    num_labels = getattr(getattr(unwrapped_pretrained(model), "config", None), "num_labels", None)
    if num_labels != 1:
        raise ConfigError(
            f"a reward model gives one score per sequence, but this model has num_labels={num_labels}",
            field="model",
            fix="load it with AutoModelForSequenceClassification.from_pretrained(path, num_labels=1), or pass the path",
        )


def _wire_pad_token(model: nn.Module, pad_token_id: int | None) -> None:
    # training reads scores by the attention mask; the saved config's pad id serves transformers' own
    # pooling (pipeline, AutoModelForSequenceClassification users), which searches for it
    config = unwrapped_pretrained(model).config
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        text_config.pad_token_id = pad_token_id


def _sequence_classification_peft(peft_config):
    """The adapter config with task type SEQ_CLS, so that PEFT trains and saves the score head too."""
    if peft_config is None:
        return None
    task_type = getattr(peft_config, "task_type", None)
    if str(getattr(task_type, "value", task_type)) != "SEQ_CLS":
        peft_config = copy.copy(peft_config)
        peft_config.task_type = "SEQ_CLS"
        logger.info("RewardTrainer: the adapter's task type is set to SEQ_CLS so that the score head is trained.")
    return peft_config
