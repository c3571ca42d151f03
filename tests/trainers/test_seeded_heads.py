"""Weights a checkpoint lacks (a reward model's new score head) are drawn from the config's seed, so every
process and every run of the same seed starts from the same model."""

import torch
from transformers import AutoModelForSequenceClassification

from posttrain import RewardConfig
from posttrain.trainers.base import load_pretrained


def _score_head(tiny_model_dir, tmp_path, seed, global_seed):
    torch.manual_seed(global_seed)  # whatever the process drew before must not matter
    config = RewardConfig(output_dir=str(tmp_path), seed=seed)
    model = load_pretrained(tiny_model_dir, config, auto_class=AutoModelForSequenceClassification,
                            extra_kwargs={"num_labels": 1})
    return model.score.weight.detach().clone()


def test_new_head_depends_on_the_seed_only(tiny_model_dir, tmp_path):
    first = _score_head(tiny_model_dir, tmp_path, seed=0, global_seed=1)
    assert torch.equal(first, _score_head(tiny_model_dir, tmp_path, seed=0, global_seed=2))
    assert not torch.equal(first, _score_head(tiny_model_dir, tmp_path, seed=1, global_seed=1))


def test_loading_leaves_the_process_generator_alone(tiny_model_dir, tmp_path):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_pretrained(tiny_model_dir, RewardConfig(output_dir=str(tmp_path)),
                    auto_class=AutoModelForSequenceClassification, extra_kwargs={"num_labels": 1})
    assert torch.equal(torch.rand(3), expected)


def _lora_a(tiny_model_dir, tmp_path, seed, global_seed):
    from peft import LoraConfig

    from posttrain import SFTConfig
    from posttrain.trainers.base import apply_peft

    config = SFTConfig(output_dir=str(tmp_path), seed=seed)
    model = load_pretrained(tiny_model_dir, config)
    torch.manual_seed(global_seed)
    wrapped = apply_peft(model, LoraConfig(r=4, target_modules=["q_proj"]), config)
    return next(p for n, p in wrapped.named_parameters() if "lora_A" in n).detach().clone()


def test_lora_adapter_weights_depend_on_the_seed_only(tiny_model_dir, tmp_path):
    first = _lora_a(tiny_model_dir, tmp_path, seed=0, global_seed=1)
    assert torch.equal(first, _lora_a(tiny_model_dir, tmp_path, seed=0, global_seed=2))
    assert not torch.equal(first, _lora_a(tiny_model_dir, tmp_path, seed=1, global_seed=1))


def test_wrapping_with_an_adapter_leaves_the_process_generator_alone(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    from posttrain import SFTConfig
    from posttrain.trainers.base import apply_peft

    config = SFTConfig(output_dir=str(tmp_path), seed=0)
    model = load_pretrained(tiny_model_dir, config)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    apply_peft(model, LoraConfig(r=4, target_modules=["q_proj"]), config)
    assert torch.equal(torch.rand(3), expected)
