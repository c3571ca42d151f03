"""Helpers for tests that start real processes: one process, or several under torchrun on gloo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "train_worker.py"
# variables a launcher sets; a test started under one must not pass them on to its own launches
_LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                     "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU")


def process_env() -> dict[str, str]:
    """The environment for a launched run: this checkout importable, no GPU, one thread per process."""
    env = {name: value for name, value in os.environ.items() if name not in _LAUNCH_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def torchrun(nproc: int) -> list[str]:
    """The command prefix that starts ``nproc`` processes on this machine (a free rendezvous port each time)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


@pytest.fixture
def worker_command():
    """``worker_command(nproc, *args)``: the command that runs train_worker.py on ``nproc`` processes."""

    def command(nproc: int, *args: str) -> list[str]:
        return (torchrun(nproc) if nproc > 1 else [sys.executable]) + [str(WORKER), *args]

    return command


@pytest.fixture
def run_command():
    """Run a command to completion; fail the test with its output's tail when it exits non-zero."""

    def run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run(command, env=process_env(), capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
        return result

    return run
