"""Non-finite losses and gradients: logged as NaN, their optimizer step skipped, a run that keeps
producing them stopped with an error naming the step; no checkpoint with non-finite weights."""

import copy
import math
import os

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from posttrain import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
from posttrain.trainers.guard import NonFiniteTrainingError


def _sft_data(n=40):
    return Dataset.from_list([{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(n)])


def _dpo_data(n=40):
    from posttrain.tasks import get_task

    return get_task("arithmetic").as_preference(n, conversational=False)


def _common(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=1,
                  learning_rate=1e-3, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none")
    values.update(overrides)
    return values


def _length_reward(completions, **kwargs):
    return [len(c) / 10.0 for c in completions]


def _make(method, model_dir, tmp_path, **overrides):
    if method == "grpo":
        args = GRPOConfig(**_common(tmp_path, num_generations=4, max_completion_length=6, **overrides))
        prompts = Dataset.from_list([{"prompt": f"{i} + {i % 3} ="} for i in range(8)])
        return GRPOTrainer(model=model_dir, reward_funcs=_length_reward, args=args, train_dataset=prompts)
    if method == "sft":
        return SFTTrainer(model=model_dir, args=SFTConfig(**_common(tmp_path, **overrides)), train_dataset=_sft_data())
    return DPOTrainer(model=model_dir, args=DPOConfig(**_common(tmp_path, **overrides)), train_dataset=_dpo_data())


def _poison(trainer, bad_steps):
    """Put a NaN into the first layer's output in the training forwards (those that build a graph: not
    sampling, not the reference model) of the given (1-based) optimizer steps."""
    def hook(module, inputs, output):
        if module.training and torch.is_grad_enabled() and trainer.state.global_step + 1 in bad_steps:
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[0, 0, 0] = float("nan")
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return output

    trainer.model.model.layers[0].register_forward_hook(hook)


class _Snapshots(TrainerCallback):
    """Parameters and optimizer moments at the end of every step."""

    def __init__(self, trainer):
        self.params, self.moments = {}, {}
        trainer.add_callback(self)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.params[state.global_step] = [p.detach().clone() for p in model.parameters()]
        self.moments[state.global_step] = [
            s["exp_avg"].clone() for s in optimizer.state.values() if "exp_avg" in s
        ]
        return control


def _log_at(trainer, step):
    return next(h for h in trainer.state.log_history if h.get("step") == step and "loss" in h)


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_one_nan_batch_is_logged_as_nan_and_its_step_skipped(method, tiny_model_dir, tmp_path):
    trainer = _make(method, tiny_model_dir, tmp_path)
    _poison(trainer, {5})
    snapshots = _Snapshots(trainer)
    trainer.train()

    # the NaN shows as NaN (transformers' logging filter used to turn it into 0.0), and only at step 5
    assert math.isnan(_log_at(trainer, 5)["loss"])
    assert all(math.isfinite(_log_at(trainer, step)["loss"]) for step in (4, 6, trainer.state.global_step))
    assert _log_at(trainer, 5)["nonfinite_steps"] == 1 and _log_at(trainer, trainer.state.global_step)["nonfinite_steps"] == 1
    # step 5 changed neither a weight nor an optimizer moment; the steps around it did
    assert all(torch.equal(a, b) for a, b in zip(snapshots.params[4], snapshots.params[5]))
    assert all(torch.equal(a, b) for a, b in zip(snapshots.moments[4], snapshots.moments[5]))
    assert any(not torch.equal(a, b) for a, b in zip(snapshots.params[5], snapshots.params[6]))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_without_the_guard_one_nan_batch_poisons_the_run(tiny_model_dir, tmp_path):
    """What the guard prevents (and the NaN is at least visible in the log)."""
    trainer = _make("sft", tiny_model_dir, tmp_path, max_consecutive_nonfinite_steps=0)
    _poison(trainer, {5})
    trainer.train()
    assert math.isnan(_log_at(trainer, 5)["loss"]) and math.isnan(_log_at(trainer, 6)["loss"])
    assert not all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_persistent_nan_stops_the_run_naming_the_step(tiny_model_dir, tmp_path):
    trainer = _make("sft", tiny_model_dir, tmp_path, max_consecutive_nonfinite_steps=3)
    _poison(trainer, set(range(3, 100)))
    with pytest.raises(NonFiniteTrainingError, match=r"step 5\b.*3 optimizer steps in a row"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_no_checkpoint_with_nonfinite_weights(tiny_model_dir, tmp_path):
    trainer = _make("sft", tiny_model_dir, tmp_path, max_consecutive_nonfinite_steps=0, save_strategy="steps",
                    save_steps=1)
    _poison(trainer, {3})
    with pytest.raises(NonFiniteTrainingError, match="NaN/inf weights"):
        trainer.train()
    saved = sorted(name for name in os.listdir(tmp_path / "out") if name.startswith("checkpoint-"))
    assert saved == ["checkpoint-1", "checkpoint-2"]


def test_config_rejects_a_negative_limit(tmp_path):
    from posttrain import ConfigError

    with pytest.raises(ConfigError, match="max_consecutive_nonfinite_steps"):
        SFTConfig(output_dir=str(tmp_path), max_consecutive_nonfinite_steps=-1)


def test_cli_exits_2_with_one_line_naming_the_step(tiny_model_dir, tmp_path, capsys):
    """A model whose embedding row of a token every row uses is inf: every step is NaN."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.cli.main import main

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    token = tokenizer("=", add_special_tokens=False)["input_ids"][0]
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("inf")
    broken = tmp_path / "broken-model"
    model.save_pretrained(broken)
    tokenizer.save_pretrained(broken)
    data = tmp_path / "data.jsonl"
    _sft_data(16).to_json(str(data))
    code = main(["sft", "--model_name_or_path", str(broken), "--dataset_name", str(data), "--output_dir",
                 str(tmp_path / "run"), "--per_device_train_batch_size", "4", "--disable_tqdm", "true"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "step 3" in err.splitlines()[-1]


def test_ppo_skips_the_optimizer_steps_of_a_nan_update(tiny_model_dir, tmp_path):
    """PPO runs its own loop; the guard sits on its optimizer too (counting optimizer steps: 4 per update here)."""
    from posttrain import PPOConfig, PPOTrainer
    from posttrain.models.tiny import tiny_model_path

    args = PPOConfig(output_dir=str(tmp_path / "ppo"), per_device_train_batch_size=4, total_episodes=12,
                     response_length=6, num_ppo_epochs=2, num_mini_batches=2, learning_rate=1e-4, logging_steps=1,
                     save_strategy="no", disable_tqdm=True, num_sample_generations=0, max_consecutive_nonfinite_steps=5)
    prompts = Dataset.from_list([{"prompt": f"What is {i} + {i % 5}?"} for i in range(12)])
    trainer = PPOTrainer(args=args, model=tiny_model_dir, reward_model=tiny_model_path(reward=True),
                         train_dataset=prompts)

    def hook(module, inputs, output):
        if torch.is_grad_enabled() and trainer.state.global_step + 1 == 2:
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[0, 0, 0] = float("nan")
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return output

    trainer.policy.model.layers[0].register_forward_hook(hook)
    trainer.train()
    assert trainer.state.global_step == 3
    logged = [h for h in trainer.state.log_history if "nonfinite_steps" in h]
    assert logged and logged[0]["step"] == 2 and logged[-1]["nonfinite_steps"] == 4
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())
