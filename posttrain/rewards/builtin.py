"""Built-in reward functions, registered by name in :data:`BUILTIN_REWARDS`.

Each follows the protocol ``f(prompts, completions, **kwargs) -> list[float | None]`` and accepts
completions as strings or as assistant message lists.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

from posttrain.errors import ConfigError, DataError
from posttrain.rewards.text import (
    completion_text,
    extract_answer,
    last_number,
    normalize_text_answer,
    parse_number,
    reference_answer,
)

DEFAULT_FORMAT_PATTERN = r"^<think>.*?</think>\s*<answer>.*?</answer>$"
FORMAT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
TRAILING_TEXT_PENALTY_PER_CHAR = 0.001
TRAILING_TEXT_PENALTY_MAX = 0.25


def accuracy(prompts: list[Any], completions: list[Any], answer: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
    r"""1.0 when the completion's final answer equals the row's 'answer' column, else 0.0; None without an answer.

    The final answer is the content of the last ``<answer>...</answer>`` (else of the last
    ``\boxed{...}``, else the whole completion). When the reference is a number, the last number in
    the final answer is compared by value ("1,000" == "1000", "3.0" == "3", "+5" == "5", "1/2" ==
    "0.5"); otherwise the texts are compared ignoring case, surrounding spaces and a final period.
    A GSM8K-style reference ("... #### 72") counts only what follows "####".
    """
    if answer is None:
        raise DataError(
            "the accuracy reward needs the reference answer of each row",
            column="answer",
            expected="a dataset column named 'answer'",
            found="no such column",
            fix="add an 'answer' column to the dataset, or drop the accuracy reward",
        )
    rewards: list[float | None] = []
    for completion, reference in zip(completions, answer):
        gold = reference_answer(reference)
        if gold is None:
            rewards.append(None)
            continue
        predicted = extract_answer(completion_text(completion))
        gold_number = parse_number(gold)
        if gold_number is not None:
            rewards.append(1.0 if last_number(predicted) == gold_number else 0.0)
        else:
            rewards.append(1.0 if normalize_text_answer(predicted) == normalize_text_answer(gold) else 0.0)
    return rewards


def format_reward(pattern: str = DEFAULT_FORMAT_PATTERN, *, name: str = "format") -> Callable[..., list[float]]:
    """Build a reward function: 1.0 when the whole completion (stripped of surrounding whitespace)
    matches ``pattern`` (a regex, with ``re.DOTALL`` so ``.`` spans lines), else 0.0."""
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as error:
        raise ConfigError(f"format pattern {pattern!r} is not a valid regex: {error}", field="reward_funcs") from error

    def format_reward_function(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        return [1.0 if compiled.match(completion_text(c).strip()) else 0.0 for c in completions]

    format_reward_function.__name__ = name
    format_reward_function.__doc__ = f"1.0 when the completion matches {pattern!r} (DOTALL), else 0.0."
    return format_reward_function


format_ = format_reward()
format_.__doc__ = (
    "1.0 when the completion is exactly '<think>...</think>' then '<answer>...</answer>' (whitespace between "
    "allowed, nothing before or after), else 0.0."
)


def _incremental_format_score(text: str) -> float:
    text = text.strip()
    score = 0.0
    previous_end = 0
    for index, tag in enumerate(FORMAT_TAGS):
        if text.count(tag) != 1:
            continue
        position = text.find(tag)
        if index == 0 and position != 0:
            continue
        if position >= previous_end:
            score += 0.25
            previous_end = position + len(tag)
    if text.count("</answer>") == 1:
        trailing = text[text.find("</answer>") + len("</answer>") :].strip()
        score -= min(TRAILING_TEXT_PENALTY_MAX, TRAILING_TEXT_PENALTY_PER_CHAR * len(trailing))
    return score


def incremental_format(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """Partial credit for the think/answer format, up to 1.0.

    Each of ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` earns 0.25 when it occurs exactly
    once and after the earlier tags that earned credit (``<think>`` must open the completion). Text
    after ``</answer>`` costs 0.001 per character, at most 0.25.
    """
    return [_incremental_format_score(completion_text(c)) for c in completions]


def length_penalty(target: int = 256, scale: float = 1.0, *, name: str = "length_penalty") -> Callable[..., list[float]]:
    """Build a reward function: ``-scale * max(0, length - target) / target``.

    0 up to ``target``, then linearly more negative (``-scale`` at twice the target). Length is the
    number of generated tokens (``completion_ids``) when given, else characters of the text.
    """
    if not isinstance(target, int) or target < 1:
        raise ConfigError(f"length_penalty target must be a positive integer, got {target!r}", field="reward_funcs")

    def length_penalty_function(
        prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None, **kwargs: Any
    ) -> list[float]:
        if completion_ids is not None:
            lengths = [len(ids) for ids in completion_ids]
        else:
            lengths = [len(completion_text(c)) for c in completions]
        return [-scale * max(0, length - target) / target for length in lengths]

    length_penalty_function.__name__ = name
    length_penalty_function.__doc__ = (
        f"-{scale} * max(0, length - {target}) / {target}: 0 up to {target} tokens, then more negative."
    )
    return length_penalty_function


BUILTIN_REWARDS: dict[str, Callable[..., list[float | None]]] = {
    "accuracy": accuracy,
    "format": format_,
    "incremental_format": incremental_format,
    "length_penalty": length_penalty(),
}

# Built-ins that take settings, for specs such as "length_penalty(target=128, scale=0.5)".
BUILTIN_FACTORIES: dict[str, Callable[..., Callable]] = {
    "format": format_reward,
    "length_penalty": length_penalty,
}


def describe_builtins() -> str:
    """One line per built-in reward: its name and what it computes."""
    width = max(len(name) for name in BUILTIN_REWARDS)
    lines = []
    for name, function in BUILTIN_REWARDS.items():
        summary = " ".join((function.__doc__ or "").strip().split("\n\n")[0].split())
        settings = ""
        if name in BUILTIN_FACTORIES:
            parameters = inspect.signature(BUILTIN_FACTORIES[name]).parameters.values()
            defaults = ", ".join(f"{p.name}={p.default!r}" for p in parameters if p.kind is not p.KEYWORD_ONLY)
            settings = f" Settings: {name}({defaults})."
        lines.append(f"{name:<{width}}  {summary}{settings}")
    return "\n".join(lines)
