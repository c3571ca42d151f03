"""What a PPO checkpoint holds beyond ``transformers.Trainer``'s, and how a run resumes from one.

``transformers.Trainer._save_checkpoint`` already writes into ``output_dir/checkpoint-N``: the
model (for PPO, :meth:`PPOTrainer._save`: the policy and the tokenizer), ``optimizer.pt``,
``scheduler.pt``, ``scaler.pt`` (fp16 only), ``rng_state.pth`` (python, numpy, torch and
accelerator RNGs; ``rng_state_<rank>.pth`` per process) and ``trainer_state.json`` (global step,
log history, callback states). PPO adds:

* ``value_model/``: the value model, trained alongside the policy. A transformers model or a PEFT
  model is written with ``save_pretrained`` (a sequence-classifier directory, or the adapter and
  score head); any other module as its state dict in ``value_model/model.safetensors``;
* ``ppo_state.pt`` (``ppo_state_<rank>.pt`` per process): the state of the generator that shuffles
  mini-batches, the running totals (episodes so far) and the metrics gathered since the last log.
  Completions need no saved generator: they are drawn from keys of (seed, update, prompt position).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from posttrain.errors import ConfigError
from posttrain.models.wrappers import is_peft_model, unwrap_model_keep_peft
from posttrain.trainers.checkpoint import resolve_resume

VALUE_MODEL_DIR = "value_model"
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"

# (single file, sharded index, older single file) of each kind of weights directory
_FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", None, "adapter_model.bin")


def ppo_state_file(args) -> str:
    """The name of this process's PPO state file inside a checkpoint."""
    return "ppo_state.pt" if args.world_size <= 1 else f"ppo_state_{args.process_index}.pt"


# ----------------------------------------------------------------------------- saving


def save_value_model(value_model: nn.Module, checkpoint: str, args) -> None:
    """Write the value model to ``checkpoint/value_model`` (main process only)."""
    if not args.should_save:
        return
    directory = os.path.join(checkpoint, VALUE_MODEL_DIR)
    os.makedirs(directory, exist_ok=True)
    model = unwrap_model_keep_peft(value_model)
    if is_peft_model(model) or isinstance(model, PreTrainedModel):
        model.save_pretrained(directory)
    else:
        # a value-head LM's save_pretrained splits its weights across two files under other names;
        # the module's own state dict reloads into it exactly, whatever the module is
        from safetensors.torch import save_model

        save_model(model, os.path.join(directory, _FULL_WEIGHTS[0]))


def save_ppo_state(checkpoint: str, args, sample_generator: torch.Generator, cumulative: Mapping[str, float],
                   pending_metrics: Mapping[str, list[float]]) -> None:
    """Write what the PPO loop keeps outside the models and the optimizer (every process its own file)."""
    os.makedirs(checkpoint, exist_ok=True)
    state = {
        "sample_generator": sample_generator.get_state(),
        "cumulative": {name: float(value) for name, value in cumulative.items()},
        "pending_metrics": {name: [float(v) for v in values] for name, values in pending_metrics.items()},
    }
    torch.save(state, os.path.join(checkpoint, ppo_state_file(args)))


# ----------------------------------------------------------------------------- resuming


def find_checkpoint(resume_from_checkpoint: str | os.PathLike | bool, output_dir: str) -> str | None:
    """The directory ``train(resume_from_checkpoint=...)`` resumes from (None: a new run).

    ``True`` (or ``"true"``, as the command line passes it) means the newest complete
    ``checkpoint-N`` in ``output_dir`` (see :func:`posttrain.trainers.checkpoint.resolve_resume`);
    ``False``/``"false"`` none; anything else is the checkpoint directory itself.
    """
    return resolve_resume(resume_from_checkpoint, output_dir)


