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


def test_identical_chosen_and_rejected_rows_are_counted_once(tiny_model_dir, tmp_path, caplog):
    import torch
    from datasets import Dataset

    from posttrain import DPOConfig, DPOTrainer

    torch.set_num_threads(1)
    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(8)]
    rows[3]["rejected"] = rows[3]["chosen"]
    rows[5]["rejected"] = rows[5]["chosen"]
    args = DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1,
                     save_strategy="no", disable_tqdm=True, report_to="none")
    trainer = DPOTrainer(model=tiny_model_dir, args=args, train_dataset=Dataset.from_list(rows))
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        trainer.train()
    messages = [r.getMessage() for r in caplog.records if "identical chosen and rejected" in r.getMessage()]
    assert len(messages) == 1 and messages[0].startswith("2 of 8") and "row 3" in messages[0]
