"""`posttrain rloo`: same flags as `posttrain grpo`, plus RLOOConfig's own."""

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


def test_rloo_with_kl_in_the_loss_trains_and_saves(tiny_model_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "answer": i + 1}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    code = main(["rloo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(data), "--output_dir", str(out),
                 "--reward_funcs", "accuracy", "--num_generations", "2", "--per_device_train_batch_size", "4",
                 "--max_completion_length", "5", "--max_steps", "2", "--logging_steps", "1", "--beta", "0.1",
                 "--kl_in_reward", "false", "--save_strategy", "no"])
    assert code == 0
    assert os.path.isfile(out / "model.safetensors")
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("kl" in r and "rewards/accuracy/mean" in r for r in records)


def test_rloo_without_rewards_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    code = main(["rloo", "--model_name_or_path", tiny_model_dir, "--dataset_name", "x.jsonl", "--output_dir",
                 str(tmp_path / "o")])
    assert code == 2
    assert "reward_funcs" in capsys.readouterr().err
