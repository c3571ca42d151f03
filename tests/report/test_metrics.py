"""metrics.jsonl holds one run: a resumed run continues it without duplicate rows, a new run moves
an old file aside; a NaN is written as NaN."""

import json
import math
import os

import pytest
from datasets import Dataset

from posttrain import SFTConfig, SFTTrainer
from posttrain.report.metrics import METRICS_FILE, MetricsFileCallback, read_metrics, start_metrics_file


def _run(model_dir, output_dir, max_steps, resume=None):
    data = Dataset.from_list([{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(32)])
    args = SFTConfig(output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=max_steps,
                     learning_rate=1e-3, logging_steps=1, save_strategy="steps", save_steps=2,
                     disable_tqdm=True, report_to="none")
    trainer = SFTTrainer(model=model_dir, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _loss_steps(run_dir):
    return [r["step"] for r in read_metrics(str(run_dir)) if "loss" in r]


@pytest.mark.slow  # a crashed run and its resume
def test_resume_after_a_crash_has_no_duplicate_rows(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    _run(tiny_model_dir, run, max_steps=3)  # logged steps 1-3; checkpoint-2 is the newest
    assert _loss_steps(run) == [1, 2, 3]
    _run(tiny_model_dir, run, max_steps=5, resume=str(run / "checkpoint-2"))
    assert _loss_steps(run) == [1, 2, 3, 4, 5]
    assert not [name for name in os.listdir(run) if name.startswith("metrics.") and name != METRICS_FILE]


@pytest.mark.slow  # two runs
def test_a_new_run_into_an_old_directory_starts_a_new_file(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    _run(tiny_model_dir, run, max_steps=2)
    first = open(run / METRICS_FILE).read()
    _run(tiny_model_dir, run, max_steps=3)
    assert _loss_steps(run) == [1, 2, 3]
    aside = [name for name in os.listdir(run) if name.startswith("metrics.") and name != METRICS_FILE]
    assert len(aside) == 1 and aside[0].endswith(".jsonl")
    assert open(run / aside[0]).read() == first


def test_truncation_keeps_rows_up_to_the_step_and_survives_a_cut_line(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    start_metrics_file(str(tmp_path), 2)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]


def test_nan_is_written_as_nan(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state = TrainerState()
    state.global_step = 5
    MetricsFileCallback().on_log(args, state, TrainerControl(), logs={"loss": float("nan"), "grad_norm": 1.0})
    record = read_metrics(str(tmp_path))[0]
    assert math.isnan(record["loss"]) and record["grad_norm"] == 1.0
