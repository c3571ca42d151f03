"""SFT, reward and DPO give the same weights on 1 process with batch 8 as on 2 processes with batch 4.

Plain SGD keeps the comparison sharp: Adam divides each update by the gradient's running scale, which
hides a loss normalised per process (a factor cancels) and amplifies float32 rounding in gradients near
its epsilon. Both runs are real processes; the two-process run is launched without ``--use_cpu`` on a
machine without a GPU, as a user would type it.
"""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

METHODS = ("reward", "dpo", "sft")  # reward first: its new head is drawn before any Trainer seeds the process


def _max_difference(left: dict, right: dict, keys) -> float:
    return max((left[key].double() - right[key].double()).abs().max().item() for key in keys)


def test_two_processes_train_like_one_at_equal_global_batch(tiny_model_dir, tmp_path, run_command, worker_command):
    sgd = ['optim="sgd"', "learning_rate=1.0"]
    methods = ",".join(METHODS)
    run_command(worker_command(1, methods, tiny_model_dir, str(tmp_path / "one"), "8", "2", *sgd))
    launched = run_command(worker_command(2, methods, tiny_model_dir, str(tmp_path / "two"), "4", "2", *sgd))
    start = load_file(f"{tiny_model_dir}/model.safetensors")
    for method in METHODS:
        one = load_file(str(tmp_path / "one" / method / "model.safetensors"))
        two = load_file(str(tmp_path / "two" / method / "model.safetensors"))
        update = _max_difference(one, start, [key for key in one if key in start])
        assert update > 1e-2, f"{method}: the run barely moved the weights ({update:.2e})"
        assert _max_difference(one, two, one) < 2e-6, method
    assert (launched.stdout + launched.stderr).count("training on the CPU over gloo") == len(METHODS)


def test_two_processes_train_like_one_with_the_memory_levers(tiny_model_dir, tmp_path, run_command, worker_command):
    """activation_offloading hands the layer parameters' gradients back through its own autograd function and
    tiled_mlp through checkpointed tiles: DDP's gradient hooks must still see every one of them, once."""
    fields = ['optim="sgd"', "learning_rate=1.0", "activation_offloading=true", "tiled_mlp=true",
              "sequence_tile_size=8"]
    run_command(worker_command(1, "sft", tiny_model_dir, str(tmp_path / "one"), "8", "2", *fields))
    run_command(worker_command(2, "sft", tiny_model_dir, str(tmp_path / "two"), "4", "2", *fields))
    start = load_file(f"{tiny_model_dir}/model.safetensors")
    one = load_file(str(tmp_path / "one" / "sft" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "sft" / "model.safetensors"))
    assert _max_difference(one, start, [key for key in one if key in start]) > 1e-2
    assert _max_difference(one, two, one) < 2e-6
