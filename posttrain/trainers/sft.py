"""Supervised fine-tuning: ``SFTConfig`` and ``SFTTrainer``.

The loss is the mean negative log-likelihood of the target tokens (completion tokens for
prompt-completion data, every token otherwise, assistant turns only when asked), normalised by
the number of target tokens in the whole accumulated batch, so that gradient accumulation gives
the same update as one large batch. It is computed from the final hidden states in chunks
(:func:`posttrain.ops.logprobs.fused_linear_nll`): full-vocabulary logits are never held.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from posttrain.data.collate import PaddingCollator, PaddingFreeCollator
from posttrain.data.formats import DataFormat, validate_dataset
from posttrain.data.load import describe_source
from posttrain.data.packing import PACKING_STRATEGIES, pack_dataset, pack_stream
from posttrain.data.sharegpt import convert_sharegpt
from posttrain.data.streaming import column_names_of, is_streaming
from posttrain.data.tokenize import TRUNCATION_MODES, tokenize_sft
from posttrain.errors import ConfigError
from posttrain.losses.sft import SFT_LOSSES, nll_token_weights
from posttrain.models.lm_head import (
    forward_hidden_states,
    output_head,
    target_positions,
    token_logps,
    uses_full_logits,
    weighted_target_nll,
)
from posttrain.models.moe import configure_router_aux_loss
from posttrain.models.packed_attention import use_packed_attention
from posttrain.ops.predictions import chunked_argmax, head_logits
from posttrain.trainers.base import (
    PosttrainTrainer,
    apply_peft,
    load_pretrained,
    require_train_dataset,
    resolve_args,
    resolve_processing_class,
    router_aux_loss_requested,
)
from posttrain.trainers.config import (
    PosttrainConfig,
    note_alias_once,
    parse_json_field,
    parse_pad_to_multiple_of,
)

SFT_FORMATS = (DataFormat.LANGUAGE_MODELING, DataFormat.PROMPT_COMPLETION, DataFormat.CONVERSATIONAL)


@dataclass
class SFTConfig(PosttrainConfig):
    """Configuration of :class:`SFTTrainer`: ``TrainingArguments`` plus the fields below."""

    _aliases: ClassVar[dict[str, str]] = {**PosttrainConfig._aliases, "max_seq_length": "max_length"}

    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate of AdamW."})
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Longest tokenized sequence; longer ones are truncated (None: no limit)."},
    )
    truncation: bool = field(
        default=True,
        metadata={"help": "Truncate rows longer than max_length; if False such rows are a data error."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack several sequences into each row of max_length tokens (best-fit decreasing)."},
    )
    packing_strategy: str = field(
        default="bfd",
        metadata={"help": "How to pack: 'bfd' (whole sequences, longer ones truncated), 'bfd_split' (longer ones "
                  "split into pieces of max_length) or 'wrapped' (concatenate and cut)."},
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Concatenate each batch into one row with per-sequence position ids: no padding tokens."},
    )
    completion_only_loss: bool | None = field(
        default=None,
        metadata={"help": "For prompt-completion data, train on completion tokens only (default: yes)."},
    )
    assistant_only_loss: bool = field(
        default=False, metadata={"help": "For conversational data, train on assistant turns only."}
    )
    dataset_text_field: str = field(
        default="text", metadata={"help": "Column holding raw text for language-modeling datasets."}
    )
    eos_token: str | None = field(
        default=None, metadata={"help": "Token appended after each completion (default: the tokenizer's EOS)."}
    )
    pad_to_multiple_of: int | str | None = field(
        default=None,
        metadata={"help": "Pad each batch's length to a multiple of this (helps some kernels); 'auto': none."},
    )
    skip_prepare_dataset: bool = field(
        default=False,
        metadata={"help": "The dataset is already tokenized (input_ids, completion_mask): use it as is."},
    )
    dataset_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Options of the dataset preparation; the one key is skip_prepare_dataset, "
                  "e.g. '{\"skip_prepare_dataset\": true}'."},
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "Which tokens of a row longer than max_length stay: keep_start (the first) or keep_end "
                  "(the last)."},
    )
    shuffle_dataset: bool = field(
        default=False,
        metadata={"help": "Shuffle the tokenized rows once (seeded by `seed`) before packing, so packs mix rows "
                  "from all over the dataset; the train sampler shuffles batches in any case."},
    )
    eval_packing: bool | None = field(
        default=None, metadata={"help": "Pack the eval dataset (default: as `packing`)."}
    )
    loss_type: str = field(
        default="nll",
        metadata={"help": "Per-token loss: 'nll' (negative log-likelihood) or 'dft' (Dynamic Fine-Tuning: NLL "
                  "weighted by the token's detached probability); 'chunked_nll' is an older name of 'nll'."},
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "Weight of a Mixture-of-Experts model's load-balancing loss, added to the loss "
                  "(default: the model config's own; 0 turns it off). An error for a dense model."},
    )
    max_seq_length: int | None = field(default=None, metadata={"help": "Older name of max_length."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pad_to_multiple_of = parse_pad_to_multiple_of(self.pad_to_multiple_of)
        self.dataset_kwargs = parse_json_field(self.dataset_kwargs, "dataset_kwargs")
        if self.dataset_kwargs:
            unknown = sorted(set(self.dataset_kwargs) - {"skip_prepare_dataset"})
            if unknown:
                raise ConfigError(f"unknown dataset_kwargs key(s) {unknown}", field="dataset_kwargs",
                                  fix="the one key is skip_prepare_dataset (for an already tokenized dataset)")
            self.skip_prepare_dataset = bool(self.dataset_kwargs.get("skip_prepare_dataset", self.skip_prepare_dataset))
        if self.loss_type == "chunked_nll":
            note_alias_once("loss_type='chunked_nll'", "loss_type='nll'", type(self).__name__)
        self.loss_type = SFT_LOSSES.canonical(self.loss_type)
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ConfigError(f"unknown truncation_mode {self.truncation_mode!r}", field="truncation_mode",
                              fix="use 'keep_start' (the first max_length tokens) or 'keep_end' (the last)")
        if self.packing and self.max_length is None:
            raise ConfigError("packing needs a max_length", field="packing", fix="set --max_length, e.g. 1024")
        if self.eval_packing and self.max_length is None:
            raise ConfigError("eval_packing needs a max_length", field="eval_packing", fix="set --max_length, e.g. 1024")
        if self.padding_free and not self.packing and self.max_length is not None:
            # as in TRL: a padding-free batch is one row of all its sequences, so max_length would not bound it
            raise ConfigError(
                "padding_free without packing does not bound a batch's length by max_length",
                field="padding_free",
                fix="also pass packing=True (rows of max_length tokens), or max_length=None with data that is "
                "already short enough",
            )
        if self.packing_strategy == "bfd-requeue":  # TRL's older name
            note_alias_once("packing_strategy='bfd-requeue'", "packing_strategy='bfd_split'", type(self).__name__)
            self.packing_strategy = "bfd_split"
        if self.packing_strategy not in PACKING_STRATEGIES:
            raise ConfigError(
                f"unknown packing_strategy {self.packing_strategy!r}", field="packing_strategy",
                fix="use 'bfd', 'bfd_split' or 'wrapped'",
            )


class SFTTrainer(PosttrainTrainer):
    """Supervised fine-tuning of a causal LM.

    Args:
        model: a model instance, or a local path / hub id loaded with ``AutoModelForCausalLM``.
        args: an :class:`SFTConfig` (``None``: defaults, output in ``<model name>-SFT``).
        train_dataset / eval_dataset: any format of :mod:`posttrain.data` that SFT accepts
            (text, prompt-completion, messages), raw or already tokenized.
        processing_class: the tokenizer (``tokenizer=`` is accepted as its older name).
        peft_config: a ``peft`` config (e.g. ``LoraConfig``) to train an adapter instead of all weights.
    """

    method_name: ClassVar[str] = "SFT"
    config_class: ClassVar[type] = SFTConfig

    def __init__(
        self,
        model: str | nn.Module,
        args: SFTConfig | None = None,
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
        formatting_func: Callable | None = None,
        tokenizer=None,
    ) -> None:
        args = resolve_args(args, model, SFTConfig, self.method_name)
        require_train_dataset(train_dataset, type(self).__name__)
        processing_class = resolve_processing_class(processing_class, tokenizer, model, type(self).__name__, args)
        model = apply_peft(load_pretrained(model, args), peft_config, args)
        configure_router_aux_loss(model, args.router_aux_loss_coef)
        self._init_metrics()
        self.aux_loss_enabled = router_aux_loss_requested(model, adds_router_loss=True)
        self._formatting_func = formatting_func
        self._tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if args.eos_token is not None:
            self._tokenizer.eos_token = args.eos_token

        if train_dataset is not None:
            if is_streaming(train_dataset) and args.max_steps <= 0:
                raise ConfigError(
                    "a streaming (iterable) train dataset has no length, so the number of steps cannot be derived "
                    "from num_train_epochs", field="max_steps", fix="pass max_steps=N (optimizer steps to train)",
                )
            if is_streaming(train_dataset) and args.accelerator_config.dispatch_batches is not False:
                # every process reads the stream and keeps its share: batches of different lengths are
                # not concatenated by a dispatching main process
                args.accelerator_config.dispatch_batches = False
            train_dataset = self._prepare_dataset(train_dataset, args, formatting_func, "train")
        if eval_dataset is not None:
            if isinstance(eval_dataset, dict):
                eval_dataset = {k: self._prepare_dataset(v, args, formatting_func, k) for k, v in eval_dataset.items()}
            else:
                eval_dataset = self._prepare_dataset(eval_dataset, args, formatting_func, "eval")

        if data_collator is None:
            if args.padding_free or args.packing or args.eval_packing:
                data_collator = PaddingFreeCollator()
            else:
                data_collator = PaddingCollator(self._tokenizer.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of)

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
        # packed rows, and padded batches 2,048 columns wide or more, attend per sequence without a (T x T) mask
        use_packed_attention(self.model)

    # -- data

    def prepare_eval_dataset(self, dataset, name: str):
        return self._prepare_dataset(dataset, self.args, self._formatting_func, name)

    def _prepare_dataset(self, dataset, args: SFTConfig, formatting_func, split: str):
        packing = args.packing if split == "train" or args.eval_packing is None else args.eval_packing
        columns = column_names_of(dataset)
        if args.skip_prepare_dataset or "input_ids" in columns:
            if "completion_mask" not in columns:
                dataset = dataset.map(lambda row: {"completion_mask": [1] * len(row["input_ids"])})
            return self._shuffle_and_pack(dataset, args, packing)
        source = describe_source(dataset, fallback=f"{split} dataset")
        if formatting_func is not None:
            dataset = dataset.map(
                lambda row: {args.dataset_text_field: formatting_func(row)}, remove_columns=columns
            )
        dataset = convert_sharegpt(dataset)
        validate_dataset(dataset, SFT_FORMATS, text_field=args.dataset_text_field, source=source)
        # packing cuts long rows itself ('bfd': their start; 'bfd_split' and 'wrapped' keep every token)
        truncated_here = args.truncation and not packing
        dataset = tokenize_sft(
            dataset,
            self._tokenizer,
            max_length=args.max_length if truncated_here or not args.truncation else None,
            truncation=truncated_here and args.max_length is not None,
            truncation_mode=args.truncation_mode,
            completion_only_loss=args.completion_only_loss,
            assistant_only_loss=args.assistant_only_loss,
            text_field=args.dataset_text_field,
            num_proc=args.dataset_num_proc,
            source=source,
        )
        return self._shuffle_and_pack(dataset, args, packing)

    @staticmethod
    def _shuffle_and_pack(dataset, args: SFTConfig, packing: bool):
        streaming = is_streaming(dataset)
        if args.shuffle_dataset:  # a stream is shuffled within a buffer of rows as it is read
            dataset = dataset.shuffle(seed=args.seed)
        if not packing:
            return dataset
        pack = pack_stream if streaming else pack_dataset
        return pack(dataset, args.max_length, strategy=args.packing_strategy)

    # -- loss

    def count_loss_items(self, batch: dict[str, Any]) -> torch.Tensor:
        return target_positions(batch["completion_mask"], batch.get("position_ids")).sum()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids = inputs["input_ids"]
        position_ids = inputs.get("position_ids")
        targets_mask = target_positions(inputs["completion_mask"], position_ids)
        num_targets = targets_mask.sum()
        normaliser = num_items_in_batch if num_items_in_batch is not None else num_targets
        token_weights = nll_token_weights(int(num_targets), normaliser, device=input_ids.device)
        if self.args.loss_type == "nll":
            loss, argmax_match = weighted_target_nll(
                model, input_ids, targets_mask, token_weights, inputs.get("attention_mask"), position_ids,
                chunk_size=self.args.logits_chunk_size,
            )
        else:  # a loss of the per-token log-probs (dft)
            values = token_logps(model, input_ids, inputs["completion_mask"], inputs.get("attention_mask"), position_ids,
                                 chunk_size=self.args.logits_chunk_size)
            loss = SFT_LOSSES.get(self.args.loss_type)(values.logps[values.mask], token_weights)
            loss = loss + values.router_loss * token_weights.sum()  # this micro-batch's share, as in the NLL path
            argmax_match = values.argmax_match[values.mask]
        loss = self.scale_for_devices(loss, num_items_in_batch)

        self._record_sft_metrics(inputs, argmax_match, num_targets)
        return (loss, {"loss": loss}) if return_outputs else loss

    def evaluation_step(self, model, inputs: dict[str, Any]):
        """Loss, predictions and labels for ``compute_metrics``, aligned as a causal LM's logits and labels.

        Labels (B, L): ``input_ids`` with -100 wherever the token is not a loss target. Predictions:
        without ``preprocess_logits_for_metrics``, the argmax token ids (B, L), where position t holds
        the prediction of token t+1, computed at loss positions only (-100 elsewhere) and never from the
        full logits; with it, the logits (B, L, V) of this one batch, which the evaluation loop hands to it.
        """
        loss = self.compute_loss(model, inputs)
        input_ids, attention_mask, position_ids = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("position_ids")
        targets_mask = target_positions(inputs["completion_mask"], position_ids)
        labels = torch.full_like(input_ids, -100)
        labels[:, 1:] = torch.where(targets_mask, input_ids[:, 1:], -100)
        head = None if uses_full_logits(model) else output_head(model)
        if head is None:  # the model's own logits: a head the chunked path does not reproduce, or a wrapped one
            logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False).logits.float()
            logits = logits[:, logits.shape[1] - input_ids.shape[1]:]  # prompt-learning virtual tokens
            if self.preprocess_logits_for_metrics is not None:
                return loss, logits, labels
            argmax = logits[:, :-1][targets_mask].argmax(-1)
        else:
            hidden = forward_hidden_states(model, input_ids, attention_mask, position_ids)
            if self.preprocess_logits_for_metrics is not None:
                return loss, head_logits(hidden, head.weight, head.bias, head.transform), labels
            argmax = chunked_argmax(hidden[:, :-1][targets_mask], head.weight, head.bias, head.transform,
                                    self.args.logits_chunk_size)
        predictions = torch.full_like(inputs["input_ids"], -100)
        predictions[:, :-1] = predictions[:, :-1].masked_scatter(targets_mask, argmax)
        return loss, predictions, labels

    def _record_sft_metrics(self, inputs, argmax_match, num_targets) -> None:
        with torch.no_grad():
            correct = argmax_match.sum().float()
            totals = self.accelerator.gather_for_metrics(torch.stack([correct, num_targets.float()]).reshape(1, 2))
            totals = totals.reshape(-1, 2).sum(0)
            accuracy = (totals[0] / totals[1].clamp_min(1)).item()
            self.record_metrics({"mean_token_accuracy": accuracy})
            if self.model.training:
                mask = inputs.get("attention_mask")
                tokens = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
                tokens = self.accelerator.gather_for_metrics(tokens.reshape(1).to(argmax_match.device)).sum()
                self._cumulative["num_tokens"] += float(tokens.item())
