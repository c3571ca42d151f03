"""`posttrain ppo` and `python -m posttrain.scripts.ppo`: the seed's command line, errors, LoRA."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from posttrain.cli.main import main


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def reward_model_dir():
    from posttrain.models.tiny import tiny_model_path

    return tiny_model_path(reward=True)


def _prompts_file(path, n=8):
    with open(path, "w") as handle:
        for i in range(n):
            handle.write(json.dumps({"prompt": [{"role": "user", "content": f"What is {i} + 3?"}],
                                     "answer": str(i + 3)}) + "\n")
    return str(path)


@pytest.mark.slow  # a subprocess that imports everything again
def test_python_m_scripts_ppo_runs_the_seed_command(tiny_model_dir, reward_model_dir, tmp_path):
    """The seed's flags as written (smaller numbers), through `python -m`, then the output loads in a pipeline."""
    data = _prompts_file(tmp_path / "prompts.jsonl")
    out = tmp_path / "ppo-out"
    command = [sys.executable, "-m", "posttrain.scripts.ppo", "--model_name_or_path", tiny_model_dir,
               "--reward_model_path", reward_model_dir, "--dataset_name", data, "--output_dir", str(out),
               "--learning_rate", "3e-6", "--per_device_train_batch_size", "4", "--total_episodes", "8",
               "--num_ppo_epochs", "4", "--kl_coef", "0.05", "--response_length", "4", "--save_strategy", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "saved to" in result.stdout
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert records[-1]["episode"] == 8 and "objective/scores" in records[-1]

    from transformers import pipeline

    generator = pipeline("text-generation", model=str(out))
    text = generator([{"role": "user", "content": "What is 1 + 3?"}], max_new_tokens=3, do_sample=False)
    assert text[0]["generated_text"][-1]["role"] == "assistant"


def test_posttrain_ppo_with_lora(tiny_model_dir, reward_model_dir, tmp_path):
    data = _prompts_file(tmp_path / "prompts.jsonl")
    code = main(["ppo", "--model_name_or_path", tiny_model_dir, "--reward_model_path", reward_model_dir,
                 "--dataset_name", data, "--output_dir", str(tmp_path / "lora"), "--per_device_train_batch_size", "4",
                 "--total_episodes", "4", "--num_ppo_epochs", "1", "--response_length", "3", "--use_peft",
                 "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--save_strategy", "no"])
    assert code == 0
    assert os.path.isfile(tmp_path / "lora" / "adapter_config.json")


def test_missing_reward_model_is_one_line_exit_2(tiny_model_dir, tmp_path, capsys):
    data = _prompts_file(tmp_path / "prompts.jsonl")
    code = main(["ppo", "--model_name_or_path", tiny_model_dir, "--dataset_name", data, "--output_dir",
                 str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "reward_model_path" in err and "Traceback" not in err


def test_sft_model_path_is_accepted_for_the_policy(tiny_model_dir, reward_model_dir, tmp_path):
    data = _prompts_file(tmp_path / "prompts.jsonl", n=4)
    code = main(["ppo", "--sft_model_path", tiny_model_dir, "--reward_model_path", reward_model_dir,
                 "--dataset_name", data, "--output_dir", str(tmp_path / "sftpath"), "--per_device_train_batch_size",
                 "4", "--total_episodes", "4", "--num_ppo_epochs", "1", "--response_length", "2",
                 "--save_strategy", "no"])
    assert code == 0 and os.path.isfile(tmp_path / "sftpath" / "model.safetensors")
