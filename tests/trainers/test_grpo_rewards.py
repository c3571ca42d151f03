"""GRPO and RLOO as a TRL user's script calls them on the reward side: the keyword arguments TRL gives
reward functions (log_extra, log_metric, trainer_state, dataset columns; async functions), reward
models given by hub id with their tokenizers, and the attributes callbacks read."""

import asyncio
import json
import os

import pytest
import torch
from datasets import Dataset

from posttrain import ConfigError, GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer


@pytest.fixture(scope="module")
def tiny_model():
    from posttrain.models.tiny import tiny_model_path

    return tiny_model_path()


def _dataset(n=4):
    return Dataset.from_list([{"prompt": f"What is {i} + 1?", "answer": str(i + 1), "level": i % 2} for i in range(n)])


def _args(tmp_path, config=GRPOConfig, **overrides):
    values = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=4, max_steps=1, logging_steps=1, save_strategy="no", disable_tqdm=True,
                  report_to="none")
    values.update(overrides)
    return config(**values)


def _records(tmp_path, name):
    with open(os.path.join(tmp_path, "run", name), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_metrics_logged_by_a_reward_function_reach_the_logs_and_metrics_file(tiny_model, tmp_path):
    def judged(completions, log_metric, **kwargs):
        lengths = [len(c) for c in completions]
        log_metric("judge/mean_chars", sum(lengths) / len(lengths))
        log_metric("judge/calls", 1.0)
        return [float(n) for n in lengths]

    trainer = GRPOTrainer(model=tiny_model, reward_funcs=judged, args=_args(tmp_path), train_dataset=_dataset())
    trainer.train()
    logged = [record for record in _records(tmp_path, "metrics.jsonl") if "loss" in record]
    assert logged and logged[0]["judge/calls"] == 1.0
    # the function's own figure is the mean reward it returned
    assert logged[0]["judge/mean_chars"] == pytest.approx(logged[0]["rewards/judged/mean"], rel=1e-5)
    assert "judge/mean_chars" in trainer.state.log_history[0]


def test_columns_logged_by_a_reward_function_join_the_completions_table(tiny_model, tmp_path, capsys):
    def verdicts(completions, log_extra, **kwargs):
        log_extra("verdict", ["long" if len(c) > 8 else "short" for c in completions])
        log_extra("reward", list(range(len(completions))))  # a name the table uses is kept apart
        return [0.0] * len(completions)

    trainer = GRPOTrainer(model=tiny_model, reward_funcs=verdicts, args=_args(tmp_path, log_completions=True),
                          train_dataset=_dataset())
    trainer.train()
    rows = _records(tmp_path, "completions.jsonl")
    assert len(rows) == 4
    assert [row["verdict"] for row in rows] == ["long" if len(row["completion"]) > 8 else "short" for row in rows]
    assert sorted(row["reward_extra"] for row in rows) == [0, 1, 2, 3] and all(row["reward"] == 0.0 for row in rows)
    assert "verdict" in capsys.readouterr().out


def test_async_reward_functions_are_awaited_and_receive_state_and_columns(tiny_model, tmp_path):
    seen = {}

    async def remote_judge(completions, answer, level, trainer_state, **kwargs):
        await asyncio.sleep(0)
        seen.update(answer=answer, level=level, step=trainer_state.global_step)
        return [1.0] * len(completions)

    async def second_judge(completions, **kwargs):
        await asyncio.sleep(0)
        return [2.0] * len(completions)

    trainer = GRPOTrainer(model=tiny_model, reward_funcs=[remote_judge, second_judge], args=_args(tmp_path),
                          train_dataset=_dataset())
    trainer.train()
    record = next(r for r in trainer.state.log_history if "reward" in r)
    assert record["rewards/remote_judge/mean"] == 1.0 and record["rewards/second_judge/mean"] == 2.0
    assert record["reward"] == 3.0
    assert seen["step"] == 0 and len(seen["answer"]) == 4 and set(seen["level"]) <= {0, 1}
