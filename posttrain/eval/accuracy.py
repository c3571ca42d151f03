"""Exact-match accuracy of a model on an embedded task: batched greedy generation, then ``task.check``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from transformers import GenerationConfig

from posttrain.errors import ConfigError, DataError


def _rows(task: Any, problems_or_dataset: Any, conversational: bool, system_prompt: str | None) -> list[tuple[Any, Any]]:
    """(prompt, answer) pairs from problems (``question``/``answer``) or prompt-only rows (``prompt``/``answer``)."""
    if isinstance(problems_or_dataset, int):
        problems_or_dataset = task.make_problems(problems_or_dataset, split="test")
    rows: list[tuple[Any, Any]] = []
    for index, row in enumerate(problems_or_dataset):
        if not isinstance(row, dict) or "answer" not in row or ("prompt" not in row and "question" not in row):
            raise DataError("an evaluation row needs 'answer' and either 'question' or 'prompt'", source="evaluation data",
                            row=index, expected="{'question', 'answer'} or {'prompt', 'answer'}",
                            found=sorted(row) if isinstance(row, dict) else row,
                            fix="pass task.make_problems(...) or task.as_prompt_only(...)")
        if "prompt" in row:
            prompt = row["prompt"]
        elif conversational:
            prompt = task.chat_prompt(row, system_prompt)
        else:
            prompt = task.text_prompt(row)
        rows.append((prompt, row["answer"]))
    return rows


def _render(tokenizer: Any, prompt: Any) -> tuple[str, bool]:
    """Prompt text, and whether the tokenizer should still add its special tokens (plain text only)."""
    if isinstance(prompt, str):
        return prompt, True
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("conversational prompts need a tokenizer with a chat template", field="conversational",
                          fix="use a tokenizer with a chat_template, or evaluate with conversational=False")
    # the template writes any BOS itself, so tokenization must not add another
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), False


@contextmanager
def _eval_mode(model: torch.nn.Module, tokenizer: Any) -> Iterator[None]:
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues at the right edge of every row
    try:
        yield
    finally:
        tokenizer.padding_side = side
        model.train(was_training)


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Any,
    problems_or_dataset: Any,
    *,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    conversational: bool = True,
    system_prompt: str | None = None,
    n_samples: int = 5,
) -> dict[str, Any]:
    """Greedy-decode an answer to every problem and score it with ``task.check``.

    ``problems_or_dataset`` is a list of problems (``question``/``answer``), a prompt-only dataset
    (``prompt``/``answer``; string prompts are used as they are, message lists go through the chat
    template), or an int ``n`` meaning ``task.make_problems(n, split="test")``. Works with plain
    ``transformers`` models and PEFT-wrapped ones. Only the newly generated tokens are decoded.

    Returns ``{"accuracy": float, "n": int, "correct": int, "samples": [{"prompt", "completion",
    "answer", "correct"}, ...]}`` with the first ``n_samples`` rows as samples.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ConfigError("batch_size and max_new_tokens must be at least 1", field="batch_size",
                          fix="pass positive values")
    rows = _rows(task, problems_or_dataset, conversational, system_prompt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id, bos_token_id=tokenizer.bos_token_id,
    )
    device = next(model.parameters()).device
    results: list[dict[str, Any]] = []
    with _eval_mode(model, tokenizer), torch.inference_mode():
        for batch in _batches(rows, batch_size):
            rendered = [_render(tokenizer, prompt) for prompt, _ in batch]
            add_special = rendered[0][1]
            encoded = tokenizer([text for text, _ in rendered], return_tensors="pt", padding=True,
                                add_special_tokens=add_special).to(device)
            output = model.generate(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                                    generation_config=generation_config)
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            completions = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for (text, _), (_, answer), completion in zip(rendered, batch, completions):
                results.append({"prompt": text, "completion": completion, "answer": answer,
                                "correct": bool(task.check(completion, answer))})
    correct = sum(r["correct"] for r in results)
    return {
        "accuracy": correct / len(results) if results else 0.0,
        "n": len(results),
        "correct": correct,
        "samples": results[:n_samples],
    }
