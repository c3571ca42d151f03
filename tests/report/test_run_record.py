"""Every run leaves report.md with plots in output_dir, and a model card in every saved model directory."""

from __future__ import annotations

import os

import pytest
from peft import LoraConfig

from posttrain import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
from posttrain.report.plots import smooth
from posttrain.report.run_record import changed_settings
from posttrain.tasks import get_task

TASK = get_task("arithmetic")
COMMON = dict(max_steps=3, logging_steps=1, per_device_train_batch_size=4, report_to="none", disable_tqdm=True,
              save_strategy="no", learning_rate=1e-3)


def _length_reward(prompts, completions, **kwargs):
    return [float(len(c[0]["content"])) for c in completions]


def _trainer(method, model_dir, out, **extra):
    if method == "sft":
        return SFTTrainer(model_dir, args=SFTConfig(output_dir=out, eval_strategy="steps", eval_steps=2, **COMMON),
                          train_dataset=TASK.as_messages(16), eval_dataset=TASK.as_messages(8, split="test"), **extra)
    if method == "reward":
        from posttrain.models.tiny import tiny_model_path

        return RewardTrainer(tiny_model_path(reward=True), args=RewardConfig(output_dir=out, **COMMON),
                             train_dataset=TASK.as_preference(16))
    if method == "dpo":
        return DPOTrainer(model_dir, args=DPOConfig(output_dir=out, **COMMON), train_dataset=TASK.as_preference(16))
    if method == "ppo":
        from posttrain import PPOConfig, PPOTrainer
        from posttrain.models.tiny import tiny_model_path

        values = {k: v for k, v in COMMON.items() if k != "max_steps"}
        return PPOTrainer(args=PPOConfig(output_dir=out, total_episodes=12, response_length=4, num_mini_batches=1,
                                         num_sample_generations=0, **values),
                          model=model_dir, reward_model=tiny_model_path(reward=True), train_dataset=TASK.as_prompt_only(12))
    return GRPOTrainer(model_dir, reward_funcs=_length_reward, train_dataset=TASK.as_prompt_only(8),
                       args=GRPOConfig(output_dir=out, num_generations=4, max_completion_length=4, **COMMON))


@pytest.mark.parametrize("method", ["sft", "reward", "dpo", "grpo", "ppo"])
def test_report_plots_and_model_card(method, tiny_model_dir, tmp_path):
    out = str(tmp_path / method)
    trainer = _trainer(method, tiny_model_dir, out)
    trainer.train()
    trainer.save_model(out)
    report = open(os.path.join(out, "report.md")).read()
    assert report.startswith(f"# {method} run")
    assert "![training curves](training.png)" in report and os.path.getsize(os.path.join(out, "training.png")) > 0
    assert ("| total_episodes | 12 |" if method == "ppo" else "| max_steps | 3 |") in report
    assert "| learning_rate | 0.001 |" in report
    assert "wall time:" in report and "peak memory" in report
    assert "## Final figures" in report
    if method == "sft":
        assert "![evaluation curves](evaluation.png)" in report and "| eval_loss |" in report
    card = open(os.path.join(out, "README.md")).read()
    assert f"- {method}" in card and f"base_model: {trainer.describe_run()[1]}" in card
    loader = "AutoModelForSequenceClassification" if method == "reward" else "pipeline("
    assert loader in card
    assert "## Last logged metrics" in card


@pytest.mark.slow  # trains, saves and reloads
def test_lora_run_card_loads_with_peft(tiny_model_dir, tmp_path):
    out = str(tmp_path / "lora")
    trainer = _trainer("sft", tiny_model_dir, out, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    trainer.save_model(out)
    card = open(os.path.join(out, "README.md")).read()
    assert "library_name: peft" in card and "AutoPeftModelForCausalLM" in card
    from peft import AutoPeftModelForCausalLM

    assert AutoPeftModelForCausalLM.from_pretrained(out) is not None


def test_changed_settings_lists_only_changes():
    config = SFTConfig(output_dir="x", learning_rate=3e-4, hub_token="secret")
    changed = changed_settings(config)
    assert changed["learning_rate"] == 3e-4
    assert "output_dir" not in changed and "hub_token" not in changed and "num_train_epochs" not in changed


def test_smoothing_by_hand():
    # weight 0.5: averages 0.5, 1.25 -> bias-corrected 1.0, 1.6667
    assert smooth([1.0, 2.0], weight=0.5) == pytest.approx([1.0, 1.25 / 0.75])
    assert smooth([3.0, 3.0, 3.0, 3.0]) == pytest.approx([3.0] * 4)
