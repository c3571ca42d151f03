from __future__ import annotations

import re

import pytest

from posttrain.eval.reward_model import top_answer_accuracy
from posttrain.models.tiny import tiny_model_path
from posttrain.tasks import get_task


@pytest.fixture
def task():
    return get_task("arithmetic", max_operand=5, ops=("+",))


def _operands(prompt) -> tuple[int, int]:
    a, b = re.findall(r"(\d+) \+ (\d+)", prompt[-1]["content"])[-1]
    return int(a), int(b)


def _scorer(offset_for):
    """Scores an answer by closeness to (the true sum + offset_for(a, b)): its favourite is that number."""
    def score(prompts, completions, **kwargs):
        values = []
        for prompt, completion in zip(prompts, completions):
            a, b = _operands(prompt)
            values.append(-abs(int(completion[-1]["content"]) - (a + b + offset_for(a, b))))
        return values
    return score


def test_counts_problems_whose_favourite_answer_is_correct(task):
    problems = task.make_problems(40, split="train", seed=0)
    candidates = list(range(0, 12))
    assert top_answer_accuracy(_scorer(lambda a, b: 0), problems, candidates, task=task) == 1.0
    assert top_answer_accuracy(_scorer(lambda a, b: 1), problems, candidates, task=task) == 0.0
    # right only where the first operand is even
    expected = sum(int(re.findall(r"\d+", p["question"])[0]) % 2 == 0 for p in problems) / len(problems)
    assert 0 < expected < 1
    odd_wrong = _scorer(lambda a, b: a % 2)
    assert top_answer_accuracy(odd_wrong, problems, candidates, task=task) == pytest.approx(expected)


def test_reads_a_reward_model_directory(task):
    problems = task.make_problems(6, split="test", seed=0)
    value = top_answer_accuracy(tiny_model_path("qwen2", "tiny", reward=True), problems, list(range(11)), task=task)
    assert 0.0 <= value <= 1.0
    assert (value * len(problems)).is_integer()
