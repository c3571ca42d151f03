"""Two-process CPU runs exit cleanly: gloo's worker threads get the GIL back before interpreter finalisation
(where taking it aborts the process: "terminate called without an active exception", exit code -6), and a
process whose peer failed still exits promptly."""

from __future__ import annotations

import json
import sys
import textwrap
import time

import pytest

from posttrain.trainers import config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = textwrap.dedent('''
    import atexit, json, os, sys
    from datasets import Dataset
    from posttrain import SFTConfig, SFTTrainer
    from posttrain.models.tiny import tiny_model_path
    from posttrain.trainers import config

    rank = os.environ["RANK"]
    fail_on_rank = sys.argv[2]

    def record():  # registered first, so it runs after the handlers registered later
        with open(os.path.join(sys.argv[1], f"exit-{rank}.json"), "w") as handle:
            json.dump({"settled": config.gloo_exit_settled}, handle)

    os.makedirs(sys.argv[1], exist_ok=True)
    atexit.register(record)
    args = SFTConfig(output_dir=sys.argv[1], per_device_train_batch_size=2, max_steps=int(sys.argv[3]),
                     save_strategy="no", disable_tqdm=True, report_to="none")
    dataset = Dataset.from_list([{"text": f"{i} + 1 = {i + 1}"} for i in range(400)])
    trainer = SFTTrainer(tiny_model_path(), args=args, train_dataset=dataset)
    if rank == fail_on_rank:
        raise SystemExit("this process gives up before training")
    trainer.train()
''')


def _launch(tmp_path, fail_on_rank: str, steps: int):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(out), fail_on_rank, str(steps)]
    return out, command


def test_both_processes_let_the_gloo_workers_settle_before_exiting(tmp_path, run_command):
    out, command = _launch(tmp_path, fail_on_rank="none", steps=1)
    run_command(command, timeout=600)
    for rank in (0, 1):
        assert json.loads((out / f"exit-{rank}.json").read_text()) == {"settled": True}


def test_a_process_whose_peer_failed_exits_promptly(tmp_path):
    import subprocess

    _, command = _launch(tmp_path, fail_on_rank="1", steps=200)
    started = time.monotonic()
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode != 0 and "gives up" in finished.stderr
    assert time.monotonic() - started < 120  # the peer's failure ends the run, no wait for a collective


def test_the_exit_handler_is_registered_once_and_only_for_gloo(monkeypatch):
    registered = []
    monkeypatch.setattr(config.atexit, "register", registered.append)
    monkeypatch.setattr(config, "_gloo_exit_settle_registered", False)
    monkeypatch.setattr(config, "_gloo_group_alive", lambda: False)
    config.settle_gloo_workers_at_exit()
    assert registered == []
    monkeypatch.setattr(config, "_gloo_group_alive", lambda: True)
    config.settle_gloo_workers_at_exit()
    config.settle_gloo_workers_at_exit()
    assert registered == [config._settle_gloo_workers]
    slept = []
    monkeypatch.setattr("time.sleep", slept.append)
    monkeypatch.setattr(config, "gloo_exit_settled", False)
    registered[0]()
    assert slept == [config.GLOO_EXIT_SETTLE_SECONDS] and config.gloo_exit_settled
