from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.errors import DataError
from posttrain.eval.accuracy import evaluate_task
from posttrain.models.tiny import tiny_model_path
from posttrain.tasks import ArithmeticTask

_QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")


class ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM: answers each prompt with ``reply(a, op, b)`` then EOS, and records
    what ``generate`` was given so the test can check padding."""

    def __init__(self, tokenizer, reply):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.reply = reply
        self.calls = []

    def generate(self, input_ids, attention_mask, generation_config):
        self.calls.append((input_ids.clone(), attention_mask.clone(), self.training, torch.is_inference_mode_enabled()))
        replies = []
        for row, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(row[mask.bool()])
            a, op, b = _QUESTION.findall(prompt)[-1]
            text = self.reply(int(a), op, int(b))
            replies.append(self.tokenizer(text, add_special_tokens=False)["input_ids"] + [generation_config.eos_token_id])
        width = max(len(r) for r in replies)
        pad = generation_config.pad_token_id
        new = torch.tensor([r + [pad] * (width - len(r)) for r in replies])
        return torch.cat([input_ids, new], dim=1)


def _value(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


@pytest.fixture(scope="module")
def tiny():
    path = tiny_model_path("qwen2", "tiny")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_a_model_that_always_answers_correctly_scores_one(tiny):
    _, tokenizer = tiny
    task = ArithmeticTask()
    model = ScriptedModel(tokenizer, lambda a, op, b: str(_value(a, op, b)))
    model.train()
    result = evaluate_task(model, tokenizer, task, task.make_problems(70, split="test"), batch_size=32)
    assert result["accuracy"] == 1.0 and result["n"] == 70 and result["correct"] == 70
    assert len(model.calls) == 3  # 32 + 32 + 6
    assert model.training and tokenizer.padding_side == "right"  # both restored
    input_ids, attention_mask, was_training, inference_mode = model.calls[0]
    assert not was_training and inference_mode
    # left padding: every prompt ends at the right edge, and at least one row was padded
    assert attention_mask[:, -1].all()
    assert (input_ids[attention_mask == 0] == tokenizer.pad_token_id).all()
    assert (attention_mask == 0).any()
    sample = result["samples"][0]
    assert set(sample) == {"prompt", "completion", "answer", "correct"}
    assert sample["prompt"].startswith("<|im_start|>user\nWhat is ") and sample["prompt"].endswith("<|im_start|>assistant\n")
    assert sample["completion"] == str(sample["answer"])  # only new tokens, special tokens dropped


def test_accuracy_counts_exactly_the_correct_rows(tiny):
    _, tokenizer = tiny
    task = ArithmeticTask()
    problems = task.make_problems(40, split="test")
    # right on even answers, off by one on odd ones
    model = ScriptedModel(tokenizer, lambda a, op, b: str(_value(a, op, b) + _value(a, op, b) % 2))
    result = evaluate_task(model, tokenizer, task, problems, n_samples=40)
    expected = sum(p["answer"] % 2 == 0 for p in problems)
    assert result["correct"] == expected and result["accuracy"] == pytest.approx(expected / 40)
    assert [s["correct"] for s in result["samples"]] == [p["answer"] % 2 == 0 for p in problems]


def test_only_new_tokens_are_scored(tiny):
    _, tokenizer = tiny
    task = ArithmeticTask()
    # the answer equals the last number in the prompt, so scoring the prompt too would pass
    problems = [{"question": "What is 0 + 12?", "answer": 12}, {"question": "What is 5 - 0?", "answer": 5}]
    model = ScriptedModel(tokenizer, lambda a, op, b: "")
    assert evaluate_task(model, tokenizer, task, problems)["accuracy"] == 0.0


def test_prompt_only_datasets_and_plain_text_prompts(tiny):
    _, tokenizer = tiny
    task = ArithmeticTask()
    model = ScriptedModel(tokenizer, lambda a, op, b: f" {_value(a, op, b)}")
    chat = evaluate_task(model, tokenizer, task, task.as_prompt_only(10, split="test"))
    assert chat["accuracy"] == 1.0 and chat["n"] == 10
    text = evaluate_task(model, tokenizer, task, task.as_prompt_only(10, conversational=False, split="test"))
    assert text["samples"][0]["prompt"].startswith("Question: ") and text["accuracy"] == 1.0
    plain = evaluate_task(model, tokenizer, task, task.make_problems(5), conversational=False)
    assert plain["samples"][0]["prompt"] == task.text_prompt(task.make_problems(5)[0])
    counted = evaluate_task(model, tokenizer, task, 12)  # an int means that many test problems
    assert counted["n"] == 12 and counted["accuracy"] == 1.0


def test_bad_rows_raise_data_errors(tiny):
    _, tokenizer = tiny
    model = ScriptedModel(tokenizer, lambda a, op, b: "0")
    with pytest.raises(DataError, match="row 1"):
        evaluate_task(model, tokenizer, ArithmeticTask(), [{"question": "What is 1 + 1?", "answer": 2}, {"text": "x"}])


def test_untrained_model_scores_about_zero(tiny):
    model, tokenizer = tiny
    task = ArithmeticTask()
    result = evaluate_task(model, tokenizer, task, 48, max_new_tokens=8, batch_size=16)
    assert result["n"] == 48
    assert result["accuracy"] <= 0.1
    assert all(isinstance(s["completion"], str) for s in result["samples"])


def test_batching_does_not_change_greedy_answers(tiny):
    model, tokenizer = tiny
    task = ArithmeticTask()
    problems = task.make_problems(6, split="test")
    one_by_one = evaluate_task(model, tokenizer, task, problems, batch_size=1, max_new_tokens=3, n_samples=6)
    batched = evaluate_task(model, tokenizer, task, problems, batch_size=6, max_new_tokens=3, n_samples=6)
    assert [s["completion"] for s in one_by_one["samples"]] == [s["completion"] for s in batched["samples"]]


def test_works_with_a_peft_model(tiny):
    peft = pytest.importorskip("peft")
    model, tokenizer = tiny
    task = ArithmeticTask()
    problems = task.make_problems(8, split="test")
    base = evaluate_task(model, tokenizer, task, problems, max_new_tokens=4, n_samples=8)
    wrapped = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(model.name_or_path),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    adapted = evaluate_task(wrapped, tokenizer, task, problems, max_new_tokens=4, n_samples=8)
    # LoRA starts as a no-op, so greedy answers must match the base model's exactly
    assert adapted["n"] == 8
    assert [s["completion"] for s in adapted["samples"]] == [s["completion"] for s in base["samples"]]
