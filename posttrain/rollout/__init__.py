"""Generation for online methods: batched, KV-cached sampling with the prompt prefilled once per group.

    engine = make_rollout_engine("hf", model, tokenizer)
    batch = engine.generate(prompt_ids, num_generations=8, sampling=SamplingParams(max_completion_length=128))
    rows = RolloutSequences.from_batch(batch)  # the layout trainers hand from stage to stage
"""

from __future__ import annotations

from posttrain.rollout.batch import RolloutBatch, left_pad, right_pad
from posttrain.rollout.engine import ENGINE_KINDS, RolloutEngine, make_rollout_engine
from posttrain.rollout.hf_engine import HFRolloutEngine
from posttrain.rollout.sampling import (
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    choose_next_tokens,
    keyed_uniform,
    process_logits,
    sampling_key,
    sampling_keys,
)
from posttrain.rollout.sequences import RolloutSequences, completion_token_logps
from posttrain.rollout.server_engine import ServerRolloutEngine
from posttrain.rollout.vllm_engine import VLLMRolloutEngine

__all__ = [
    "ENGINE_KINDS",
    "HFRolloutEngine",
    "RolloutBatch",
    "RolloutEngine",
    "RolloutSequences",
    "SamplingParams",
    "ServerRolloutEngine",
    "VLLMRolloutEngine",
    "apply_min_p",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "choose_next_tokens",
    "completion_token_logps",
    "keyed_uniform",
    "left_pad",
    "make_rollout_engine",
    "process_logits",
    "right_pad",
    "sampling_key",
    "sampling_keys",
]
