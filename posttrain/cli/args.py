"""Arguments every training sub-command shares besides its method config: data and model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain.errors import ConfigError


@dataclass
class ScriptArguments:
    """Where the data comes from."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Dataset: a .json/.jsonl/.csv/.parquet file, a folder of them, or a hub id."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of a hub dataset."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on (when evaluating)."})
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "A separate dataset for evaluation (default: the test split of --dataset_name)."}
    )


@dataclass
class ModelArguments:
    """Which model to start from and how to load it; LoRA adapters."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model directory or hub id (`posttrain init-model DIR` makes a tiny one)."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    dtype: str | None = field(
        default=None, metadata={"help": "Weights dtype: auto, float32, bfloat16, float16 (default: float32 on CPU)."}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel: sdpa, eager, flash_attention_2 (GPU only)."}
    )
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (default: all-linear)."}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained fully and saved with the adapter (e.g. a value head)."}
    )
    lora_task_type: str = field(default="CAUSAL_LM", metadata={"help": "PEFT task type (SEQ_CLS for reward models)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base model in 4 bits (bitsandbytes, GPU only)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base model in 8 bits (bitsandbytes, GPU only)."})

    def model_init_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.dtype is not None:
            kwargs["dtype"] = self.dtype
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        if self.model_revision is not None:
            kwargs["revision"] = self.model_revision
        if self.load_in_4bit or self.load_in_8bit:
            import torch

            if not torch.cuda.is_available():
                flag = "load_in_4bit" if self.load_in_4bit else "load_in_8bit"
                raise ConfigError(
                    "bitsandbytes quantization needs a CUDA GPU and this machine has none", field=flag,
                    fix=f"drop --{flag} on CPU",
                )
            try:
                from transformers import BitsAndBytesConfig
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "quantized loading needs the bitsandbytes package", field="load_in_4bit", fix="pip install bitsandbytes"
                ) from None
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=self.load_in_4bit, load_in_8bit=self.load_in_8bit
            )
        return kwargs

    def peft_config(self):
        if not self.use_peft:
            return None
        from peft import LoraConfig

        targets = self.lora_target_modules or "all-linear"
        if isinstance(targets, list) and len(targets) == 1:
            targets = targets[0]
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=targets,
            modules_to_save=self.lora_modules_to_save,
            task_type=self.lora_task_type,
        )
