"""The rollout-engine interface and the factory trainers call."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from posttrain.errors import ConfigError
from posttrain.rollout.batch import RolloutBatch
from posttrain.rollout.sampling import SamplingParams

ENGINE_KINDS = ("hf", "vllm", "server")


@runtime_checkable
class RolloutEngine(Protocol):
    """What a trainer needs from an engine: token-id prompts in, a :class:`RolloutBatch` out.

    Every attribute and method a trainer (or the evaluation suite) uses on an engine is listed here;
    ``tests/rollout/test_engine_protocol.py`` checks that each engine class implements them with these
    parameters, so a trainer can switch engines by name (``make_rollout_engine``).
    """

    pad_token_id: int
    eos_token_ids: list[int]
    device: torch.device  # where the returned tensors live

    def generate(
        self,
        prompt_ids: list[list[int]] | torch.Tensor,
        *,
        num_generations: int = 1,
        sampling: SamplingParams | None = None,
        generator: torch.Generator | None = None,
        prompt_mask: torch.Tensor | None = None,
        prompt_keys: torch.Tensor | None = None,
    ) -> RolloutBatch:
        """``num_generations`` completions per prompt, prompt-major.

        ``prompt_mask`` ``(B, P)`` marks real tokens of a left-padded ``(B, P)`` tensor of prompts;
        ``prompt_keys`` ``(B,)`` int64 (:func:`~posttrain.rollout.sampling.sampling_keys`) fix each
        prompt's draws independently of the batch (then no ``generator``).
        """
        ...

    def load_weights(self, model: torch.nn.Module) -> None:
        """Sample with ``model``'s current weights from now on (trainers call it after optimizer steps)."""
        ...


def make_rollout_engine(kind: str, model: Any, tokenizer=None, **kwargs: Any) -> RolloutEngine:
    """Build a rollout engine: ``"hf"`` (:class:`HFRolloutEngine`, runs anywhere), ``"vllm"``
    (:class:`VLLMRolloutEngine`, needs vllm and a CUDA GPU) or ``"server"`` (:class:`ServerRolloutEngine`, a client
    of ``posttrain vllm-serve``). ``kwargs`` go to the engine's constructor."""
    if kind == "hf":
        from posttrain.rollout.hf_engine import HFRolloutEngine

        return HFRolloutEngine(model, tokenizer, **kwargs)
    if kind == "vllm":
        from posttrain.rollout.vllm_engine import VLLMRolloutEngine

        return VLLMRolloutEngine(model, tokenizer, **kwargs)
    if kind == "server":
        from posttrain.rollout.server_engine import ServerRolloutEngine

        return ServerRolloutEngine(model, tokenizer, **kwargs)
    raise ConfigError(
        f"unknown rollout engine {kind!r}", field="rollout_engine", fix=f"use one of {', '.join(ENGINE_KINDS)}"
    )
