"""adopt_process_launch: a multi-process launch on a machine without a GPU becomes one CPU run on gloo."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from posttrain import ConfigError
from posttrain.trainers.config import adopt_process_launch, check_launch_joined


def _config(**values):
    return SimpleNamespace(**{"use_cpu": False, "ddp_backend": None, "fsdp": None, "deepspeed": None, **values})


@pytest.fixture
def launched(monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)

    def launch(world_size: int, rank: int = 0):
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("RANK", str(rank))

    return launch


def test_two_processes_without_gpu_train_on_cpu_over_gloo(launched, monkeypatch, caplog):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    launched(2)
    config = _config()
    with caplog.at_level("WARNING", logger="posttrain"):
        assert adopt_process_launch(config) == 2
    assert config.use_cpu is True and config.ddp_backend == "gloo"
    assert "2 processes launched on a machine without a GPU" in caplog.text


def test_only_rank_zero_says_so(launched, monkeypatch, caplog):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    launched(2, rank=1)
    config = _config()
    with caplog.at_level("WARNING", logger="posttrain"):
        adopt_process_launch(config)
    assert config.use_cpu is True and caplog.text == ""


@pytest.mark.parametrize("case", ["single process", "gpu present", "explicit backend"])
def test_left_alone(case, launched, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: case == "gpu present")
    config = _config(ddp_backend="mpi" if case == "explicit backend" else None)
    if case != "single process":
        launched(2)
    adopt_process_launch(config)
    if case == "explicit backend":
        assert config.use_cpu is True and config.ddp_backend == "mpi"
    else:
        assert config.use_cpu is False and config.ddp_backend is None


@pytest.mark.parametrize("request_kind", ["accelerate config", "--fsdp flag"])
def test_fsdp_on_the_cpu_says_it_runs_as_ddp(request_kind, launched, monkeypatch, caplog):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    if request_kind == "accelerate config":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    else:
        monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    launched(2)
    with caplog.at_level("WARNING", logger="posttrain"):
        adopt_process_launch(_config(fsdp="full_shard" if request_kind == "--fsdp flag" else None))
    assert sum("FSDP does not run on the CPU" in r.getMessage() and "DDP" in r.getMessage()
               for r in caplog.records) == 1


def test_processes_that_did_not_join_one_run_stop_with_the_fix():
    with pytest.raises(ConfigError, match="did not join one distributed run") as caught:
        check_launch_joined(SimpleNamespace(world_size=1, device="mps"), launched=2)
    assert "--use_cpu" in str(caught.value)
    check_launch_joined(SimpleNamespace(world_size=2, device="cpu"), launched=2)
    check_launch_joined(SimpleNamespace(world_size=1, device="cpu"), launched=1)
