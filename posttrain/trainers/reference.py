"""Reference policies: where the log-probs of the frozen reference model come from.

Methods that keep a policy close to a reference (the DPO family, and the KL terms of GRPO, PPO and
online DPO) need ``log pi_ref(token)`` for the same batches the policy sees. There are five ways to
get them, chosen by :func:`resolve_reference`:

==========================  ===============================================  ==========================
strategy                    when                                             extra memory
==========================  ===============================================  ==========================
``model``                   ``ref_model=`` a model or a path                 one model
``frozen_copy``             no ``ref_model``, full fine-tuning               one model (a deep copy)
``adapters_disabled``       no ``ref_model``, the trainer added a LoRA       none: the base weights
``reference_adapter``       no ``ref_model``, the model already carried an   one adapter
                            adapter (e.g. from SFT): a frozen copy of it
``policy_before_training``  ``precompute_ref_log_probs`` and no              none: the policy itself,
                            ``ref_model``: one pass before the first step    used before any update
==========================  ===============================================  ==========================

Every strategy answers :meth:`ReferencePolicy.token_logps` with the same
:class:`~posttrain.models.lm_head.TokenLogps` that the policy's own forward gives, computed in
chunks without full-vocabulary logits and without gradients.

A trainer uses it in three lines::

    self.reference = resolve_reference(model, ref_model, args, adapter_is_new=peft_config is not None)
    ...  # after Trainer.__init__, so the accelerator exists:
    self.reference.prepare(self.accelerator)
    ...  # in compute_loss:
    ref = self.reference.token_logps(model, input_ids, completion_mask, attention_mask)

Also here: :func:`add_precomputed_columns` (a batched, gradient-free pass over a tokenized dataset
that stores per-row reference values as new columns) and :class:`ReferenceSyncCallback`
(TR-DPO: every ``sync_steps`` optimizer steps, ``ref <- alpha * policy + (1 - alpha) * ref``).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers import TrainerCallback

from posttrain.errors import ConfigError, DataError
from posttrain.models.lm_head import TokenLogps, token_logps, unwrap_model
from posttrain.models.modes import evaluation_mode
from posttrain.trainers.base import frozen_copy, is_peft_model, load_pretrained, model_id_of

logger = logging.getLogger("posttrain")

REFERENCE_ADAPTER_NAME = "ref"


# ----------------------------------------------------------------------------- the strategies


class ReferencePolicy:
    """The frozen reference policy of a trainer.

    Attributes:
        kind: one of ``model``, ``frozen_copy``, ``adapters_disabled``, ``reference_adapter``,
            ``policy_before_training``.
        model: the separate reference network for ``model`` and ``frozen_copy``; ``None`` otherwise
            (those strategies run the policy's own weights, so the policy is passed to each call).
    """

    def __init__(self, kind: str, model: nn.Module | None = None, adapter_name: str | None = None) -> None:
        self.kind = kind
        self.model = model
        self.adapter_name = adapter_name

    def __repr__(self) -> str:
        return f"ReferencePolicy(kind={self.kind!r})"

    @property
    def holds_separate_model(self) -> bool:
        """True when the reference is a second network in memory (which TR-DPO sync can update)."""
        return self.model is not None

    @contextmanager
    def active(self, policy: nn.Module) -> Iterator[nn.Module]:
        """Yield the module whose forward is the reference policy, with gradients off."""
        with torch.no_grad():
            if self.model is not None:
                yield self.model
            elif self.kind == "adapters_disabled":
                from posttrain.trainers.base import adapters_disabled

                with adapters_disabled(policy):
                    yield policy
            elif self.kind == "reference_adapter":
                with _adapter_switched(policy, self.adapter_name):
                    yield policy
            else:  # policy_before_training: valid only while no optimizer step has been taken
                yield policy

    def token_logps(
        self,
        policy: nn.Module,
        input_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        temperature: float = 1.0,
        chunk_size: int = 1024,
        prompt_width: int | None = None,
    ) -> TokenLogps:
        """Per-token reference log-probs of ``input_ids`` (no gradient), as :func:`token_logps` returns them.

        ``policy`` is the trainer's (possibly wrapped) model; strategies that reuse its weights run it.
        """
        # dropout must not perturb the reference, even when the policy is in train mode
        with self.active(policy) as network, evaluation_mode(network):
            return token_logps(
                network, input_ids, completion_mask, attention_mask, position_ids,
                temperature=temperature, chunk_size=chunk_size, prompt_width=prompt_width,
            )

    def prepare(self, accelerator) -> None:
        """Place a separate reference network on the training device (DDP-free, evaluation mode)."""
        if self.model is None:
            return
        state = getattr(accelerator, "state", None)
        plugin = getattr(state, "deepspeed_plugin", None)
        if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
            raise ConfigError(
                "a separate reference model is not supported with DeepSpeed ZeRO-3",
                field="ref_model",
                fix="train a LoRA adapter (the reference is then the base model, with no second copy)",
            )
        if plugin is not None or getattr(accelerator, "is_fsdp2", False) or getattr(state, "fsdp_plugin", None):
            self.model = self.model.to(accelerator.device)
        else:
            self.model = accelerator.prepare_model(self.model, evaluation_mode=True)
        self.model.eval()

    def release(self) -> None:
        """Drop the separate network once its values were precomputed (frees its memory)."""
        self.model = None


@contextmanager
def _adapter_switched(policy: nn.Module, adapter_name: str | None):
    peft_model = _peft_model_inside(policy)
    previous = peft_model.active_adapter
    # inference_mode keeps the reference adapter frozen; switching back re-enables training of the policy adapter
    peft_model.set_adapter(adapter_name, inference_mode=True)
    try:
        yield
    finally:
        peft_model.set_adapter(previous)


def _peft_model_inside(model: nn.Module) -> nn.Module:
    seen = set()
    while id(model) not in seen and not is_peft_model(model):
        seen.add(id(model))
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    if not is_peft_model(model):
        raise ConfigError("the reference adapter needs a PEFT model", field="ref_model", fix="pass ref_model=...")
    return model


# ----------------------------------------------------------------------------- resolution


def freeze(model: nn.Module) -> nn.Module:
    """Turn off gradients and dropout of ``model``; return it."""
    model.requires_grad_(False)
    return model.eval()


def require_map_style(dataset, name: str) -> None:
    """Preference trainers read whole datasets (validation, tokenization, precomputation): no streaming."""
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):
        raise DataError(
            "streaming (iterable) datasets are not supported here", source=name,
            expected="a datasets.Dataset", found="IterableDataset",
            fix="load it without streaming=True, or materialise it with Dataset.from_list(list(dataset))",
        )


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability in ``model`` to 0 (a deterministic forward: policy == reference at step 0)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def resolve_reference(
    model: nn.Module,
    ref_model: str | nn.Module | None,
    args,
    *,
    adapter_is_new: bool,
    precompute: bool = False,
    auto_class: type | None = None,
) -> ReferencePolicy:
    """Pick the reference strategy for ``model`` (the policy, already wrapped with PEFT if any).

    Args:
        ref_model: a model, a path / hub id (loaded like the policy and frozen), or ``None``.
        args: the trainer config (for ``model_init_kwargs`` and precision when loading a path).
        adapter_is_new: the trainer itself added the PEFT adapter (so the base model *is* the
            reference); ``False`` when the user passed a model that already carried one.
        precompute: reference values are computed once before training; with no ``ref_model`` the
            policy itself serves (no copy is made).
        auto_class: the ``AutoModel*`` class used to load a path (default: causal LM).
    """
    if ref_model is not None and ref_model is model:
        raise ConfigError(
            "model and ref_model are the same object, so the reference would move with the policy",
            field="ref_model", fix="omit ref_model (a frozen copy is made), or pass a separately loaded model",
        )
    if isinstance(ref_model, str):
        from transformers import AutoModelForCausalLM

        loaded = load_pretrained(ref_model, args, auto_class=auto_class or AutoModelForCausalLM)
        logger.info("reference model loaded from %s", ref_model)
        return ReferencePolicy("model", freeze(loaded))
    if ref_model is not None:
        if is_peft_model(ref_model):
            ref_model = ref_model.merge_and_unload() if hasattr(ref_model, "merge_and_unload") else ref_model
        return ReferencePolicy("model", freeze(ref_model))
    if is_peft_model(model):
        if adapter_is_new:
            return ReferencePolicy("adapters_disabled")
        add_reference_adapter(model)
        return ReferencePolicy("reference_adapter", adapter_name=REFERENCE_ADAPTER_NAME)
    if precompute:
        return ReferencePolicy("policy_before_training")
    return ReferencePolicy("frozen_copy", frozen_copy(model))


def add_reference_adapter(model: nn.Module, name: str = REFERENCE_ADAPTER_NAME) -> None:
    """Add a frozen copy of the active adapter of a PEFT ``model`` under ``name``: the starting point stays the reference."""
    peft_model = _peft_model_inside(model)
    if name in peft_model.peft_config:
        return
    active = peft_model.active_adapter
    peft_model.add_adapter(name, peft_model.peft_config[active])
    marker, ref_marker = f".{active}.", f".{name}."
    params = dict(peft_model.named_parameters())
    for param_name, param in params.items():
        if marker in param_name:
            ref_param = params.get(param_name.replace(marker, ref_marker))
            if ref_param is not None:
                ref_param.data.copy_(param.data)
                ref_param.requires_grad_(False)
    # add_adapter leaves the new adapter inactive; keep training the original one
    peft_model.set_adapter(active)


def reference_description(reference: ReferencePolicy, ref_model: Any) -> str:
    """One line for the log: which reference the run uses."""
    if reference.kind == "model":
        return f"reference: {ref_model if isinstance(ref_model, str) else model_id_of(reference.model)} (frozen)"
    return {
        "frozen_copy": "reference: a frozen copy of the initial model",
        "adapters_disabled": "reference: the base model (adapter disabled, no second copy)",
        "reference_adapter": "reference: a frozen copy of the initial adapter",
        "policy_before_training": "reference: the initial model, in one pass before training (no copy kept)",
    }.get(reference.kind, reference.kind)


# ----------------------------------------------------------------------------- precomputation


def add_precomputed_columns(
    dataset,
    score_batch: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    *,
    collator: Callable,
    batch_size: int,
    accelerator,
    description: str = "reference log-probs",
):
    """Return ``dataset`` with one new float column per key of ``score_batch``'s output.

    The dataset is read in order, ``batch_size`` rows at a time, collated with ``collator``, moved to
    the accelerator's device and scored without gradients; ``score_batch`` returns ``(B,)`` tensors.
    Under several processes each scores its share and the results are gathered in order.
    """
    from torch.utils.data import DataLoader

    if len(dataset) == 0:
        return dataset
    loader = accelerator.prepare(DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False))
    collected: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            scores = score_batch(batch)
            gathered = accelerator.gather_for_metrics(tuple(scores[name].float() for name in scores))
            for name, values in zip(scores, gathered):
                collected.setdefault(name, []).append(values.detach().cpu())
    for name, chunks in collected.items():
        values = torch.cat(chunks)[: len(dataset)].tolist()
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
        dataset = dataset.add_column(name, values)
    logger.info("precomputed %s for %d rows", description, len(dataset))
    return dataset


# ----------------------------------------------------------------------------- TR-DPO


def mix_into_reference(policy: nn.Module, reference: nn.Module, alpha: float) -> None:
    """``ref <- alpha * policy + (1 - alpha) * ref`` for every parameter (TR-DPO soft update, arXiv:2404.09656)."""
    policy_params = list(unwrap_model(policy).parameters())
    reference_params = list(unwrap_model(reference).parameters())
    if len(policy_params) != len(reference_params):
        raise ConfigError(
            "the reference model does not have the policy's architecture, so it cannot be mixed into it",
            field="sync_ref_model", fix="drop sync_ref_model, or use a reference of the same architecture",
        )
    with torch.no_grad():
        for ref_param, policy_param in zip(reference_params, policy_params):
            ref_param.mul_(1.0 - alpha).add_(policy_param.detach().to(ref_param.dtype), alpha=alpha)


REFERENCE_STATE_FILE = "posttrain_reference.pt"


def save_reference_state(reference: ReferencePolicy, folder: str) -> None:
    """Write a reference that training changes (TR-DPO) into a checkpoint folder, for an exact resume."""
    if reference.model is not None:
        state = {name: tensor.detach().cpu() for name, tensor in unwrap_model(reference.model).state_dict().items()}
        torch.save(state, os.path.join(folder, REFERENCE_STATE_FILE))


def load_reference_state(reference: ReferencePolicy, folder: str) -> bool:
    """Restore what :func:`save_reference_state` wrote; False when the checkpoint has none."""
    path = os.path.join(folder, REFERENCE_STATE_FILE)
    if reference.model is None or not os.path.isfile(path):
        return False
    unwrap_model(reference.model).load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return True


class ReferenceSyncCallback(TrainerCallback):
    """TR-DPO (Gorbatovski et al., arXiv:2404.09656): move the reference toward the policy.

    Every ``sync_steps`` optimizer steps, ``ref <- alpha * policy + (1 - alpha) * ref``; ``alpha=1`` is
    the "hard" update that copies the policy.
    """

    def __init__(self, reference: ReferencePolicy, alpha: float, sync_steps: int) -> None:
        if not reference.holds_separate_model:
            raise ConfigError(
                f"sync_ref_model needs a separate reference model, but the {reference_description(reference, None)}",
                field="sync_ref_model",
                fix="drop sync_ref_model, or train all weights without precompute_ref_log_probs",
            )
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"ref_model_mixup_alpha must be in [0, 1], got {alpha}", field="ref_model_mixup_alpha",
                              fix="use e.g. 0.6 (soft) or 1.0 (hard update)")
        if sync_steps < 1:
            raise ConfigError(f"ref_model_sync_steps must be >= 1, got {sync_steps}", field="ref_model_sync_steps",
                              fix="use e.g. 512")
        self.reference = reference
        self.alpha = alpha
        self.sync_steps = sync_steps

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and state.global_step % self.sync_steps == 0:
            mix_into_reference(model, self.reference.model, self.alpha)
        return control
