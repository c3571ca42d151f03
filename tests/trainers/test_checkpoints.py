"""Atomic checkpoints: a run killed during a save leaves no partial checkpoint-N, and resuming picks
the newest complete one; resume flags; checkpoint rotation."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from datasets import Dataset

from posttrain import ConfigError, SFTConfig, SFTTrainer
from posttrain.trainers.checkpoint import STAGING_PREFIX, latest_complete_checkpoint, resolve_resume

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _data(n=32):
    return Dataset.from_list([{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(n)])


def _config(output_dir, **overrides):
    values = dict(output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-3,
                  logging_steps=1, save_strategy="steps", save_steps=2, disable_tqdm=True, report_to="none",
                  seed=0)
    values.update(overrides)
    return SFTConfig(**values)


# A training run whose second save stops at a chosen point (it writes `stalled` and sleeps there) so
# that the test can kill it with SIGKILL in the middle of the save.
_SLOW_SAVE_RUN = textwrap.dedent("""
    import os, sys, time
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch
    torch.set_num_threads(1)
    from datasets import Dataset
    from transformers import Trainer
    from transformers.trainer_callback import TrainerState
    from posttrain import SFTConfig, SFTTrainer

    model_dir, output_dir, point = sys.argv[1:4]
    owner = TrainerState if point == "save_to_json" else Trainer
    original = getattr(owner, point)

    def stalled(self, *args, **kwargs):
        step = self.global_step if isinstance(self, TrainerState) else self.state.global_step
        if step == 4:
            with open(os.path.join(output_dir, "stalled"), "w") as handle:
                handle.write(point)
            time.sleep(600)
        return original(self, *args, **kwargs)

    setattr(owner, point, stalled)
    data = Dataset.from_list([{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(32)])
    args = SFTConfig(output_dir=output_dir, per_device_train_batch_size=4, max_steps=6, learning_rate=1e-3,
                     logging_steps=1, save_strategy="steps", save_steps=2, disable_tqdm=True, report_to="none",
                     seed=0)
    SFTTrainer(model=model_dir, args=args, train_dataset=data).train()
""")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["_save_optimizer_and_scheduler", "_save_rng_state", "save_to_json"])
def test_kill_during_a_save_then_resume(point, tiny_model_dir, tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    script = tmp_path / "run.py"
    script.write_text(_SLOW_SAVE_RUN)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen([sys.executable, str(script), tiny_model_dir, str(run), point], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not (run / "stalled").exists():
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the run never reached its second save"
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    # the interrupted save is in its staging directory, never under the name resume looks for
    names = set(os.listdir(run))
    assert "checkpoint-2" in names and "checkpoint-4" not in names
    assert STAGING_PREFIX + "checkpoint-4" in names

    trainer = SFTTrainer(model=tiny_model_dir, args=_config(run), train_dataset=_data())
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 6
    first_logged = min(h["step"] for h in trainer.state.log_history if "loss" in h and h["step"] > 2)
    assert first_logged == 3  # resumed after checkpoint-2
    assert sorted(n for n in os.listdir(run) if n.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4",
                                                                               "checkpoint-6"]
    assert not any(n.startswith(STAGING_PREFIX) for n in os.listdir(run))  # the new save at step 4 replaced it
    # the resumed run is the uninterrupted run
    straight = SFTTrainer(model=tiny_model_dir, args=_config(tmp_path / "straight"), train_dataset=_data())
    straight.train()
    for a, b in zip(straight.model.parameters(), trainer.model.parameters()):
        torch.testing.assert_close(a, b)


def test_saves_are_renamed_complete_and_rotation_still_works(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    trainer = SFTTrainer(model=tiny_model_dir, args=_config(run, save_steps=1, save_total_limit=2),
                         train_dataset=_data())
    trainer.train()
    names = sorted(os.listdir(run))
    assert [n for n in names if n.startswith("checkpoint-")] == ["checkpoint-5", "checkpoint-6"]
    assert not any(n.startswith(STAGING_PREFIX) for n in names)
    checkpoint = run / "checkpoint-6"
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (checkpoint / name).is_file(), name
    with open(checkpoint / "trainer_state.json") as handle:
        assert json.load(handle)["global_step"] == 6


@pytest.mark.slow  # two training runs
def test_resume_skips_an_incomplete_checkpoint_with_one_warning(tiny_model_dir, tmp_path, caplog):
    run = tmp_path / "run"
    SFTTrainer(model=tiny_model_dir, args=_config(run, max_steps=4), train_dataset=_data()).train()
    # what a save killed by an older version leaves: a numbered directory without its trainer state
    partial = run / "checkpoint-9"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"")
    with caplog.at_level("WARNING", logger="posttrain"):
        assert latest_complete_checkpoint(str(run)) == str(run / "checkpoint-4")
    warnings = [r.getMessage() for r in caplog.records if "checkpoint-9" in r.getMessage()]
    assert len(warnings) == 1 and "trainer_state.json" in warnings[0]

    trainer = SFTTrainer(model=tiny_model_dir, args=_config(run, max_steps=6), train_dataset=_data())
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 6
    assert min(h["step"] for h in trainer.state.log_history if "loss" in h and h["step"] > 4) == 5


def test_resume_values(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for value in (None, False, "false", "False", ""):
        assert resolve_resume(value, str(run)) is None
    for value in (True, "true", "True"):
        with pytest.raises(ConfigError, match="no checkpoint") as error:
            resolve_resume(value, str(run))
        assert error.value.field == "resume_from_checkpoint"
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_resume(str(tmp_path / "nowhere"), str(run))
    incomplete = run / "checkpoint-3"
    incomplete.mkdir()
    with pytest.raises(ConfigError, match="trainer_state.json"):
        resolve_resume(str(incomplete), str(run))


@pytest.mark.slow  # two CLI runs
def test_cli_resume_true_and_a_missing_path(tiny_model_dir, tmp_path, capsys):
    from posttrain.cli.main import main

    data = tmp_path / "data.jsonl"
    _data(24).to_json(str(data))
    common = ["sft", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(data), "--output_dir",
              str(tmp_path / "run"), "--per_device_train_batch_size", "4", "--save_strategy", "steps",
              "--save_steps", "2", "--disable_tqdm", "true", "--logging_steps", "1"]
    assert main(common + ["--max_steps", "4"]) == 0
    assert main(common + ["--max_steps", "6", "--resume_from_checkpoint", "true"]) == 0
    with open(tmp_path / "run" / "checkpoint-6" / "trainer_state.json") as handle:
        history = json.load(handle)["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert main(common + ["--max_steps", "6", "--resume_from_checkpoint", "false", "--output_dir",
                          str(tmp_path / "fresh")]) == 0
    capsys.readouterr()
    missing = str(tmp_path / "nowhere" / "checkpoint-2")
    assert main(common + ["--resume_from_checkpoint", missing]) == 2
    err = capsys.readouterr().err.strip()
    last_line = err.splitlines()[-1]
    assert "Traceback" not in err and "--resume_from_checkpoint" in last_line and missing in last_line


@pytest.mark.slow  # trains with evaluation
def test_best_checkpoint_is_kept_and_loaded_at_the_end(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    args = _config(run, max_steps=3, save_steps=1, eval_strategy="steps", eval_steps=1, save_total_limit=1,
                   load_best_model_at_end=True, metric_for_best_model="loss", per_device_eval_batch_size=4)
    trainer = SFTTrainer(model=tiny_model_dir, args=args, train_dataset=_data(), eval_dataset=_data(8))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best == str(run / f"checkpoint-{trainer.state.best_global_step}") and os.path.isdir(best)
    kept = sorted(n for n in os.listdir(run) if n.startswith("checkpoint-"))
    assert os.path.basename(best) in kept and "checkpoint-3" in kept and len(kept) <= 2
    with open(run / "checkpoint-3" / "trainer_state.json") as handle:
        assert json.load(handle)["best_model_checkpoint"] == best
