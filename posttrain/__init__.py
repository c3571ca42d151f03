"""posttrain: post-training for language models with the TRL vocabulary.

Public names are imported lazily, so ``import posttrain`` stays fast and a method's heavy
dependencies load only when that method is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "SFTConfig": "posttrain.trainers.sft",
    "SFTTrainer": "posttrain.trainers.sft",
    "RewardConfig": "posttrain.trainers.reward",
    "RewardTrainer": "posttrain.trainers.reward",
    "DPOConfig": "posttrain.trainers.dpo",
    "DPOTrainer": "posttrain.trainers.dpo",
    "GRPOConfig": "posttrain.trainers.grpo",
    "GRPOTrainer": "posttrain.trainers.grpo",
    "RLOOConfig": "posttrain.trainers.rloo",
    "RLOOTrainer": "posttrain.trainers.rloo",
    "PPOConfig": "posttrain.trainers.ppo",
    "PPOTrainer": "posttrain.trainers.ppo",
    "OnlineDPOConfig": "posttrain.trainers.online_dpo",
    "OnlineDPOTrainer": "posttrain.trainers.online_dpo",
    "AutoModelForCausalLMWithValueHead": "posttrain.models.value_head",
    "DataError": "posttrain.errors",
    "ConfigError": "posttrain.errors",
    "RewardFunctionError": "posttrain.errors",
    "create_tiny_model": "posttrain.models.tiny",
    "get_task": "posttrain.tasks",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'posttrain' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from posttrain.errors import ConfigError, DataError, RewardFunctionError
    from posttrain.trainers.sft import SFTConfig, SFTTrainer