def check_checkpoint(checkpoint: str, args, policy: nn.Module, value_model: nn.Module) -> None:
    """Raise a :class:`ConfigError` naming the first file ``checkpoint`` lacks for an exact resume."""
    restart = f"or start a new run from its policy (--model_name_or_path {checkpoint})"
    if _weights_file(checkpoint, policy) is None:
        raise ConfigError(
            f"checkpoint '{checkpoint}' holds no policy weights ({_expected_weights(policy)})",
            field="resume_from_checkpoint",
            fix="resume from a checkpoint of the same run, with the same peft settings, " + restart,
        )
    value_dir = os.path.join(checkpoint, VALUE_MODEL_DIR)
    if _weights_file(value_dir, value_model) is None:
        raise ConfigError(
            f"checkpoint '{checkpoint}' holds no value model "
            f"({VALUE_MODEL_DIR}/{_expected_weights(value_model)} is missing)",
            field="resume_from_checkpoint",
            fix=f"resume from a checkpoint that has {VALUE_MODEL_DIR}/ (PPOTrainer writes it into every checkpoint), "
                + restart + "; the value model then starts again from the reward model",
        )
    required = (OPTIMIZER_FILE, SCHEDULER_FILE, TRAINER_STATE_FILE, ppo_state_file(args))
    missing = [name for name in required if not os.path.isfile(os.path.join(checkpoint, name))]
    if missing:
        present = sorted(name for name in os.listdir(checkpoint) if not name.startswith("."))
        hint = ""
        if TRAINER_STATE_FILE in missing:
            hint = "its save did not finish; "
        elif ppo_state_file(args) in missing and any(n.startswith("ppo_state") for n in present):
            hint = f"it was saved by a different number of processes than this run's {args.world_size}; "
        elif OPTIMIZER_FILE in missing:
            hint = "it was saved with --save_only_model; "
        raise ConfigError(
            f"checkpoint '{checkpoint}' lacks {', '.join(missing)}, which resuming needs (it holds: "
            f"{', '.join(present[:12])})",
            field="resume_from_checkpoint",
            fix=hint + "resume from another checkpoint-N of the run, " + restart,
        )


def load_weights(model: nn.Module, directory: str, what: str) -> None:
    """Copy the weights saved in ``directory`` into ``model`` in place, so the optimizer keeps its tensors."""
    model = unwrap_model_keep_peft(model)
    path = _weights_file(directory, model)
    state = _read_weights(path)
    mismatch_fix = "resume with the same models and peft settings as the run that wrote the checkpoint"
    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        trainable = {name for name, param in model.named_parameters() if param.requires_grad}
        not_loaded = [name for name in result.missing_keys if name in trainable]
    else:
        result = model.load_state_dict(state, strict=False)
        own = model.state_dict()
        missing = set(result.missing_keys)
        # save_pretrained writes a tied tensor (e.g. lm_head = embed_tokens) once; it is loaded through its twin
        loaded_storage = {tensor.data_ptr() for name, tensor in own.items() if name not in missing}
        not_loaded = [name for name in result.missing_keys if own[name].data_ptr() not in loaded_storage]
    if not_loaded or result.unexpected_keys:
        raise ConfigError(
            f"the {what} saved in '{directory}' does not fit the {what} being trained "
            f"(not in the checkpoint: {not_loaded[:3]}; not in the model: {list(result.unexpected_keys)[:3]})",
            field="resume_from_checkpoint", fix=mismatch_fix,
        )


def load_ppo_state(checkpoint: str, args) -> dict[str, Any]:
    """The PPO state :func:`save_ppo_state` wrote for this process."""
    return torch.load(os.path.join(checkpoint, ppo_state_file(args)), map_location="cpu", weights_only=True)


def _weight_names(model: nn.Module) -> tuple[str | None, ...]:
    return _ADAPTER_WEIGHTS if is_peft_model(unwrap_model_keep_peft(model)) else _FULL_WEIGHTS


def _expected_weights(model: nn.Module) -> str:
    return _weight_names(model)[0]


def _weights_file(directory: str, model: nn.Module) -> str | None:
    for name in _weight_names(model):
        if name is not None and os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if path.endswith(".index.json"):
        directory = os.path.dirname(path)
        with open(path, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(os.path.join(directory, shard), device="cpu"))
        return state
    if path.endswith(".safetensors"):
        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)
