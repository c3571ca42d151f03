"""`posttrain grpo`: flags from GRPOConfig, reward functions by name, one-line errors."""

import json
import os

import pytest
import torch

from posttrain.cli.main import main


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prompt_file(path, n=8):
    with open(path, "w") as handle:
        for i in range(n):
            handle.write(json.dumps({"prompt": [{"role": "user", "content": f"What is {i} + 2?"}], "answer": i + 2}) + "\n")
    return str(path)


def test_grpo_with_a_builtin_reward_trains_and_saves(tiny_model_dir, tmp_path):
    data = _prompt_file(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    code = main(["grpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", data, "--output_dir", str(out),
                 "--num_generations", "4", "--reward_funcs", "accuracy", "format", "--per_device_train_batch_size", "4",
                 "--max_completion_length", "6", "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no",
                 "--reward_weights", "1.0", "0.5", "--disable_tqdm", "true"])
    assert code == 0
    assert os.path.isfile(out / "model.safetensors")
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("rewards/accuracy/mean" in r and "rewards/format/mean" in r for r in records)


def test_max_new_tokens_flag_is_accepted(tiny_model_dir, tmp_path):
    data = _prompt_file(tmp_path / "prompts.jsonl", n=4)
    code = main(["grpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", data, "--output_dir",
                 str(tmp_path / "o"), "--num_generations", "2", "--per_device_train_batch_size", "2",
                 "--max_new_tokens", "3", "--reward_funcs", "accuracy", "--max_steps", "1", "--save_strategy", "no"])
    assert code == 0


def test_missing_reward_funcs_is_one_line_listing_the_builtins(tiny_model_dir, tmp_path, capsys):
    data = _prompt_file(tmp_path / "prompts.jsonl")
    code = main(["grpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", data, "--output_dir",
                 str(tmp_path / "o"), "--num_generations", "4"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("posttrain grpo: error:") and "reward_funcs" in err
    for name in ("accuracy", "format", "incremental_format"):
        assert name in err
    assert not os.path.exists(tmp_path / "o")


def test_indivisible_generation_batch_is_a_config_error(tiny_model_dir, tmp_path, capsys):
    data = _prompt_file(tmp_path / "prompts.jsonl")
    code = main(["grpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", data, "--output_dir",
                 str(tmp_path / "o"), "--num_generations", "4", "--per_device_train_batch_size", "3",
                 "--steps_per_generation", "1", "--reward_funcs", "accuracy"])
    assert code == 2
    assert "num_generations" in capsys.readouterr().err
