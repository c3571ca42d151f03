"""`posttrain online-dpo`: ranked by a reward model or by reward functions; a clear error without either."""

from __future__ import annotations

import json
import os

import pytest

from posttrain.cli.main import main


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _prompts_file(path, n=8):
    with open(path, "w") as handle:
        for i in range(n):
            handle.write(json.dumps({"prompt": f"What is {i} + 3?", "answer": str(i + 3)}) + "\n")
    return str(path)


def _flags(model, data, out):
    return ["--model_name_or_path", model, "--dataset_name", data, "--output_dir", out,
            "--per_device_train_batch_size", "2", "--max_steps", "1", "--max_new_tokens", "4",
            "--save_strategy", "no", "--logging_steps", "1"]


def test_online_dpo_with_a_reward_model(tiny_model_dir, tmp_path):
    from posttrain.models.tiny import tiny_model_path

    data = _prompts_file(tmp_path / "prompts.jsonl")
    out = str(tmp_path / "rm")
    code = main(["online-dpo", *_flags(tiny_model_dir, data, out), "--reward_model_path",
                 tiny_model_path(reward=True), "--beta", "0.2", "--loss_type", "ipo"])
    assert code == 0
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert records[0]["beta"] == 0.2 and "objective/scores" in records[0]


def test_online_dpo_with_builtin_reward_functions(tiny_model_dir, tmp_path):
    data = _prompts_file(tmp_path / "prompts.jsonl")
    out = str(tmp_path / "funcs")
    code = main(["online-dpo", *_flags(tiny_model_dir, data, out), "--reward_funcs", "accuracy", "format",
                 "--reward_weights", "1.0", "0.5"])
    assert code == 0
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert "rewards/accuracy" in records[0] and "rewards/format" in records[0]


def test_nothing_to_rank_with_is_one_line_exit_2(tiny_model_dir, tmp_path, capsys):
    data = _prompts_file(tmp_path / "prompts.jsonl")
    code = main(["online-dpo", *_flags(tiny_model_dir, data, str(tmp_path / "none"))])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "reward_model_path" in err and "accuracy" in err
