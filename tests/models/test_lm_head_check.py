"""The chunked output head against the model's own logits: known head transformations, the check at
trainer start, and the fallback to full logits for a transformation it does not know."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from datasets import Dataset

from posttrain.models.lm_head import (
    check_output_heads,
    head_disagreement,
    head_transform,
    token_logps,
    uses_full_logits,
)
from posttrain.models.tiny import build_tiny_model, build_tokenizer_variant


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer_variant("own_pad")


def _tiny(config_name: str, vocab_size: int, **fields):
    values = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=64, eos_token_id=0, bos_token_id=None, pad_token_id=0)
    values.update(fields)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_name)(**values)).eval()
    with torch.no_grad():  # random heads give near-uniform logits; larger ones show any scale error plainly
        model.get_output_embeddings().weight.mul_(30)
    return model


def _reference_logps(model, input_ids, attention_mask=None):
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.double(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


HEAD_TRANSFORMS = [
    ("GraniteConfig", dict(logits_scaling=8.0)),  # divides
    ("GraniteMoeConfig", dict(logits_scaling=8.0, num_local_experts=2, num_experts_per_tok=1)),
    ("HyperCLOVAXConfig", dict(logits_scaling=4.0)),  # the same field name, multiplies
    ("FalconH1Config", dict(lm_head_multiplier=5.0, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                            mamba_d_state=8, mamba_n_groups=1)),
    ("CohereConfig", dict(logit_scale=4.0)),
    ("Gemma2Config", dict(final_logit_softcapping=2.0, head_dim=16)),
    ("RecurrentGemmaConfig", dict(logits_soft_cap=2.0, lru_width=32, attention_window_size=4,
                                  block_types=["recurrent"])),
]


@pytest.mark.parametrize("config_name, fields", HEAD_TRANSFORMS, ids=[name for name, _ in HEAD_TRANSFORMS])
def test_chunked_logps_follow_each_known_head_transformation(config_name, fields):
    model = _tiny(config_name, 96, **fields)
    input_ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    out = token_logps(model, input_ids, torch.ones_like(input_ids), chunk_size=5)
    torch.testing.assert_close(out.logps.double(), _reference_logps(model, input_ids), rtol=0, atol=1e-4)
    gap, tolerance = head_disagreement(model)
    assert gap <= tolerance


def test_granite_logits_scaling_divides_and_hyperclovax_multiplies():
    granite = transformers.GraniteConfig(logits_scaling=8.0)
    hyperclovax = transformers.HyperCLOVAXConfig(logits_scaling=8.0)
    assert head_transform(type("M", (torch.nn.Module,), {"config": granite})()).scale == 1 / 8
    assert head_transform(type("M", (torch.nn.Module,), {"config": hyperclovax})()).scale == 8


class _DoubledLogits(transformers.LlamaForCausalLM):
    """A head transformation posttrain cannot know: the subclass rescales the logits in forward."""

    def forward(self, *args, **kwargs):
        outputs = super().forward(*args, **kwargs)
        if outputs.logits is not None:
            outputs.logits = outputs.logits * 2.0 + 0.5
        return outputs


def _doubled(tokenizer):
    config = build_tiny_model("llama", tokenizer).config
    torch.manual_seed(0)
    model = _DoubledLogits(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def _conversations(n: int = 4) -> Dataset:
    return Dataset.from_list([
        {"messages": [{"role": "user", "content": f"What is {i} + 2?"},
                      {"role": "assistant", "content": f"It is {i + 2}."}]}
        for i in range(n)
    ])


def test_an_unknown_head_transformation_falls_back_to_full_logits_with_one_warning(tokenizer, tmp_path, caplog):
    import posttrain

    model = _doubled(tokenizer)
    args = posttrain.SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=2,
                               learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
                               disable_tqdm=True)
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        trainer = posttrain.SFTTrainer(model=model, args=args, train_dataset=_conversations(),
                                       processing_class=tokenizer)
    warnings = [r for r in caplog.records if "does not reproduce the logits" in r.getMessage()]
    assert len(warnings) == 1 and "_DoubledLogits" in warnings[0].getMessage()
    assert uses_full_logits(model)

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        out = token_logps(model, batch["input_ids"], batch["completion_mask"], batch["attention_mask"])
        expected = _reference_logps(model, batch["input_ids"], batch["attention_mask"])
    mask = out.mask
    torch.testing.assert_close(out.logps[mask].double(), expected[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(loss.double(), -expected[mask].mean(), rtol=0, atol=1e-5)

    trainer.train()
    assert trainer.state.global_step == 2
    # the check ran once: a second trainer on the same model neither re-checks nor warns again
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        posttrain.SFTTrainer(model=model, args=args, train_dataset=_conversations(), processing_class=tokenizer)
    assert not [r for r in caplog.records if "does not reproduce the logits" in r.getMessage()]


def test_policy_and_reference_with_an_unknown_head_get_one_warning_and_right_dpo_logps(tokenizer, tmp_path, caplog):
    import posttrain

    rows = [{"prompt": f"What is {i} + 1?", "chosen": f" {i + 1}.", "rejected": f" {i + 9} maybe."} for i in range(4)]
    args = posttrain.DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=2, max_steps=1,
                               save_strategy="no", report_to="none", disable_tqdm=True)
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        trainer = posttrain.DPOTrainer(model=_doubled(tokenizer), ref_model=_doubled(tokenizer), args=args,
                                       train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    assert len([r for r in caplog.records if "does not reproduce the logits" in r.getMessage()]) == 1
    assert uses_full_logits(trainer.model) and uses_full_logits(trainer.reference.model)
    trainer.train()
    assert trainer.state.global_step == 1


def test_the_check_keeps_the_mode_and_the_global_random_state(tokenizer):
    model = build_tiny_model("gpt2", tokenizer).train()
    state = torch.get_rng_state()
    assert check_output_heads(model) == []
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), state)
    assert not uses_full_logits(model)


def test_a_lora_adapter_on_lm_head_keeps_the_soft_cap(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model("gemma2", tokenizer).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
    input_ids = torch.randint(0, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    out = token_logps(peft_model, input_ids, torch.ones_like(input_ids))
    torch.testing.assert_close(out.logps.double(), _reference_logps(peft_model, input_ids), rtol=0, atol=1e-5)
    assert check_output_heads(peft_model) == []


class _NeedsMoreInputs(transformers.LlamaForCausalLM):
    def forward(self, *args, extra_input=None, **kwargs):
        if extra_input is None:
            raise ValueError("this model needs extra_input")
        return super().forward(*args, **kwargs)


def test_a_model_the_check_cannot_run_is_named_in_a_warning_and_left_as_it_is(tokenizer, caplog):
    model = _NeedsMoreInputs(build_tiny_model("llama", tokenizer).config)
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        assert check_output_heads(model) == []
    assert any("could not check the output head of _NeedsMoreInputs" in r.getMessage() for r in caplog.records)
    assert not uses_full_logits(model)
