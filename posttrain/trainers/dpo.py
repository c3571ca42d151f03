"""Direct preference optimisation and its variants: ``DPOConfig`` and ``DPOTrainer``.

Each step runs the policy once over the concatenated batch ``[prompt+chosen; prompt+rejected]``
(2B rows), sums the completion tokens' log-probs per row (computed from hidden states in chunks:
no full-vocabulary logits), gets the same sums from the reference policy (a frozen model, the base
model under a disabled adapter, or columns precomputed before training, see
:mod:`posttrain.trainers.reference`), and hands both to
:func:`posttrain.losses.preference.combined_preference_loss`, which mixes any of the registered
loss types (``sigmoid``, ``ipo``, ``hinge``, ``robust``, ``bco_pair``, ``sppo_hard``,
``nca_pair``, ``exo_pair``, ``discopop``, ``apo_zero``, ``apo_down``, ``aot``, ``aot_unpaired``,
``sft``, ...) and adds RPO's NLL term.

The loss of a micro-batch is its per-pair loss summed and divided by the number of pairs in the
whole accumulated batch, so gradient accumulation gives the update of one large batch.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from posttrain.data.collate import PreferenceCollator
from posttrain.data.formats import DataFormat, validate_dataset
from posttrain.data.load import describe_source
from posttrain.data.sharegpt import convert_sharegpt
from posttrain.data.tokenize import TRUNCATION_MODES, drop_empty_completions, tokenize_preference
from posttrain.errors import ConfigError
from posttrain.losses.preference import (
    PreferenceLogps,
    RunningMean,
    combined_preference_loss,
    validate_preference_config,
)
from posttrain.losses.token_weighting import length_desensitized_logps, log_sum_squared_probs, wpo_weights
from posttrain.models.lm_head import (
    TokenLogps,
    target_logits_chunks,
    target_positions,
    token_logps,
)
from posttrain.models.moe import configure_router_aux_loss
from posttrain.models.packed_attention import use_packed_attention
from posttrain.ops.distributed import all_reduce_sum
from posttrain.trainers.base import (
    PosttrainTrainer,
    apply_peft,
    load_pretrained,
    require_train_dataset,
    resolve_args,
    resolve_processing_class,
    router_aux_loss_requested,
)
from posttrain.trainers.config import PosttrainConfig, parse_pad_to_multiple_of
from posttrain.trainers.dpo_sequences import (
    PaddingFreePreferenceCollator,
    per_sequence_token_logps,
    per_sequence_values,
    rows_from_flat,
    wants_per_sequence_forward,
)
from posttrain.trainers.reference import (
    ReferenceSyncCallback,
    add_precomputed_columns,
    disable_dropout,
    load_reference_state,
    require_map_style,
    reference_description,
    resolve_reference,
    save_reference_state,
)

logger = logging.getLogger("posttrain")

# tokenized columns of older TRL releases -> ours
_TOKENIZED_RENAMES = {"prompt_ids": "prompt_input_ids", "chosen_ids": "chosen_input_ids", "rejected_ids": "rejected_input_ids"}
_TOKENIZED_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
BCO_STATE_FILE = "posttrain_bco_running_mean.json"


@dataclass
class DPOConfig(PosttrainConfig):
    """Configuration of :class:`DPOTrainer`: ``TrainingArguments`` plus the fields below."""

    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate of AdamW (DPO wants small ones)."})

    # -- the objective
    beta: float = field(
        default=0.1,
        metadata={"help": "Strength of the pull toward the reference: higher keeps the policy closer (IPO: its tau)."},
    )
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={
            "help": "Loss(es): sigmoid, ipo, hinge, robust, bco_pair, sppo_hard, nca_pair, exo_pair, discopop, "
            "apo_zero, apo_down, aot, aot_unpaired (aot_pair), sigmoid_norm, sft. Several are mixed with loss_weights."
        },
    )
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per loss_type entry (default: 1 each)."}
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "Probability that a label is flipped (cDPO, robust, aot); EXO's epsilon (0 means 1e-3)."},
    )
    rpo_alpha: float | None = field(
        default=None, metadata={"help": "RPO: add rpo_alpha x the per-token NLL of the chosen completion (e.g. 1.0)."}
    )
    discopop_tau: float = field(default=0.05, metadata={"help": "DiscoPOP temperature tau."})
    use_weighting: bool = field(
        default=False,
        metadata={"help": "WPO: weigh each pair by the policy's length-normalised probability of its completions."},
    )
    ld_alpha: float | None = field(
        default=None,
        metadata={"help": "LD-DPO: weight in [0, 1] of tokens past the shorter completion's length (None: 1)."},
    )
    f_divergence_type: str = field(
        default="reverse_kl",
        metadata={"help": "f-DPO regulariser: reverse_kl, forward_kl, js_divergence or alpha_divergence."},
    )
    f_alpha_divergence_coef: float = field(default=0.5, metadata={"help": "alpha of the alpha-divergence."})
    ipo_average_log_probs: bool = field(
        default=True, metadata={"help": "IPO on per-token averaged log-ratios (the IPO authors' convention)."}
    )

    # -- data
    max_length: int | None = field(
        default=1024, metadata={"help": "Longest prompt + completion in tokens; completions are cut first."}
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Longest prompt in tokens (cut per truncation_mode); None: no separate limit."}
    )
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Longest completion in tokens (its end is cut); None: no separate limit."}
    )
    truncation_mode: str = field(
        default="keep_end",
        metadata={"help": "How a prompt is cut: keep_end keeps its last tokens (next to the answer), keep_start its first."},
    )
    padding_free: bool = field(
        default=False, metadata={"help": "Run each batch as one row of concatenated sequences: no padding tokens."}
    )
    pad_to_multiple_of: int | str | None = field(
        default=None, metadata={"help": "Pad each batch's length to a multiple of this ('auto': no padding)."}
    )
    per_sequence_forward: bool | None = field(
        default=None,
        metadata={"help": "Run policy and reference over one sequence at a time, unpadded and with no T x T "
                  "attention mask (same values, less memory for long rows). None: on for batches of 2,048 tokens "
                  "or longer. Not with padding_free or a Mixture-of-Experts router loss."},
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "Weight of a Mixture-of-Experts policy's load-balancing loss, added to the loss "
                  "(default: the model config's own; 0 turns it off). An error for a dense model."},
    )

    # -- the reference
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Compute the reference log-probs once, before training, and keep no reference model."},
    )
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of that pass (default: the train / eval batch size)."}
    )
    sync_ref_model: bool = field(
        default=False, metadata={"help": "TR-DPO: move the reference toward the policy every ref_model_sync_steps."}
    )
    ref_model_mixup_alpha: float = field(
        default=0.6, metadata={"help": "TR-DPO alpha: ref <- alpha * policy + (1 - alpha) * ref."}
    )
    ref_model_sync_steps: int = field(default=512, metadata={"help": "TR-DPO tau: optimizer steps between syncs."})
    disable_dropout: bool = field(
        default=True, metadata={"help": "Turn dropout off in policy and reference (so both see the same function)."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [name.strip() for name in self.loss_type.split(",") if name.strip()]
        elif self.loss_type is not None and len(self.loss_type) == 1 and "," in self.loss_type[0]:
            self.loss_type = [name.strip() for name in self.loss_type[0].split(",") if name.strip()]
        if isinstance(self.loss_weights, (int, float)):
            self.loss_weights = [float(self.loss_weights)]
        super().__post_init__()
        self.pad_to_multiple_of = parse_pad_to_multiple_of(self.pad_to_multiple_of)
        self.loss_type = validate_preference_config(
            self.loss_type, self.loss_weights, beta=self.beta, f_divergence_type=self.f_divergence_type,
            weighted_pairs=self.use_weighting,
        )
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ConfigError(f"unknown truncation_mode {self.truncation_mode!r}", field="truncation_mode",
                              fix="use 'keep_end' or 'keep_start'")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ConfigError(f"ld_alpha must lie in [0, 1], got {self.ld_alpha}", field="ld_alpha", fix="e.g. 0.5")
        if self.per_sequence_forward and self.padding_free:
            raise ConfigError("per_sequence_forward and padding_free are two layouts of the same batch",
                              field="per_sequence_forward", fix="drop one of per_sequence_forward and padding_free")
        if self.sync_ref_model and self.precompute_ref_log_probs:
            raise ConfigError(
                "sync_ref_model moves the reference during training, so its log-probs cannot be precomputed",
                field="sync_ref_model", fix="drop one of sync_ref_model and precompute_ref_log_probs",
            )
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be a positive number of tokens, got {value}", field=name,
                                  fix="pass e.g. 512, or leave it unset")


class DPOTrainer(PosttrainTrainer):
    """Preference optimisation of a causal LM against a frozen reference (DPO and its variants).

    Args:
        model: a causal LM, or a local path / hub id.
        ref_model: the reference: a model, or a path / hub id loaded and frozen. ``None``: a frozen
            copy of ``model``; with a PEFT adapter, the same model with the adapter disabled (no
            copy); with ``precompute_ref_log_probs``, ``model`` itself in one pass before training.
        args: a :class:`DPOConfig` (``None``: defaults, output in ``<model name>-DPO``).
        train_dataset / eval_dataset: preference data (``prompt``/``chosen``/``rejected`` as text or
            messages, or ``chosen``/``rejected`` with an implicit shared prompt), raw or tokenized.
        processing_class: the tokenizer (``tokenizer=`` is accepted as its older name).
        peft_config: a ``peft`` config to train an adapter instead of all weights.
    """

    method_name: ClassVar[str] = "DPO"
    config_class: ClassVar[type] = DPOConfig

    def __init__(
        self,
        model: str | nn.Module,
        ref_model: str | nn.Module | None = None,
        args: DPOConfig | None = None,
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
        args = resolve_args(args, model, DPOConfig, self.method_name)
        require_train_dataset(train_dataset, type(self).__name__)
        processing_class = resolve_processing_class(processing_class, tokenizer, model, type(self).__name__, args)
        model = apply_peft(load_pretrained(model, args), peft_config, args)
        if args.disable_dropout:
            disable_dropout(model)
        self._init_metrics()
        self.aux_loss_enabled = router_aux_loss_requested(model, adds_router_loss=True)
        if args.per_sequence_forward and self.aux_loss_enabled:
            raise ConfigError("per_sequence_forward cannot give a Mixture-of-Experts router loss over the whole batch",
                              field="per_sequence_forward", fix="leave per_sequence_forward unset: such a "
                              "model keeps the batched forward")
        self._tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.reference = resolve_reference(
            model, ref_model, args, adapter_is_new=peft_config is not None, precompute=args.precompute_ref_log_probs
        )
        if args.disable_dropout and self.reference.model is not None:
            disable_dropout(self.reference.model)
        # after the reference: a frozen copy must not carry the policy's hook
        configure_router_aux_loss(model, args.router_aux_loss_coef)
        logger.info("DPO: %s", reference_description(self.reference, ref_model))
        self.bco_running_mean = RunningMean()

        if train_dataset is not None:
            train_dataset = self._prepare_dataset(train_dataset, args, "train dataset")
        if eval_dataset is not None:
            if isinstance(eval_dataset, dict):
                eval_dataset = {k: self._prepare_dataset(v, args, f"eval dataset '{k}'") for k, v in eval_dataset.items()}
            else:
                eval_dataset = self._prepare_dataset(eval_dataset, args, "eval dataset")

        if data_collator is None:
            padded = PreferenceCollator(self._tokenizer.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of)
            data_collator = PaddingFreePreferenceCollator(padded) if args.padding_free else padded

        callbacks = list(callbacks or [])
        if args.sync_ref_model:
            callbacks.append(ReferenceSyncCallback(self.reference, args.ref_model_mixup_alpha, args.ref_model_sync_steps))

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
        if args.padding_free:  # packed rows attend per sequence, without a (tokens x tokens) mask
            use_packed_attention(self.model, self.reference.model)
        self.reference.prepare(self.accelerator)
        if args.precompute_ref_log_probs:
            self._precompute_reference()

    @property
    def ref_model(self) -> nn.Module | None:
        """The frozen reference model; ``None`` when the reference is the policy's base model under a
        disabled adapter, a reference adapter, or log-probs precomputed before training (as in TRL)."""
        return self.reference.model

    # -- data

    def prepare_eval_dataset(self, dataset, name: str):
        dataset = self._prepare_dataset(dataset, self.args, name)
        if self.args.precompute_ref_log_probs and "ref_chosen_logps" not in dataset.column_names:
            dataset = self._with_reference_columns(
                dataset, self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size, "eval")
        return dataset

    def _prepare_dataset(self, dataset, args: DPOConfig, name: str):
        require_map_style(dataset, name)
        columns = getattr(dataset, "column_names", None) or []
        renames = {old: new for old, new in _TOKENIZED_RENAMES.items() if old in columns and new not in columns}
        if renames:
            dataset = dataset.rename_columns(renames)
            columns = dataset.column_names
        source = describe_source(dataset, fallback=name)
        if all(c in columns for c in _TOKENIZED_COLUMNS):
            return drop_empty_completions(dataset, source)
        dataset = convert_sharegpt(dataset)
        validate_dataset(dataset, (DataFormat.PREFERENCE,), source=source)
        dataset = tokenize_preference(
            dataset, self._tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
            max_completion_length=args.max_completion_length, truncation_mode=args.truncation_mode,
            num_proc=args.dataset_num_proc, source=source,
        )
        return drop_empty_completions(dataset, source)

    # -- the reference

    def _precompute_reference(self) -> None:
        """Add ``ref_chosen_logps`` / ``ref_rejected_logps`` columns to the datasets, then drop the reference."""
        batch_size = self.args.precompute_ref_batch_size
        if self.train_dataset is not None:
            self.train_dataset = self._with_reference_columns(
                self.train_dataset, batch_size or self.args.per_device_train_batch_size, "train")
        if self.eval_dataset is not None:
            eval_size = batch_size or self.args.per_device_eval_batch_size
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._with_reference_columns(v, eval_size, k) for k, v in self.eval_dataset.items()}
            else:
                self.eval_dataset = self._with_reference_columns(self.eval_dataset, eval_size, "eval")
        self.reference.release()

    def _with_reference_columns(self, dataset, batch_size: int, name: str):
        if "ref_chosen_logps" in dataset.column_names and "ref_rejected_logps" in dataset.column_names:
            return dataset
        was_training = self.model.training
        self.model.eval()
        try:
            return add_precomputed_columns(
                dataset, self._reference_scores, collator=self.data_collator, batch_size=batch_size,
                accelerator=self.accelerator, description=f"reference log-probs of the {name} dataset",
            )
        finally:
            self.model.train(was_training)

    def _reference_usable(self) -> bool:
        kind = self.reference.kind
        if kind == "policy_before_training":  # the policy is its own reference only until its first update
            return self.state.global_step == 0
        return kind in ("adapters_disabled", "reference_adapter") or self.reference.model is not None

    def _reference_scores(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        chosen, rejected = self._sequence_logps(self._reference_token_logps(self.model, batch), batch)
        return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

    def _reference_token_logps(self, model, batch) -> TokenLogps:
        if not self._reference_usable():
            raise ConfigError(
                "the reference log-probs were precomputed and the reference is no longer available, so new data "
                "cannot be scored",
                field="precompute_ref_log_probs",
                fix="pass every evaluation set as eval_dataset when creating the trainer, or turn precomputation off",
            )
        chunk_size = self.args.logits_chunk_size
        if self._per_sequence(batch):
            return per_sequence_token_logps(
                lambda ids, completion: self.reference.token_logps(model, ids, completion, chunk_size=chunk_size),
                batch["input_ids"], batch["completion_mask"], batch.get("attention_mask"))
        ref = self.reference.token_logps(
            model, batch["input_ids"], batch["completion_mask"], batch.get("attention_mask"), batch.get("position_ids"),
            chunk_size=chunk_size,
        )
        return self._as_rows(ref, batch)

    def _policy_token_logps(self, model, batch) -> TokenLogps:
        chunk_size = self.args.logits_chunk_size
        if self._per_sequence(batch):
            return per_sequence_token_logps(
                lambda ids, completion: token_logps(model, ids, completion, chunk_size=chunk_size),
                batch["input_ids"], batch["completion_mask"], batch.get("attention_mask"))
        values = token_logps(model, batch["input_ids"], batch["completion_mask"], batch.get("attention_mask"),
                             batch.get("position_ids"), chunk_size=chunk_size)
        return self._as_rows(values, batch)

    def _per_sequence(self, batch) -> bool:
        # an MoE router loss is not additive over sequences: such a policy keeps the batched forward
        return not self.aux_loss_enabled and wants_per_sequence_forward(self.args.per_sequence_forward, batch)

    # -- loss

    def count_loss_items(self, batch: dict[str, Any]) -> torch.Tensor:
        return torch.tensor(_num_pairs(batch))

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        # RPO's NLL is a mean over chosen tokens: count them over the whole accumulated batch too
        if self.args.rpo_alpha is not None and batch_samples:
            self._accumulated_chosen_tokens = accumulated_chosen_tokens(
                batch_samples, device, across_processes=self.args.average_tokens_across_devices)
        return super()._get_num_items_in_batch(batch_samples, device)

    def _as_rows(self, values: TokenLogps, batch) -> TokenLogps:
        """Per-token values in the (2B, L-1) layout of the padded batch, also for padding-free batches."""
        if "sequence_mask" not in batch:
            return values
        rows = batch["sequence_mask"]
        return TokenLogps(
            logps=rows_from_flat(values.logps, rows, 0.0), mask=rows_from_flat(values.mask, rows, False),
            entropy=rows_from_flat(values.entropy, rows, 0.0), argmax_match=rows_from_flat(values.argmax_match, rows, False),
            router_loss=values.router_loss,
        )

    def _sequence_logps(self, values: TokenLogps, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) summed completion log-probs, (B,) each (LD-DPO weighting if asked)."""
        pairs = _num_pairs(batch)
        if self.args.ld_alpha is not None:
            return length_desensitized_logps(
                values.logps[:pairs], values.mask[:pairs], values.logps[pairs:], values.mask[pairs:], self.args.ld_alpha
            )
        sums = values.sequence_sums()
        return sums[:pairs], sums[pairs:]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        pairs = _num_pairs(inputs)
        policy = self._policy_token_logps(model, inputs)
        policy_chosen, policy_rejected = self._sequence_logps(policy, inputs)
        # LD-DPO weighs the sums; a likelihood (sft, RPO) counts every token once
        chosen_plain = policy.sequence_sums()[:pairs] if args.ld_alpha is not None else None
        if "ref_chosen_logps" in inputs and "ref_rejected_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self._sequence_logps(self._reference_token_logps(model, inputs), inputs)
        counts = policy.token_counts()
        logps = PreferenceLogps(
            policy_chosen=policy_chosen, policy_rejected=policy_rejected,
            ref_chosen=ref_chosen.to(policy_chosen.dtype), ref_rejected=ref_rejected.to(policy_chosen.dtype),
            chosen_num_tokens=counts[:pairs], rejected_num_tokens=counts[pairs:], policy_chosen_plain=chosen_plain,
        )
        options: dict[str, Any] = {"discopop_tau": args.discopop_tau, "average_log_probs": args.ipo_average_log_probs}
        if args.f_divergence_type != "reverse_kl":
            options.update(f_divergence_type=args.f_divergence_type, f_alpha_divergence_coef=args.f_alpha_divergence_coef)
        if "bco_pair" in args.loss_type:
            options.update(running_mean=self.bco_running_mean, update_running_mean=self.model.training)
        # the mean over this micro-batch's pairs -> a share of the mean over the accumulated batch
        normaliser = num_items_in_batch if num_items_in_batch is not None else pairs
        chosen_nll = None
        accumulated_tokens = getattr(self, "_accumulated_chosen_tokens", None)
        if args.rpo_alpha is not None and num_items_in_batch is not None and accumulated_tokens is not None:
            # undone by the pairs / normaliser factor below: the NLL ends up averaged over every chosen token
            # of the accumulated batch, as one large batch would average it
            chosen_nll = -logps.chosen_likelihood_logps.sum() / accumulated_tokens.clamp_min(1) * (normaliser / pairs)
        loss, metrics = combined_preference_loss(
            logps, args.loss_type, args.loss_weights, beta=args.beta, label_smoothing=args.label_smoothing,
            rpo_alpha=args.rpo_alpha, chosen_nll=chosen_nll, pair_weights=self._pair_weights(model, inputs, policy),
            **options,
        )
        loss = loss + policy.router_loss  # an MoE policy's load-balancing loss, as transformers adds it to its own
        loss = self.scale_for_devices(loss * (pairs / normaliser), num_items_in_batch)

        self._record_dpo_metrics(metrics, policy, inputs, pairs)
        if not return_outputs:
            return loss
        return loss, {"loss": loss, "chosen_rewards": args.beta * (logps.policy_chosen - logps.ref_chosen).detach(),
                      "rejected_rewards": args.beta * (logps.policy_rejected - logps.ref_rejected).detach()}

    def evaluation_step(self, model, inputs: dict[str, Any]):
        """Predictions (B, 2): each pair's implicit rewards ``beta * (log pi - log pi_ref)`` of
        ``[chosen, rejected]`` (summed over completion tokens); labels (B,): zeros, the column of the
        preferred completion, so that ``argmax(predictions, -1) == labels`` is the reward accuracy."""
        loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        predictions = torch.stack([outputs["chosen_rewards"], outputs["rejected_rewards"]], dim=-1).float()
        labels = torch.zeros(predictions.shape[0], dtype=torch.long, device=predictions.device)
        return loss, predictions, labels

    def _pair_weights(self, model, inputs, policy: TokenLogps) -> torch.Tensor | None:
        if not self.args.use_weighting:
            return None
        # WPO needs sum_v p_v^2 at every completion token: one extra gradient-free pass over the head
        chunk_size = self.args.logits_chunk_size
        if self._per_sequence(inputs):
            log_sum_sq = per_sequence_values(
                lambda ids, completion: token_log_sum_sq_probs(model, {"input_ids": ids, "completion_mask": completion},
                                                               chunk_size=chunk_size),
                inputs["input_ids"], inputs["completion_mask"], inputs.get("attention_mask"))
        else:
            log_sum_sq = token_log_sum_sq_probs(model, inputs, chunk_size=chunk_size)
        if "sequence_mask" in inputs:
            log_sum_sq = rows_from_flat(log_sum_sq, inputs["sequence_mask"], 0.0)
        weights = wpo_weights(policy.logps.detach(), log_sum_sq, policy.mask)
        pairs = _num_pairs(inputs)
        return weights[:pairs] * weights[pairs:]

    def _record_dpo_metrics(self, metrics: dict[str, float], policy: TokenLogps, inputs, pairs: int) -> None:
        with torch.no_grad():
            chosen_mask = policy.mask[:pairs]
            correct = (policy.argmax_match[:pairs] & chosen_mask).sum()
            metrics["mean_token_accuracy"] = (correct.float() / chosen_mask.sum().clamp_min(1)).item()
            self.record_metrics(metrics)
            if self.model.training:
                tokens = inputs.get("sequence_mask", inputs.get("attention_mask"))
                tokens = tokens.sum() if tokens is not None else torch.tensor(inputs["input_ids"].numel())
                tokens = self.accelerator.gather_for_metrics(tokens.reshape(1).to(policy.logps.device)).sum()
                self._cumulative["num_tokens"] += float(tokens.item())

    # -- state that checkpoints must carry for an exact resume

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if os.path.isdir(folder):
            if "bco_pair" in self.args.loss_type:
                with open(os.path.join(folder, BCO_STATE_FILE), "w", encoding="utf-8") as handle:
                    json.dump(self.bco_running_mean.state_dict(), handle)
            if self.args.sync_ref_model:
                save_reference_state(self.reference, folder)

    def _load_rng_state(self, checkpoint) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        bco_state = os.path.join(checkpoint, BCO_STATE_FILE)
        if os.path.isfile(bco_state):
            with open(bco_state, encoding="utf-8") as handle:
                self.bco_running_mean.load_state_dict(json.load(handle))
        if self.args.sync_ref_model:
            load_reference_state(self.reference, checkpoint)


