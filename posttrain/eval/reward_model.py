"""How good a reward model is as a target for RL, on a task with checkable answers.

Pair accuracy (the ``eval_accuracy`` of ``RewardTrainer``) says how often the reward model orders a
(correct, wrong) pair right. PPO and GRPO do something else with it: they push the policy towards
whatever the reward model scores highest. :func:`top_answer_accuracy` measures that directly: for
each problem, score every candidate answer and check whether the top-scored one is correct. It is
the accuracy a policy that maximised the reward model perfectly would reach, so it bounds what RL
against this reward model can give. A reward model can order 80% of pairs right and still prefer a
wrong answer on most problems.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def top_answer_accuracy(
    reward_model: Any,
    problems: Sequence[dict[str, Any]],
    candidates: Sequence[Any],
    *,
    task=None,
    tokenizer=None,
    system_prompt: str | None = None,
) -> float:
    """Share of ``problems`` whose highest-scored answer among ``candidates`` is the correct one.

    Args:
        reward_model: a reward-model directory, an ``AutoModelForSequenceClassification`` (then pass
            ``tokenizer``), or any reward function ``f(prompts, completions) -> list[float]`` (a
            :class:`~posttrain.rewards.RewardModelScorer` is one).
        problems: dicts with ``question`` and ``answer`` (``Task.make_problems``).
        candidates: the answers to score for every problem; include every correct answer.
        task: formats prompts and answers (``task.chat_prompt``, ``task.format_answer``); default:
            the question as one user message and ``str(answer)``.
        system_prompt: passed to ``task.chat_prompt``.
    """
    from posttrain.rewards.model_scorer import RewardModelScorer

    if callable(reward_model) and not isinstance(reward_model, torch.nn.Module):
        scorer = reward_model
    else:
        scorer = RewardModelScorer(reward_model, tokenizer=tokenizer, batch_size=max(1, len(candidates)))
    if not problems:
        return float("nan")

    def prompt(problem):
        if task is not None:
            return task.chat_prompt(problem, system_prompt=system_prompt)
        return [{"role": "user", "content": problem["question"]}]

    def completion(answer):
        text = task.format_answer(answer) if task is not None else str(answer)
        return [{"role": "assistant", "content": text}]

    answers = [completion(answer) for answer in candidates]
    correct = 0
    with torch.no_grad():
        for problem in problems:
            scores = scorer(prompts=[prompt(problem)] * len(candidates), completions=answers)
            best = max(range(len(candidates)), key=scores.__getitem__)
            correct += candidates[best] == problem["answer"]
    return correct / len(problems)
