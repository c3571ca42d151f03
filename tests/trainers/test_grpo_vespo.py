"""GRPO with loss_type="vespo" (TRL 1.16's name): the Gamma-kernel weight of each sequence's ratio, in the trainer."""

import math

import pytest
import torch
from datasets import Dataset

from posttrain import GRPOConfig, GRPOTrainer
from posttrain.rollout.sequences import RolloutSequences


def _reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=6, disable_tqdm=True, save_strategy="no", report_to="none", loss_type="vespo")
    return GRPOConfig(**{**values, **overrides})


def _float64_logps(model, inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    logits = model(input_ids=ids).logits.double()
    start = inputs["prompt_ids"].shape[1]
    log_probs = torch.log_softmax(logits[:, start - 1 : -1], dim=-1)
    return log_probs.gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)


def test_vespo_config_keeps_trl_defaults():
    config = GRPOConfig(output_dir="o", per_device_train_batch_size=4, num_generations=4, loss_type="vespo")
    assert (config.vespo_k_pos, config.vespo_lambda_pos, config.vespo_k_neg, config.vespo_lambda_neg) == (2.0, 3.0, 3.0, 2.0)


def test_vespo_loss_in_the_trainer_weighs_each_sequence_by_its_kernel(tiny_model_dir, tmp_path):
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_reward, args=_config(tmp_path, vespo_k_neg=1.5),
                          train_dataset=Dataset.from_list([{"prompt": "1 + 1 ="}] * 4))
    model = trainer.model
    model.train()
    generator = torch.Generator().manual_seed(0)
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    vocab = model.config.vocab_size
    inputs = {
        "prompt_ids": torch.randint(5, vocab, (2, 3), generator=generator), "prompt_mask": torch.ones(2, 3, dtype=torch.long),
        "completion_ids": torch.randint(5, vocab, (2, 4), generator=generator).masked_fill(completion_mask == 0, 0),
        "completion_mask": completion_mask, "loss_mask": completion_mask.clone(),
        "advantages": torch.tensor([1.5, -0.5]), "is_truncated": torch.tensor([False, False]),
        "num_items_in_batch": completion_mask.sum().float(),
    }
    with torch.no_grad():
        current = _float64_logps(model, inputs)
    inputs["old_logps"] = (current - 0.1).float()  # every token's log-ratio is 0.1
    loss = trainer.compute_loss(model, RolloutSequences.from_dict(inputs))
    # row 0: 3 tokens, w = e^0.3, A > 0: k = 2, lambda = 3; row 1: 4 tokens, w = e^0.4, A < 0: k = 1.5, lambda = 2
    phis = [math.exp(0.3) ** 2 * math.exp(3 * (1 - math.exp(0.3))), math.exp(0.4) ** 1.5 * math.exp(2 * (1 - math.exp(0.4)))]
    weights = torch.tensor([[phis[0] * 1.5], [phis[1] * -0.5]], dtype=torch.float64)
    mask = completion_mask.double()
    expected = -(weights * _float64_logps(model, inputs) * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert trainer._metrics["train"]["vespo/phi_seq_mean"][-1] == pytest.approx((3 * phis[0] + 4 * phis[1]) / 7, rel=1e-5)


def test_vespo_trains_and_logs_its_weight(tiny_model_dir, tmp_path):
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_reward, args=_config(tmp_path, max_steps=1, logging_steps=1),
                          train_dataset=Dataset.from_list([{"prompt": f"{i} + 1 ="} for i in range(4)]))
    trainer.train()
    record = next(r for r in trainer.state.log_history if "loss" in r)
    assert record["vespo/phi_seq_mean"] == pytest.approx(1.0)  # on-policy: w = 1, phi(1) = 1
    assert math.isfinite(record["loss"])
