"""The rollout-engine interface and the factory trainers call."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from posttrain.errors import ConfigError
from posttrain.rollout.batch import RolloutBatch
from posttrain.rollout.sampling import SamplingParams

ENGINE_KINDS = ("hf", "vllm")


@runtime_checkable
class RolloutEngine(Protocol):
    """What a trainer needs from an engine: token-id prompts in, a :class:`RolloutBatch` out."""

    pad_token_id: int
    eos_token_ids: list[int]

    def generate(
        self,
        prompt_ids: list[list[int]] | torch.Tensor,
        *,
        num_generations: int = 1,
        sampling: SamplingParams | None = None,
        generator: torch.Generator | None = None,
        prompt_mask: torch.Tensor | None = None,
        prompt_keys: torch.Tensor | None = None,
    ) -> RolloutBatch: ...


def make_rollout_engine(kind: str, model: Any, tokenizer=None, **kwargs: Any) -> RolloutEngine:
    """Build a rollout engine: ``"hf"`` (:class:`HFRolloutEngine`, runs anywhere) or ``"vllm"``
    (:class:`VLLMRolloutEngine`, needs vllm and a CUDA GPU). ``kwargs`` go to the engine's constructor."""
    if kind == "hf":
        from posttrain.rollout.hf_engine import HFRolloutEngine

        return HFRolloutEngine(model, tokenizer, **kwargs)
    if kind == "vllm":
        from posttrain.rollout.vllm_engine import VLLMRolloutEngine

        return VLLMRolloutEngine(model, tokenizer, **kwargs)
    raise ConfigError(
        f"unknown rollout engine {kind!r}", field="rollout_engine", fix=f"use one of {', '.join(ENGINE_KINDS)}"
    )
