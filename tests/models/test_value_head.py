from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Qwen2Config, Qwen2ForCausalLM

from posttrain.models.value_head import (
    VALUE_HEAD_FILE,
    AutoModelForCausalLMWithValueHead,
    last_token_scores,
    token_values,
)


def _tiny_config(**extra) -> Qwen2Config:
    return Qwen2Config(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=32, pad_token_id=0, **extra)


@pytest.fixture
def lm():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(_tiny_config()).eval()


def test_forward_returns_logits_loss_and_one_value_per_position(lm):
    model = AutoModelForCausalLMWithValueHead(lm).eval()
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    logits, loss, values = model(ids, attention_mask=torch.ones_like(ids))
    assert logits.shape == (2, 4, 50) and logits.dtype == torch.float32
    assert loss is None
    assert values.shape == (2, 4)
    # the head is a linear map of the final hidden state: recompute it by hand
    hidden = lm(ids, output_hidden_states=True).hidden_states[-1]
    expected = hidden @ model.v_head.summary.weight[0] + model.v_head.summary.bias[0]
    torch.testing.assert_close(values, expected)
    torch.testing.assert_close(logits, lm(ids).logits)


def test_save_then_load_restores_head_and_directory_loads_as_plain_lm(lm, tmp_path):
    model = AutoModelForCausalLMWithValueHead(lm)
    with torch.no_grad():
        model.v_head.summary.weight.fill_(0.25)
        model.v_head.summary.bias.fill_(-1.5)
    model.save_pretrained(tmp_path / "vh")
    assert os.path.isfile(tmp_path / "vh" / VALUE_HEAD_FILE)

    again = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "vh"))
    assert torch.all(again.v_head.summary.weight == 0.25)
    assert again.v_head.summary.bias.item() == -1.5

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "vh")
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(plain(ids).logits, lm(ids).logits)


def test_loads_head_stored_inside_the_weight_file(lm, tmp_path):
    """Older checkpoints kept `v_head.summary.*` among the model's own tensors."""
    from safetensors.torch import load_file, save_file

    lm.save_pretrained(tmp_path / "old")
    weights = load_file(tmp_path / "old" / "model.safetensors")
    weights["v_head.summary.weight"] = torch.full((1, 16), 0.5)
    weights["v_head.summary.bias"] = torch.tensor([2.0])
    save_file(weights, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "old"))
    assert torch.all(model.v_head.summary.weight == 0.5) and model.v_head.summary.bias.item() == 2.0


def test_token_values_of_a_reward_model_read_the_score_head_at_every_position():
    torch.manual_seed(0)
    reward_model = AutoModelForSequenceClassification.from_config(_tiny_config(num_labels=1)).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [4, 5, 6, 7, 8]])  # row 0 left-padded
    mask = (ids != 0).long()
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    values = token_values(reward_model, ids, mask, position_ids)
    assert values.shape == (2, 5)
    # the model's own pooled score reads the last non-pad token, which here is the last position
    pooled = reward_model(ids, attention_mask=mask, position_ids=position_ids).logits[:, 0]
    torch.testing.assert_close(values[:, -1], pooled)
    torch.testing.assert_close(last_token_scores(reward_model, ids, mask, position_ids), pooled)


def test_last_token_scores_handle_right_padding():
    torch.manual_seed(0)
    reward_model = AutoModelForSequenceClassification.from_config(_tiny_config(num_labels=1)).eval()
    right = torch.tensor([[5, 6, 7, 0, 0]])
    alone = torch.tensor([[5, 6, 7]])
    score_padded = last_token_scores(reward_model, right, (right != 0).long())
    score_alone = last_token_scores(reward_model, alone, torch.ones_like(alone))
    torch.testing.assert_close(score_padded, score_alone)


def test_values_flow_through_a_peft_wrapper(lm):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        lm, peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    assert model.is_peft_model
    ids = torch.tensor([[3, 4, 5]])
    values = token_values(model, ids, torch.ones_like(ids))
    values.sum().backward()
    assert model.v_head.summary.weight.grad is not None
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)

    seq_cls = get_peft_model(
        AutoModelForSequenceClassification.from_config(_tiny_config(num_labels=1)),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="SEQ_CLS"),
    )
    assert token_values(seq_cls, ids, torch.ones_like(ids)).shape == (1, 3)
