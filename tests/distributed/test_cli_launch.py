"""`posttrain sft --num_processes 2` on a machine without a GPU: one run over two processes, end to end."""

from __future__ import annotations

import json
import sys

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_sft_num_processes_2_trains_one_run_on_the_cpu(tiny_model_dir, tmp_path, run_command):
    rows = [{"messages": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(16)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    result = run_command([sys.executable, "-m", "posttrain", "sft", "--num_processes", "2",
                          "--model_name_or_path", tiny_model_dir, "--dataset_name", str(data), "--output_dir", str(out),
                          "--per_device_train_batch_size", "4", "--num_train_epochs", "1", "--save_strategy", "no",
                          "--logging_steps", "1", "--disable_tqdm", "true"])
    log = result.stdout + result.stderr
    assert "accelerate.commands.launch" in log and "training on the CPU over gloo" in log
    assert log.count("saved to") == 1 and (out / "model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert max(steps) == 2  # 16 rows / (2 processes x 4); one process alone would take 4 steps
