"""What every posttrain trainer shares: resolving the model, tokenizer, config and adapters, and
keeping per-step metrics.

Each method's trainer subclasses :class:`PosttrainTrainer` (itself a ``transformers.Trainer``),
calls the ``resolve_*`` helpers in its constructor, prepares its data through
:mod:`posttrain.data`, and implements ``compute_loss``. The optimizer, gradient accumulation,
distributed training, checkpoints and callbacks stay with ``transformers.Trainer``.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)

from posttrain.errors import ConfigError
from posttrain.models.wrappers import is_peft_model
from posttrain.trainers.config import PosttrainConfig, configure_tokenizer, note_alias_once, settle_gloo_workers_at_exit

logger = logging.getLogger("posttrain")


# ----------------------------------------------------------------------------- resolution helpers


def model_id_of(model: str | nn.Module) -> str:
    """A short, path-safe name for a model: its directory or hub name."""
    if isinstance(model, str):
        return model.rstrip("/")
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or type(model).__name__).rstrip("/")


def resolve_args(args: TrainingArguments | None, model: str | nn.Module, config_class: type, method: str):
    """Return a ``config_class`` instance: the user's, a converted ``TrainingArguments``, or defaults.

    With ``args=None`` the output goes to ``<model name>-<method>`` in the working directory.
    """
    if args is None:
        name = os.path.basename(model_id_of(model)) or "model"
        return config_class(output_dir=f"{name}-{method}")
    if isinstance(args, config_class):
        return args
    if isinstance(args, TrainingArguments):
        # a plain TrainingArguments (or another method's config): keep every value both know
        known = {f for f in config_class.__dataclass_fields__ if f in type(args).__dataclass_fields__}
        values = {k: getattr(args, k) for k in known if k not in ("_n_gpu",) and not k.startswith("_")}
        values.pop("warmup_ratio", None)
        return config_class(**{k: v for k, v in values.items() if _is_init_field(config_class, k)})
    raise ConfigError(
        f"args must be a {config_class.__name__} (or TrainingArguments), got {type(args).__name__}",
        fix=f"pass args={config_class.__name__}(output_dir=...)",
    )


def _is_init_field(cls: type, name: str) -> bool:
    f = cls.__dataclass_fields__.get(name)
    return f is not None and f.init


def default_model_dtype(args: PosttrainConfig) -> Any:
    """float32 on CPU; the checkpoint's own dtype on a GPU (the Trainer's autocast does the rest)."""
    if args.use_cpu or not torch.cuda.is_available():
        return torch.float32
    return "auto"


def load_pretrained(
    model: str | nn.Module,
    args: PosttrainConfig,
    auto_class: type = AutoModelForCausalLM,
    extra_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Load ``model`` when it is a path or hub id (with ``args.model_init_kwargs``); return instances as they are."""
    if not isinstance(model, str):
        if args.model_init_kwargs:
            logger.warning("model_init_kwargs is ignored because `model` is already instantiated.")
        return model
    kwargs: dict[str, Any] = dict(args.model_init_kwargs or {})
    if "torch_dtype" in kwargs:
        note_alias_once("torch_dtype", "dtype", "model_init_kwargs")
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    kwargs.setdefault("dtype", default_model_dtype(args))
    if isinstance(kwargs["dtype"], str) and kwargs["dtype"] not in ("auto",):
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    kwargs.update(extra_kwargs or {})
    if getattr(args, "trust_remote_code", False):
        kwargs.setdefault("trust_remote_code", True)
    _check_gpu_only_requests(kwargs)
    check_model_directory(model)
    from safetensors import SafetensorError

    try:
        # weights the checkpoint lacks (a reward head) are drawn from the run's seed, not the process's state
        with torch.random.fork_rng(devices=[]):  # the Trainer seeds the GPUs with the same seed next
            torch.manual_seed(args.seed)
            return auto_class.from_pretrained(model, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        damaged = isinstance(err, SafetensorError) or "deserializ" in str(err)
        raise ConfigError(
            f"could not load model '{model}': "
            + ("its weights file is damaged or truncated, " if damaged else "")
            + f"{type(err).__name__}: {_first_line(err)}",
            field="model_name_or_path",
            fix="copy or save the weights again (an interrupted copy or download leaves a short file)" if damaged
            else "pass a local model directory (`posttrain init-model DIR` makes a tiny one) or a reachable hub id"
            if isinstance(err, OSError)
            else "check that the directory holds a complete model saved with save_pretrained, and the "
            "model_init_kwargs (dtype, attn_implementation)",
        ) from None


_MODEL_CONFIG_FILES = ("config.json", "adapter_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "tekken.json")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_local_path(model: str) -> bool:
    """A path rather than a hub id ("name" or "owner/name")."""
    return os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def check_model_directory(model: str, field: str = "model_name_or_path") -> None:
    """Raise a :class:`ConfigError` when ``model`` names a local path that holds no loadable model."""
    if not isinstance(model, str) or not _is_local_path(model):
        return  # a hub id: from_pretrained says what is wrong with it
    if not os.path.isdir(model):
        raise ConfigError(
            f"could not load model '{model}': "
            + ("it is a file, not a model directory" if os.path.exists(model) else "no such directory"),
            field=field,
            fix="pass a directory written by save_pretrained (`posttrain init-model DIR` makes a tiny one)",
        )
    if not any(os.path.isfile(os.path.join(model, name)) for name in _MODEL_CONFIG_FILES):
        raise ConfigError(
            f"could not load model '{model}': the directory has no config.json",
            field=field,
            fix="point at the directory that save_pretrained wrote (it holds config.json and the weights), "
            "e.g. a checkpoint-N folder or the run's output_dir",
        )


def _check_gpu_only_requests(kwargs: dict[str, Any]) -> None:
    attn = kwargs.get("attn_implementation")
    if attn and "flash" in str(attn):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"attn_implementation='{attn}' needs a CUDA GPU and this machine has none",
                field="attn_implementation", fix="use 'sdpa' (the default) or 'eager'",
            )
        import importlib.util

        if str(attn) == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(
                "attn_implementation='flash_attention_2' needs the flash-attn package, which is not installed",
                field="attn_implementation", fix="pip install flash-attn, or use 'sdpa'",
            )
    quant = kwargs.get("quantization_config")
    if quant is not None and getattr(quant, "quant_method", None) in ("bitsandbytes", "bitsandbytes_4bit", "bitsandbytes_8bit"):
        if not torch.cuda.is_available():
            raise ConfigError(
                "bitsandbytes quantization (load_in_4bit / load_in_8bit) needs a CUDA GPU and this machine has none",
                field="load_in_4bit", fix="drop the quantization flags on CPU",
            )


def resolve_processing_class(processing_class, tokenizer, model: str | nn.Module, owner: str, args=None):
    """The tokenizer to use: ``processing_class``, its older name ``tokenizer``, or the model's own;
    ``args`` (a config) brings ``trust_remote_code``, ``pad_token`` and ``chat_template_path``."""
    if tokenizer is not None:
        if processing_class is not None and processing_class is not tokenizer:
            raise ConfigError(
                "both processing_class and tokenizer were given", field="tokenizer",
                fix="pass only processing_class (tokenizer is its older name)",
            )
        note_alias_once("tokenizer", "processing_class", owner)
        processing_class = tokenizer
    if processing_class is None:
        source = model if isinstance(model, str) else model_id_of(model)
        if isinstance(model, str):
            check_model_directory(model)
        if os.path.isdir(source) and not any(os.path.isfile(os.path.join(source, f)) for f in _TOKENIZER_FILES):
            # AutoTokenizer would build an empty tokenizer from config.json alone: every text would encode to nothing
            raise ConfigError(
                f"'{source}' holds no tokenizer files (e.g. tokenizer.json or tokenizer_config.json)",
                field="model_name_or_path",
                fix="save the tokenizer beside the model (tokenizer.save_pretrained(DIR)), "
                "or pass processing_class=AutoTokenizer.from_pretrained(...)",
            )
        try:
            trust = {"trust_remote_code": True} if getattr(args, "trust_remote_code", False) else {}
            processing_class = AutoTokenizer.from_pretrained(source, **trust)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"could not load a tokenizer for '{source}': {_first_line(err)}",
                field="model_name_or_path" if isinstance(model, str) else None,
                fix="pass a model directory or hub id that includes its tokenizer, "
                "or processing_class=AutoTokenizer.from_pretrained(...)",
            ) from None
    tok = getattr(processing_class, "tokenizer", processing_class)
    if args is not None:
        configure_tokenizer(tok, args)
    if getattr(tok, "pad_token", None) is None:
        if getattr(tok, "eos_token", None) is None:
            raise ConfigError(
                "the tokenizer has neither a pad token nor an EOS token", field="processing_class",
                fix="set tokenizer.pad_token before training",
            )
        tok.pad_token = tok.eos_token
    return processing_class


