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


# ----------------------------------------------------------------------------- reward models by hub id


@pytest.fixture
def cached_reward_model(tmp_path, monkeypatch):
    """A tiny reward model in an offline hub cache as ``org/tiny-rm`` (and its directory)."""
    import shutil

    from huggingface_hub import constants

    from posttrain.models.tiny import create_tiny_reward_model

    directory = create_tiny_reward_model(tmp_path / "saved-rm")
    cache, commit = tmp_path / "hub-cache", "89abcdef0123456789abcdef0123456789abcdef"
    shutil.copytree(directory, cache / "models--org--tiny-rm" / "snapshots" / commit)
    (cache / "models--org--tiny-rm" / "refs").mkdir()
    (cache / "models--org--tiny-rm" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its variables once, at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return directory


def _length(completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_reward_models_by_hub_id_and_directory_beside_functions(tiny_model, cached_reward_model, tmp_path):
    from torch import nn
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cached_reward_model)
    trainer = GRPOTrainer(model=tiny_model, reward_funcs=["org/tiny-rm", _length, cached_reward_model],
                          reward_processing_classes=[tokenizer, None, None], args=_args(tmp_path),
                          train_dataset=_dataset())
    by_id, function, by_directory = trainer.reward_funcs
    assert isinstance(by_id, nn.Module) and by_id.config.num_labels == 1 and function is _length
    assert isinstance(by_directory, nn.Module) and by_directory is not by_id
    given, none, loaded = trainer.reward_processing_classes
    assert given is tokenizer and none is None and loaded.get_vocab() == tokenizer.get_vocab()
    rows = trainer.generate_completions(_dataset(1), num_generations=2)
    scores = [row["rewards"]["tiny-rm"] for row in rows]
    # one model, loaded twice: the same scores under both names
    assert scores == [row["rewards"]["saved-rm"] for row in rows] and all(isinstance(s, float) for s in scores)


def test_reward_processing_classes_must_pair_with_reward_funcs(tiny_model, cached_reward_model, tmp_path):
    with pytest.raises(ConfigError) as info:
        GRPOTrainer(model=tiny_model, reward_funcs=["org/tiny-rm", _length], reward_processing_classes=[None],
                    args=_args(tmp_path), train_dataset=_dataset())
    assert info.value.field == "reward_processing_classes"


def test_an_uncached_hub_id_is_refused_when_the_trainer_is_built(tiny_model, cached_reward_model, tmp_path):
    with pytest.raises(ConfigError, match="'org/other-rm'.*local Hugging Face cache"):
        RLOOTrainer(model=tiny_model, reward_funcs="org/other-rm", args=_args(tmp_path, RLOOConfig),
                    train_dataset=_dataset())


# ----------------------------------------------------------------------------- attributes callbacks read


@pytest.mark.parametrize("trainer_class, config", [(GRPOTrainer, GRPOConfig), (RLOOTrainer, RLOOConfig)])
def test_ref_model_is_the_frozen_reference_or_none(trainer_class, config, tiny_model, tmp_path):
    from peft import LoraConfig

    with_kl = trainer_class(model=tiny_model, reward_funcs=_length, args=_args(tmp_path, config, beta=0.1),
                            train_dataset=_dataset())
    reference = with_kl.ref_model
    assert isinstance(reference, torch.nn.Module) and reference is not with_kl.model
    assert not any(p.requires_grad for p in reference.parameters())
    assert with_kl.reward_funcs == [_length] and with_kl.reward_processing_classes == [None]

    without_kl = trainer_class(model=tiny_model, reward_funcs=_length, args=_args(tmp_path, config, beta=0.0),
                               train_dataset=_dataset())
    assert without_kl.ref_model is None
    adapters = trainer_class(model=tiny_model, reward_funcs=_length, args=_args(tmp_path, config, beta=0.1),
                             train_dataset=_dataset(), peft_config=LoraConfig(r=4, target_modules=["q_proj"]))
    assert adapters.ref_model is None  # the reference is the policy with its adapters disabled
