"""CISPO's cap on the importance weight: its own default (MiniMax-M1's 5), not PPO's clip range."""

import math

import pytest
import torch
from datasets import Dataset

from posttrain import GRPOConfig, GRPOTrainer
from posttrain.rollout.sequences import RolloutSequences
from posttrain.losses.policy import CISPO_DEFAULT_EPSILON_HIGH


def _reward(prompts, completions, **kwargs):
    return [0.0 for _ in completions]


def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=6, disable_tqdm=True, save_strategy="no", report_to="none")
    return GRPOConfig(**{**values, **overrides})


def test_cispo_gets_its_own_cap_unless_one_is_set(tmp_path):
    assert CISPO_DEFAULT_EPSILON_HIGH == 5.0
    assert _config(tmp_path, loss_type="cispo").epsilon_high == CISPO_DEFAULT_EPSILON_HIGH
    assert _config(tmp_path, loss_type="cispo", epsilon_high=1.2).epsilon_high == 1.2
    assert _config(tmp_path, loss_type="cispo", epsilon=0.1).epsilon_high == CISPO_DEFAULT_EPSILON_HIGH
    # the clipped objectives keep PPO's symmetric default
    assert _config(tmp_path, loss_type="dapo", epsilon=0.1).epsilon_high == 0.1


def _micro_batch(vocab_size):
    generator = torch.Generator().manual_seed(0)
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    return {
        "prompt_ids": torch.randint(5, vocab_size, (2, 3), generator=generator),
        "prompt_mask": torch.ones(2, 3, dtype=torch.long),
        "completion_ids": torch.randint(5, vocab_size, (2, 4), generator=generator).masked_fill(completion_mask == 0, 0),
        "completion_mask": completion_mask, "loss_mask": completion_mask.clone(),
        "advantages": torch.tensor([1.5, 0.5]), "is_truncated": torch.tensor([False, False]),
        "num_items_in_batch": completion_mask.sum().float(),
    }


def _float64_logps(model, inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    logits = model(input_ids=ids).logits.double()
    start = inputs["prompt_ids"].shape[1]
    log_probs = torch.log_softmax(logits[:, start - 1 : -1], dim=-1)
    return log_probs.gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("explicit_cap, expected_weight", [(None, 3.0), (1.2, 1.2)])
def test_a_ratio_of_three_is_weighted_three_by_default(tiny_model_dir, tmp_path, explicit_cap, expected_weight):
    overrides = {"loss_type": "cispo"} if explicit_cap is None else {"loss_type": "cispo", "epsilon_high": explicit_cap}
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_reward, args=_config(tmp_path, **overrides),
                          train_dataset=Dataset.from_list([{"prompt": "1 + 1 ="}] * 4))
    model = trainer.model
    model.train()
    inputs = _micro_batch(model.config.vocab_size)
    with torch.no_grad():
        current = _float64_logps(model, inputs)
    inputs["old_logps"] = (current - math.log(3.0)).float()  # every token's ratio pi / pi_old is 3
    loss = trainer.compute_loss(model, RolloutSequences.from_dict(inputs))
    mask = inputs["loss_mask"].double()
    advantages = inputs["advantages"].double()[:, None]
    expected = -(expected_weight * advantages * _float64_logps(model, inputs) * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert trainer._metrics["train"]["cispo_clip_ratio"][-1] == (0.0 if explicit_cap is None else 1.0)
