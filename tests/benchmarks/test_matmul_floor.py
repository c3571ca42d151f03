"""The product counts behind benchmarks/matmul_floor.py: a step's FLOPs counted by hand on a small config."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks.matmul_floor import StepShape, flops, floor_seconds, step_products

CONFIG = SimpleNamespace(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, intermediate_size=16,
                         num_hidden_layers=2, vocab_size=32, head_dim=None)
# per layer: q 8x8, k and v 8x4, o 8x8, gate and up 8x16, down 16x8 = 64 + 64 + 64 + 384 = 576 weights
LAYER_WEIGHTS = 2 * 576
HEAD_WEIGHTS = 8 * 32
SHAPE = StepShape(groups=2, rows=6, prompt_tokens=5, new_tokens=4)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_flops_are_two_per_weight_per_token(share_prompt):
    phases = step_products(CONFIG, SHAPE, share_prompt)
    # prefill: the layers over 2 x 5 prompt tokens, the head over each prompt's last position
    assert flops(phases["prefill"]) == 2 * (10 * LAYER_WEIGHTS + 2 * HEAD_WEIGHTS)
    # decode: 3 steps of 6 rows (the first token comes from the prefill)
    assert flops(phases["decode"]) == 2 * 3 * 6 * (LAYER_WEIGHTS + HEAD_WEIGHTS)
    train_tokens = (10 if share_prompt else 30) + 24
    forward = 2 * (train_tokens * LAYER_WEIGHTS + 24 * HEAD_WEIGHTS)
    assert flops(phases["training forward"]) == forward
    assert flops(phases["training backward"]) == 2 * forward  # the input's and the weight's gradient


def test_sharing_the_prompt_lowers_only_the_training_products_and_every_phase_is_timed():
    shared, whole = step_products(CONFIG, SHAPE, True), step_products(CONFIG, SHAPE, False)
    assert shared["prefill"] == whole["prefill"] and shared["decode"] == whole["decode"]
    assert flops(shared["training forward"]) < flops(whole["training forward"])
    seconds = floor_seconds(shared, repeats=1)
    assert set(seconds) == {"prefill", "decode", "training forward", "training backward"}
    assert all(value > 0 for value in seconds.values())
