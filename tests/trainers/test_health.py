"""Health warnings: one line each, logged once per run."""

import logging

from transformers import TrainerControl, TrainerState, TrainingArguments

from posttrain.trainers.health import HealthWarnings


def _feed(records, caplog):
    callback, state = HealthWarnings(), TrainerState()
    args = TrainingArguments(output_dir="out", report_to="none")
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        for step, logs in enumerate(records, start=1):
            state.global_step = step
            callback.on_log(args, state, TrainerControl(), logs=logs)
    return [r.getMessage() for r in caplog.records if r.name == "posttrain"]


def test_a_tenfold_loss_jump_is_named_once(caplog):
    losses = [2.0, 1.5, 1.2, 1.0, 15.0, 30.0, 1.0, 40.0]
    messages = _feed([{"loss": loss, "grad_norm": 1.0} for loss in losses], caplog)
    assert len(messages) == 1 and messages[0].startswith("step 5:") and "1 to 15" in messages[0]


def test_a_slow_decline_and_tiny_losses_do_not_warn(caplog):
    steady = [{"loss": 5.0 * 0.8 ** i, "grad_norm": 1.0} for i in range(30)]
    tiny = [{"loss": value, "grad_norm": 1.0} for value in (0.001, 0.0001, 0.005)]
    assert _feed(steady + tiny, caplog) == []


def test_zero_gradients_for_several_logs_are_named_once(caplog):
    norms = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    messages = _feed([{"loss": 1.0, "grad_norm": norm} for norm in norms], caplog)
    assert len(messages) == 1 and messages[0].startswith("step 7:") and "since step 5" in messages[0]
