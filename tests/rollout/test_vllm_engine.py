from __future__ import annotations

import importlib.util

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.rollout import VLLMRolloutEngine, make_rollout_engine
from posttrain.rollout.vllm_engine import _named_weights_for_vllm


def test_missing_vllm_is_one_clear_config_error(qwen2, tokenizer, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    with pytest.raises(ConfigError) as info:
        make_rollout_engine("vllm", qwen2, tokenizer)
    message = str(info.value)
    assert "vllm" in message and "not installed" in message and "'hf'" in message
    assert "\n" not in message


def test_vllm_without_cuda_is_one_clear_config_error(qwen2, tokenizer, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA GPU"):
        VLLMRolloutEngine(qwen2, tokenizer)


def test_weights_sent_to_vllm_are_merged_with_plain_names(tokenizer, make_qwen2):
    peft = pytest.importorskip("peft")
    base = make_qwen2(tokenizer, seed=2)
    plain_names = set(dict(base.named_parameters()))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    weight_before = layer.base_layer.weight.detach().clone()
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
    sent = {name: tensor.clone() for name, tensor in _named_weights_for_vllm(model)}
    assert set(sent) == plain_names
    assert torch.allclose(sent["model.layers.0.self_attn.q_proj.weight"], weight_before + delta, atol=1e-6)
    assert torch.equal(layer.base_layer.weight, weight_before)  # unmerged afterwards