def accumulated_chosen_tokens(batch_samples: list, device: torch.device, *, across_processes: bool) -> torch.Tensor:
    """Chosen target tokens of the micro-batches of one accumulation window (0-dim), summed over every
    process when ``across_processes`` (``average_tokens_across_devices``).

    The pair count (``num_items_in_batch``) is global under the same flag, and the loss is then scaled
    by the process count to undo DDP's averaging; RPO's NLL must be normalised the same way, or it
    ends up ``world_size`` times too small when each process averages its own tokens.
    """
    tokens = torch.stack([_chosen_target_count(b).to(device) for b in batch_samples]).sum()
    return all_reduce_sum(tokens) if across_processes else tokens


def _chosen_target_count(batch: dict[str, Any]) -> torch.Tensor:
    """Target tokens of the B chosen completions of a batch (padded or padding-free)."""
    pairs = _num_pairs(batch)
    if "sequence_mask" in batch:
        end = int(batch["sequence_mask"][:pairs].sum())
        return target_positions(batch["completion_mask"][:, :end], batch["position_ids"][:, :end]).sum()
    return target_positions(batch["completion_mask"][:pairs]).sum()


def _num_pairs(batch: dict[str, Any]) -> int:
    """B: the batch holds B chosen then B rejected sequences."""
    mask = batch.get("sequence_mask")
    rows = mask.shape[0] if mask is not None else batch["input_ids"].shape[0]
    return rows // 2


@torch.no_grad()
def token_log_sum_sq_probs(model, inputs: dict[str, torch.Tensor], *, chunk_size: int | None = None) -> torch.Tensor:
    """``log sum_v p_v^2`` at each target position, (B, L-1) aligned like :func:`token_logps`, 0 elsewhere.

    WPO's per-token normaliser. It needs the full distribution at each target, so this is a second,
    gradient-free forward that goes through the output head in chunks of ``chunk_size`` positions.
    """
    position_ids = inputs.get("position_ids")
    mask = target_positions(inputs["completion_mask"], position_ids)
    chunks = target_logits_chunks(model, inputs["input_ids"], mask, inputs.get("attention_mask"), position_ids,
                                  chunk_size=chunk_size or 1024)
    values = [log_sum_squared_probs(logits) for logits in chunks]
    flat = torch.cat(values) if values else torch.zeros(0, dtype=torch.float32, device=mask.device)
    return torch.zeros(mask.shape, dtype=flat.dtype, device=mask.device).masked_scatter(mask, flat)
