"""Resume = no interruption, bit for bit on CPU, for the offline trainers (the online ones have their own
tests in test_grpo/test_rloo/test_online_dpo/test_ppo): run 4 steps saving at step 2, then resume a fresh
trainer from checkpoint-2 and compare the final weights with torch.equal."""

from __future__ import annotations

import shutil

import pytest
import torch

from posttrain import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
from posttrain.tasks import get_task

TASK = get_task("arithmetic")
COMMON = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
              logging_steps=1, report_to="none", disable_tqdm=True, seed=3, lr_scheduler_type="cosine", warmup_steps=1)


def _trainer(method, output_dir):
    from posttrain.models.tiny import tiny_model_path

    if method == "sft":
        return SFTTrainer(tiny_model_path(), args=SFTConfig(output_dir=output_dir, **COMMON),
                          train_dataset=TASK.as_messages(24))
    if method == "reward":
        return RewardTrainer(tiny_model_path(reward=True), args=RewardConfig(output_dir=output_dir, **COMMON),
                             train_dataset=TASK.as_preference(24))
    return DPOTrainer(tiny_model_path(), args=DPOConfig(output_dir=output_dir, loss_type=["sigmoid", "bco_pair"], **COMMON),
                      train_dataset=TASK.as_preference(24))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "reward", "dpo"])
def test_resumed_run_ends_with_the_uninterrupted_weights(method, tmp_path):
    straight = _trainer(method, str(tmp_path / "run"))
    straight.train()
    expected = {name: p.detach().clone() for name, p in straight.model.named_parameters()}
    # a second run directory holding only what a run killed after step 2 would have left
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "run" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = _trainer(method, str(resumed_dir))
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    changed = [n for n, p in resumed.model.named_parameters() if not torch.equal(p, expected[n])]
    assert not changed, f"{len(changed)} tensors differ after resume, e.g. {changed[:3]}"
    moved = [n for n, p in resumed.model.named_parameters() if p.requires_grad]
    assert moved  # something trained
