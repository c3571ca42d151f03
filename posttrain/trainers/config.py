"""The configuration every posttrain method shares, on top of ``transformers.TrainingArguments``.

It adds three things to the Trainer's vocabulary:

* defaults that run on the machine at hand (float32 on CPU, bf16 on a GPU that supports it, no
  integrations switched on behind the user's back, columns kept for our own collators);
* the older names that scripts still write (``warmup_ratio``, ``evaluation_strategy``, and each
  method's own, declared in ``_aliases``), mapped onto one canonical field, noted once in the log;
* a clear :class:`~posttrain.errors.ConfigError` when an explicit request cannot be met here.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import TrainingArguments

from posttrain.errors import ConfigError

logger = logging.getLogger("posttrain")
_noted_aliases: set[tuple[str, str]] = set()


def note_alias_once(old: str, new: str, owner: str) -> None:
    """Log, once per process, that an older name was mapped onto its current one."""
    key = (owner, old)
    if key not in _noted_aliases:
        _noted_aliases.add(key)
        logger.warning("%s: `%s` is the older name of `%s`; using it as `%s`.", owner, old, new, new)


def cuda_bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class PosttrainConfig(TrainingArguments):
    """Fields shared by every posttrain method, in addition to ``TrainingArguments``."""

    # Older names mapped onto current fields; subclasses extend it. {old_name: canonical_name}
    _aliases: ClassVar[dict[str, str]] = {"evaluation_strategy": "eval_strategy"}

    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where checkpoints and the final model go (default: '<model name>-<method>')."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bfloat16 mixed precision. Default: on where a GPU supports it, off on CPU. "
            "Asking for it where no such GPU exists is an error."
        },
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    report_to: None | str | list[str] = field(
        default="none", metadata={"help": "Integrations to report to ('none', 'tensorboard', 'wandb', 'all')."}
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Kept False: posttrain's collators read their own columns."},
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `from_pretrained` when `model` is a path or hub id, "
            "e.g. '{\"dtype\": \"bfloat16\", \"attn_implementation\": \"sdpa\"}'."
        },
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes used to tokenize the dataset (default: one)."}
    )
    logits_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per chunk when computing log-probs from hidden states (default: about 256 MiB "
                  "of logits per chunk); bounds logit memory."},
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "Kept False: a NaN or inf loss is logged as NaN/inf (True would log the mean of "
                  "earlier losses instead, and after a reset 0.0, hiding a diverged run)."},
    )
    max_consecutive_nonfinite_steps: int = field(
        default=3,
        metadata={"help": "An optimizer step whose loss or gradient norm is NaN/inf is skipped (weights and "
                  "optimizer state unchanged) and counted as `nonfinite_steps`; after this many skipped steps "
                  "in a row the run stops with an error naming the step. 0 turns the guard off."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow models and tokenizers that ship their own Python code (hub); passed to both loaders."},
    )
    pad_token: str | None = field(
        default=None,
        metadata={"help": "Set the tokenizer's pad token to this token, which must be in its vocabulary "
                  "(default: its own pad token, else EOS)."},
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={"help": "Chat template for the tokenizer: a Jinja file, or a tokenizer directory / hub id whose "
                  "template is copied (special tokens it names must already be in the vocabulary)."},
    )
    activation_offloading: bool = field(
        default=False,
        metadata={"help": "Per-layer activation checkpointing that keeps only each decoder layer's input, "
                  "copied to pinned CPU memory on a GPU (asynchronously); each layer is recomputed in the backward. "
                  "Subsumes gradient_checkpointing."},
    )
    tiled_mlp: bool = field(
        default=False,
        metadata={"help": "Run each dense MLP (Llama-style gate/up/down, Phi-3's fused gate_up, GPT-2's c_fc/c_proj) over "
                  "tiles of sequence_tile_size tokens, each recomputed in the backward, so no (tokens x intermediate) "
                  "tensor is held whole. Mixture-of-experts blocks are not tiled."},
    )
    sequence_tile_size: int = field(
        default=2048, metadata={"help": "Tokens per tile for tiled_mlp."}
    )
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Older name: warm up for this fraction of all steps (sets warmup_steps)."}
    )
    evaluation_strategy: str | None = field(
        default=None, metadata={"help": "Older name of `eval_strategy`."}
    )

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for old, new in type(self)._aliases.items():
            value = getattr(self, old, None)
            if value is not None:
                note_alias_once(old, new, owner)
                setattr(self, new, value)
        if self.max_consecutive_nonfinite_steps < 0:
            raise ConfigError(
                f"max_consecutive_nonfinite_steps must be >= 0, got {self.max_consecutive_nonfinite_steps}",
                field="max_consecutive_nonfinite_steps", fix="pass a small count such as 3, or 0 to turn the guard off",
            )
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ConfigError(
                    f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}", field="warmup_ratio",
                    fix="pass a fraction such as 0.1, or --warmup_steps N",
                )
            note_alias_once("warmup_ratio", "warmup_steps", owner)
            self.warmup_steps = float(self.warmup_ratio)
        check_common_values(self)
        launched_processes = adopt_process_launch(self)
        self._resolve_precision()
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False
        if self.output_dir is None:
            self.output_dir = "trainer_output"
        if isinstance(self.model_init_kwargs, str):
            self.model_init_kwargs = _parse_json_field(self.model_init_kwargs, "model_init_kwargs")
        super().__post_init__()  # sets up the device and, under a launcher, the process group
        check_launch_joined(self, launched_processes)

    def _resolve_precision(self) -> None:
        has_gpu = torch.cuda.is_available()
        if self.bf16 is None:
            self.bf16 = cuda_bf16_available() and not self.fp16 and not self.use_cpu
        elif self.bf16 and (self.use_cpu or not cuda_bf16_available()):
            where = "this machine has no GPU" if not has_gpu else "this GPU does not support bfloat16"
            raise ConfigError(
                f"bf16 was requested but {where}", field="bf16",
                fix="drop --bf16 (float32 is used automatically)" + ("" if not has_gpu else ", or use --fp16"),
            )
        if self.fp16 and (self.use_cpu or not has_gpu):
            raise ConfigError(
                "fp16 mixed precision needs a CUDA GPU and this machine has none", field="fp16",
                fix="drop --fp16 (float32 is used automatically on CPU)",
            )


GLOO_EXIT_SETTLE_SECONDS = 0.05
_gloo_exit_settle_registered = False
gloo_exit_settled = False  # set by the exit handler, for tests


def settle_gloo_workers_at_exit() -> None:
    """At interpreter exit, give gloo's worker threads the GIL before finalisation starts.

    A gloo worker thread drops each finished collective's tensors on its own, just after the
    collective completes; a tensor that Python has seen then needs the GIL. When the main thread
    reaches interpreter finalisation first, the worker's attempt to take the GIL ends the thread
    with a forced unwind that aborts the process ("terminate called without an active exception",
    exit code -6; seen in a core dump as ``ProcessGroupGloo::AsyncWork`` being destroyed), so a
    two-process CPU run that trained correctly fails under torchrun now and then. An exit handler,
    registered once while the interpreter is intact and only for gloo, sleeps for
    :data:`GLOO_EXIT_SETTLE_SECONDS`, which lets those threads finish. It starts no collective, so a
    process whose peers have failed exits as promptly as before.
    """
    global _gloo_exit_settle_registered
    if _gloo_exit_settle_registered or not _gloo_group_alive():
        return
    _gloo_exit_settle_registered = True
    atexit.register(_settle_gloo_workers)


def _gloo_group_alive() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo"


def _settle_gloo_workers() -> None:
    global gloo_exit_settled
    if _gloo_group_alive():
        import time

        time.sleep(GLOO_EXIT_SETTLE_SECONDS)  # releases the GIL to the worker threads
        gloo_exit_settled = True


def adopt_process_launch(config: TrainingArguments) -> int:
    """The number of processes a launcher started; on a machine without a GPU, makes them one CPU run.

    torchrun and ``accelerate launch`` set ``WORLD_SIZE`` and ``LOCAL_RANK``. Without a GPU, accelerate
    forms a distributed CPU run only when asked for the CPU (``use_cpu``); otherwise every process trains
    alone on all the data, into the same ``output_dir``. On the CPU accelerate runs FSDP and DeepSpeed
    requests as plain DDP, which is said once. Called before the device is set up.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched <= 1 or "LOCAL_RANK" not in os.environ:
        return launched
    says = os.environ.get("RANK", "0") == "0"
    if not config.use_cpu and not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        config.use_cpu = True
        config.ddp_backend = config.ddp_backend or "gloo"  # not MPI: torchrun's environment names the group
        if says:
            logger.warning("%d processes launched on a machine without a GPU: training on the CPU over gloo "
                           "(use_cpu=True).", launched)
    sharded = [name for name, asked in (
        ("FSDP", config.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"),
        ("DeepSpeed", config.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"),
    ) if asked]
    if config.use_cpu and sharded and says:
        logger.warning("%s does not run on the CPU: accelerate trains these %d processes as DDP instead (every "
                       "process holds the whole model and optimizer state).", " and ".join(sharded), launched)
    return launched


def check_launch_joined(config: TrainingArguments, launched: int) -> None:
    """Stop when the processes a launcher started did not form one run (each would train alone)."""
    if launched > 1 and config.world_size != launched:
        raise ConfigError(
            f"the launcher started {launched} processes but they did not join one distributed run "
            f"(device: {config.device}); each would train alone on all the data into the same output_dir",
            field="use_cpu", fix="pass --use_cpu true to train over gloo on the CPU, or launch one process",
        )


# ----------------------------------------------------------------------------- impossible values
#
# Values the optimizer, the data loader or the tokenizer would otherwise reject deep inside a run
# (or, worse, accept: a negative learning rate ascends the loss). Each field is checked only when the
# config has it, so one table serves every method.

# field -> (least allowed value, None allowed, example for the fix)
_INTEGER_MINIMUMS: dict[str, tuple[int, bool, str]] = {
    "per_device_train_batch_size": (1, False, "8"),
    "per_device_eval_batch_size": (1, False, "8"),
    "gradient_accumulation_steps": (1, False, "1"),
    "seed": (0, False, "42"),
    "dataloader_num_workers": (0, False, "0"),
    "max_length": (1, True, "1024"),
    "max_prompt_length": (1, True, "512"),
    "max_completion_length": (1, True, "256"),
    "max_new_tokens": (1, True, "256"),
    "logits_chunk_size": (1, True, "4096"),
    "rollout_max_batch_tokens": (1, True, "65536"),
    "dataset_num_proc": (1, True, "4"),
    "pad_to_multiple_of": (1, True, "8"),
    "sequence_tile_size": (1, False, "2048"),
}
# field -> (least allowed value, the least itself allowed, example for the fix)
_NUMBER_MINIMUMS: dict[str, tuple[float, bool, str]] = {
    "learning_rate": (0.0, True, "1e-5"),
    "num_train_epochs": (0.0, True, "3"),
    "weight_decay": (0.0, True, "0.0"),
    "max_grad_norm": (0.0, True, "1.0"),
    "warmup_steps": (0.0, True, "100"),
    "adam_epsilon": (0.0, False, "1e-8"),
    "logging_steps": (0.0, False, "10"),
}
_RESUME_KEYWORDS = ("true", "false")  # "true": the latest checkpoint in output_dir


def check_common_values(config: TrainingArguments) -> None:
    """Raise a :class:`ConfigError` naming the flag for a value no run can use.

    Covers sizes and lengths (positive integers), the optimizer's numbers (finite, not negative),
    a ``resume_from_checkpoint`` path that does not exist, and ``push_to_hub`` with the hub offline.
    """
    for name, (least, none_ok, example) in _INTEGER_MINIMUMS.items():
        if not hasattr(config, name):
            continue
        value = getattr(config, name)
        if (value is None and none_ok) or (name == "pad_to_multiple_of" and isinstance(value, str)):
            continue  # TRL's spellings ("auto", "none") are read by parse_pad_to_multiple_of
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            wanted = "a positive integer" if least == 1 else f"an integer >= {least}"
            raise ConfigError(f"{name} must be {wanted}, got {value!r}", field=name,
                              fix=f"pass e.g. --{name} {example}" + (" (or leave it unset)" if none_ok else ""))
    for name, (least, least_ok, example) in _NUMBER_MINIMUMS.items():
        value = getattr(config, name, None)
        if value is None:
            continue
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or not math.isfinite(value) or value < least or (value == least and not least_ok):
            wanted = f"a finite number {'>=' if least_ok else '>'} {least:g}"
            raise ConfigError(f"{name} must be {wanted}, got {value!r}", field=name, fix=f"pass e.g. --{name} {example}")
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {value!r}", field=name,
                              fix=f"pass e.g. --{name} {'0.9' if name == 'adam_beta1' else '0.999'}")
    resume = getattr(config, "resume_from_checkpoint", None)
    if isinstance(resume, (str, os.PathLike)) and str(resume).strip().lower() not in _RESUME_KEYWORDS:
        if not os.path.isdir(resume):
            raise ConfigError(
                f"no checkpoint directory at '{resume}'" + (" (it is a file)" if os.path.exists(resume) else ""),
                field="resume_from_checkpoint",
                fix="pass a checkpoint-N directory written by an earlier run, or drop the flag to start afresh",
            )
    if getattr(config, "push_to_hub", False):
        from huggingface_hub import is_offline_mode

        if is_offline_mode():
            raise ConfigError(
                "push_to_hub needs the Hugging Face Hub, but offline mode is on (HF_HUB_OFFLINE=1)",
                field="push_to_hub",
                fix="drop --push_to_hub (the model is saved in output_dir), or unset HF_HUB_OFFLINE and log in",
            )


def _parse_json_field(text: str, name: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"could not parse {text!r} as JSON ({err.msg})", field=name,
                          fix='pass a JSON object, e.g. \'{"dtype": "bfloat16"}\'') from None
    if not isinstance(value, dict):
        raise ConfigError(f"expected a JSON object, got {text!r}", field=name, fix='pass e.g. \'{"dtype": "bfloat16"}\'')
    return value


def parse_pad_to_multiple_of(value: int | str | None) -> int | None:
    """TRL's spellings of ``pad_to_multiple_of``: an int, ``None``/``"none"``, a number as text, or
    ``"auto"`` (TRL: 128 on AWS Neuron, which compiles once per shape; no padding elsewhere, and
    posttrain runs on no Neuron device)."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        result = value
    elif isinstance(value, str) and value.strip().lower() in ("auto", "none", "null", ""):
        result = None
    else:
        try:
            result = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"pad_to_multiple_of must be a whole number, 'auto' or None, got {value!r}",
                              field="pad_to_multiple_of", fix="pass e.g. 8, or leave it unset") from None
    if result is not None and result < 1:
        raise ConfigError(f"pad_to_multiple_of must be at least 1, got {result}", field="pad_to_multiple_of",
                          fix="pass e.g. 8, or leave it unset")
    return result


def parse_json_field(value: dict | str | None, name: str) -> dict | None:
    """A dict field given as a dict, as JSON text (the command line), or ``None``."""
    return _parse_json_field(value, name) if isinstance(value, str) else value


def configure_tokenizer(tokenizer: Any, args: Any) -> None:
    """Apply the config's ``chat_template_path`` and ``pad_token`` to ``tokenizer`` (in place)."""
    from posttrain.data.templates import load_chat_template

    path = getattr(args, "chat_template_path", None)
    if path:
        tokenizer.chat_template = load_chat_template(path, trust_remote_code=getattr(args, "trust_remote_code", False))
    pad_token = getattr(args, "pad_token", None)
    if pad_token is not None:
        if pad_token not in tokenizer.get_vocab():
            raise ConfigError(
                f"pad_token {pad_token!r} is not in the tokenizer's vocabulary", field="pad_token",
                fix="name a token the tokenizer has (e.g. its EOS token), or add it to the tokenizer first",
            )
        tokenizer.pad_token = pad_token