def apply_peft(model: nn.Module, peft_config, args: PosttrainConfig) -> nn.Module:
    """Wrap ``model`` with a PEFT adapter (LoRA etc.) when ``peft_config`` is given."""
    if peft_config is None:
        return model
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ConfigError(
            "the model already carries a PEFT adapter and peft_config was given too",
            field="peft_config", fix="merge the adapter first (model.merge_and_unload()) or drop peft_config",
        )
    if getattr(args, "gradient_checkpointing", False) and hasattr(model, "enable_input_require_grads"):
        # with frozen embeddings, checkpointed blocks would otherwise see inputs without grad
        model.enable_input_require_grads()
    # the adapter's initial weights come from args.seed, not from whatever the global RNG went through
    # before (a script's own sampling, another model's init), and the caller's RNG state is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return get_peft_model(model, peft_config)


def require_train_dataset(train_dataset, owner: str) -> None:
    """Offline trainers train on a dataset given at construction, as in TRL (which raises there too)."""
    if train_dataset is None:
        raise ConfigError(
            f"{owner} needs a train_dataset", field="train_dataset",
            fix="pass train_dataset=... (to evaluate only, build the trainer with the data and call evaluate())",
        )


def router_aux_loss_requested(model: nn.Module, *, adds_router_loss: bool) -> bool:
    """Whether the model's config asks a mixture-of-experts model for router logits (``output_router_logits``).

    SFT and DPO then add ``router_aux_loss_coef * aux_loss`` (:func:`posttrain.models.lm_head.router_loss_term`);
    a trainer whose loss does not (``adds_router_loss=False``) says so once.
    """
    config = getattr(unwrapped_pretrained(model), "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    requested = bool(getattr(text_config, "output_router_logits", False))
    if requested and not adds_router_loss:
        logger.warning(
            "the model config sets output_router_logits=True: this trainer does not add the MoE router "
            "load-balancing loss to its loss (router_aux_loss_coef has no effect); set output_router_logits=False "
            "to silence this."
        )
    return requested


def apply_sequence_memory_options(model: nn.Module, args: TrainingArguments) -> None:
    """``activation_offloading`` and ``tiled_mlp`` on the model being trained (in place; see docs/long-sequences.md)."""
    if getattr(args, "activation_offloading", False):
        from posttrain.models.offload import enable_activation_offloading

        enable_activation_offloading(model)
    if getattr(args, "tiled_mlp", False):
        from posttrain.models.tiling import enable_tiled_mlp

        enable_tiled_mlp(model, args.sequence_tile_size)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode deep copy: the default reference model."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model of a PEFT model (the reference policy) without a second copy in memory."""
    unwrapped = model
    while hasattr(unwrapped, "module") and isinstance(unwrapped.module, nn.Module):
        unwrapped = unwrapped.module
    ctx = unwrapped.disable_adapter() if is_peft_model(unwrapped) else nullcontext()
    with ctx:
        yield


# ----------------------------------------------------------------------------- the base trainer


class PosttrainTrainer(Trainer):
    """A ``transformers.Trainer`` with per-step metrics and posttrain's loss-normalisation hooks.

    Subclasses set ``method_name`` and ``config_class`` and implement ``compute_loss``. Losses that
    are normalised over the whole accumulated batch set ``loss_is_scaled_for_ga = True`` and
    override :meth:`count_loss_items`.
    """

    method_name: ClassVar[str] = "base"
    config_class: ClassVar[type] = PosttrainConfig
    # the config field bounding the tokens a rollout appends to a prompt; None for methods that do not sample
    completion_length_field: ClassVar[str | None] = None

    def __init__(self, *args, **kwargs) -> None:
        from posttrain.report.metrics import MetricsFileCallback
        from posttrain.report.run_record import RunReportCallback

        if not hasattr(self, "_metrics"):
            self._init_metrics()
        super().__init__(*args, **kwargs)
        settle_gloo_workers_at_exit()
        self.metrics_file = MetricsFileCallback()
        self.add_callback(self.metrics_file)
        self._install_run_safety()
        self.add_callback(RunReportCallback(self.describe_run))
        from posttrain.models.lm_head import check_output_heads

        # a head transformation the chunked log-probs do not know falls back to full logits, with a warning
        check_output_heads(self.model, getattr(getattr(self, "reference", None), "model", None))
        apply_sequence_memory_options(self.model, self.args)
        self._check_learned_positions()

    def _check_learned_positions(self) -> None:
        """For a model with a learned position table (GPT-2 style): every prepared row must fit it, and every
        forward checks its positions, so a too-long sequence is a clear error rather than an index error."""
        from posttrain.data.load import describe_source
        from posttrain.models.positions import check_rows_fit_positions, guard_position_table

        if guard_position_table(self.model) is None:
            return
        guard_position_table(getattr(getattr(self, "reference", None), "model", None))
        named = [("train dataset", self.train_dataset)]
        if isinstance(self.eval_dataset, dict):
            named += [(f"eval dataset '{name}'", dataset) for name, dataset in self.eval_dataset.items()]
        elif self.eval_dataset is not None:
            named.append(("eval dataset", self.eval_dataset))
        field = self.completion_length_field
        completion = dict(completion_tokens=getattr(self.args, field), completion_field=field) if field else {}
        for fallback, dataset in named:
            if dataset is not None:
                check_rows_fit_positions(self.model, dataset, source=describe_source(dataset, fallback=fallback),
                                         **completion)

    def _install_run_safety(self) -> None:
        """Skip non-finite optimizer steps, warn about unhealthy logs, write checkpoints atomically."""
        from posttrain.trainers.checkpoint import install_atomic_checkpoints
        from posttrain.trainers.guard import NonFiniteGuard
        from posttrain.trainers.health import HealthWarnings

        self.nonfinite_guard = NonFiniteGuard(self, getattr(self.args, "max_consecutive_nonfinite_steps", 3))
        self.add_callback(self.nonfinite_guard)
        self.add_callback(HealthWarnings(self))
        install_atomic_checkpoints(self)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """``resume_from_checkpoint``: True/"true" (newest complete checkpoint), False/"false", or a directory."""
        from posttrain.trainers.checkpoint import checkpoint_step, resolve_resume

        checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        self.metrics_file.resume_step = checkpoint_step(checkpoint)
        return super().train(checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite_guard.observe_loss(loss)
        return loss

    def add_callback(self, callback) -> None:
        """Add a callback; the run report stays last, so it sees what every other callback logged at the end."""
        from posttrain.report.run_record import RunReportCallback

        super().add_callback(callback)
        callbacks = self.callback_handler.callbacks
        reports = [cb for cb in callbacks if isinstance(cb, RunReportCallback)]
        for report in reports:
            callbacks.remove(report)
        callbacks.extend(reports)

    def describe_run(self) -> tuple[str, str, str | None]:
        """(method, base model, data description) for the run report and the model card."""
        from posttrain.data.load import describe_source

        method = {"onlinedpo": "online_dpo"}.get(self.method_name.lower(), self.method_name.lower())
        dataset = self.train_dataset
        data = None
        if dataset is not None:
            size = len(dataset) if hasattr(dataset, "__len__") else None
            data = describe_source(dataset) + (f" ({size:,} rows)" if size is not None else "")
        return method, model_id_of(unwrapped_pretrained(self.model)), data

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        self.write_model_card(output_dir or self.args.output_dir)

    def write_model_card(self, model_dir: str) -> None:
        """``<model_dir>/README.md`` for a saved model (main process only)."""
        if not self.args.should_save:
            return
        from posttrain.report.metrics import read_metrics
        from posttrain.report.run_record import write_model_card

        method, model_name, data = self.describe_run()
        write_model_card(model_dir, method=method, model_name=model_name, dataset=data, args=self.args,
                         records=read_metrics(self.args.output_dir),
                         is_peft=is_peft_model(unwrapped_pretrained(self.model)) or is_peft_model(self.model))

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create the hub repository for ``push_to_hub``; a network or login failure is one ConfigError."""
        try:
            super().init_hf_repo(token=token, private=private)
        except Exception as err:  # noqa: BLE001 - HTTP, connection, offline and login errors all mean the same
            raise ConfigError(
                f"could not create the hub repository for push_to_hub ({type(err).__name__}: {_first_line(err)})",
                field="push_to_hub",
                fix="check the network and `hf auth login` (or --hub_token), or drop --push_to_hub",
            ) from None

    def _init_metrics(self) -> None:
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._cumulative: dict[str, float] = defaultdict(float)

    def record_metrics(self, values: dict[str, float | torch.Tensor]) -> None:
        """Add one micro-batch's metrics; they are averaged at the next log."""
        mode = "train" if self.model.training else "eval"
        bucket = self._metrics[mode]
        for name, value in values.items():
            bucket[name].append(float(value.item() if torch.is_tensor(value) else value))

    def mean_logged_metrics(self, logged: dict[str, list[float]]) -> dict[str, float]:
        """The mean of each metric reward functions logged (``log_metric``), over every call on every process.

        A collective: every process calls it at the same step."""
        names = sorted(logged)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            # every process reduces the same names in the same order, including names only others logged
            names = sorted(set(gather_object(names)))
        if not names:
            return {}
        device = self.accelerator.device
        totals = torch.tensor([[sum(logged.get(name, [])), len(logged.get(name, []))] for name in names],
                              dtype=torch.float32, device=device)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        return {name: float(total / count) for name, (total, count) in zip(names, totals.tolist()) if count}

    def gather_mean(self, value: torch.Tensor) -> float:
        """Mean of a tensor over all processes."""
        gathered = self.accelerator.gather_for_metrics(value.detach().float().reshape(-1))
        return float(gathered.mean().item()) if gathered.numel() else float("nan")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        # a named eval set (eval_dataset={"a": ...}) logs its metrics as eval_a_<name>
        prefix = f"{getattr(self, '_eval_metric_prefix', None) or 'eval'}_" if mode == "eval" else ""
        bucket = getattr(self, "_metrics", {}).get(mode, {})
        for name, values in bucket.items():
            if values:
                logs[prefix + name] = sum(values) / len(values)
        if hasattr(self, "_metrics"):
            self._metrics[mode].clear()
        if mode == "train":
            for name, total in getattr(self, "_cumulative", {}).items():
                logs[name] = total
            if hasattr(self, "nonfinite_guard"):
                self.nonfinite_guard.after_log()
        super().log(logs, start_time)

    def sampling_precision(self):
        """A context in which rollouts sample with the numerics of the training forward.

        accelerate runs a mixed-precision model under autocast by wrapping its ``forward``; the rollout
        engine's decode step does not go through ``forward``, so sampling enters the same autocast here.
        """
        return self.accelerator.autocast()

    # -- loss normalisation over the accumulated batch

    def count_loss_items(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """How many loss terms (e.g. target tokens) a micro-batch holds; ``None`` to let the Trainer decide."""
        return None

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        counts = [self.count_loss_items(batch) for batch in batch_samples]
        if not counts or any(c is None for c in counts):
            return super()._get_num_items_in_batch(batch_samples, device)
        total = torch.stack([torch.as_tensor(c, device=device).reshape(()) for c in counts]).sum()
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return total

    def scale_for_devices(self, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """Undo DDP's gradient averaging when the loss is already normalised by a global item count."""
        if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes
        return loss

    # -- evaluation: the training loss, plus predictions and labels for compute_metrics

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """Evaluate as ``transformers.Trainer`` does, preparing a raw ``eval_dataset`` (or a dict of named
        ones, whose metrics are prefixed ``eval_<name>_``) the way the constructor prepares its own."""
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            if isinstance(eval_dataset, dict):
                metrics: dict[str, float] = {}
                for name, dataset in eval_dataset.items():
                    metrics.update(self.evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
                return metrics
            eval_dataset = self.prepare_eval_dataset(eval_dataset, "eval dataset")
        outer_prefix, self._eval_metric_prefix = getattr(self, "_eval_metric_prefix", None), metric_key_prefix
        try:
            return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._eval_metric_prefix = outer_prefix

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        output = super().predict(self.prepare_eval_dataset(test_dataset, "test dataset"), ignore_keys, metric_key_prefix)
        self._metrics["eval"].clear()  # predict logs nothing: its batches' metrics must not leak into the next evaluation
        return output

    def prepare_eval_dataset(self, dataset, name: str):
        """A dataset given to ``evaluate``/``predict`` after construction, made ready for the collator
        (tokenized etc.); datasets that are already prepared come back as they are."""
        return dataset

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            if prediction_loss_only:
                return self.compute_loss(model, inputs).detach(), None, None
            loss, predictions, labels = self.evaluation_step(model, inputs)
        return loss.detach(), predictions, labels

    def evaluation_step(self, model, inputs: dict[str, Any]):
        """(loss, predictions, labels) of one evaluation batch, for ``compute_metrics``.

        The evaluation loop applies ``preprocess_logits_for_metrics`` to ``predictions`` batch by batch,
        gathers them over processes and concatenates them. Methods that have predictions to give
        override this; the default gives the loss alone, and ``compute_metrics`` is then not called.
        """
        return self.compute_loss(model, inputs), None, None


def unwrapped_pretrained(model: nn.Module) -> PreTrainedModel | nn.Module:
    """The transformers model inside DDP/PEFT wrappers (for saving, configs, generation)."""
    from posttrain.models.lm_head import unwrap_model

    return unwrap_model(model)
