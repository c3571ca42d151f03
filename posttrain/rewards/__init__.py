"""Rewards for online methods: the reward-function protocol, built-ins, a reward-model scorer and the
loader for CLI specs.

A reward function is any callable ``f(prompts, completions, **kwargs) -> list[float | None]``; see
:mod:`posttrain.rewards.computer` for the arguments it receives.
"""

from __future__ import annotations

from posttrain.errors import RewardFunctionError
from posttrain.rewards.builtin import (
    BUILTIN_FACTORIES,
    BUILTIN_REWARDS,
    accuracy,
    describe_builtins,
    format_reward,
    incremental_format,
    length_penalty,
)
from posttrain.rewards.computer import RewardComputer, RewardOutput, reward_function_name
from posttrain.rewards.loader import load_reward_func, load_reward_funcs, resolve_reward_funcs, trl_reward_views
from posttrain.rewards.model_scorer import RewardModelScorer
from posttrain.rewards.text import completion_text, extract_answer, last_number, parse_number

__all__ = [
    "BUILTIN_FACTORIES",
    "BUILTIN_REWARDS",
    "RewardComputer",
    "RewardFunctionError",
    "RewardModelScorer",
    "RewardOutput",
    "accuracy",
    "completion_text",
    "describe_builtins",
    "extract_answer",
    "format_reward",
    "incremental_format",
    "last_number",
    "length_penalty",
    "load_reward_func",
    "load_reward_funcs",
    "parse_number",
    "resolve_reward_funcs",
    "reward_function_name",
    "trl_reward_views",
]
