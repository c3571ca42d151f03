from __future__ import annotations

import pytest
import torch
import transformers

from posttrain.rollout import HFRolloutEngine, SamplingParams
from posttrain.rollout.batch import left_pad
from posttrain.rollout.kv_cache import reserved_dynamic_cache
from posttrain.rollout.lean_decode import LeanDecoder


def _spread(model):
    # larger weights than the default init: logits far from uniform, so comparisons mean something
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    return model.eval()


def _common(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )


def build(arch: str, tokenizer, **extra):
    torch.manual_seed(0)
    if arch == "qwen2":
        return _spread(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_common(tokenizer), **extra)))
    if arch == "llama":
        return _spread(transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**_common(tokenizer), attention_bias=True, mlp_bias=True, **extra)))
    if arch == "qwen3":
        return _spread(transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_common(tokenizer), head_dim=16, **extra)))
    raise ValueError(arch)


def _lean_and_model_logits(model, prompts, steps: int):
    """Feed the same tokens through the model's forward and through the lean step; both logits per step."""
    ids, mask = left_pad(prompts, 0, torch.device("cpu"))
    width = ids.shape[1]
    caches = [reserved_dynamic_cache(model.config, width + steps) for _ in range(2)]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    lean = LeanDecoder.build(model)
    assert lean is not None
    lean.prepare(width + steps, torch.device("cpu"))
    with torch.no_grad():
        logits = [model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=c).logits[:, -1]
                  for c in caches]
        attention = torch.cat([mask, torch.ones(len(prompts), steps, dtype=torch.long)], dim=1)
        next_position = mask.sum(-1)
        pairs = []
        for step in range(steps):
            tokens = logits[0].argmax(-1)
            reference = model(input_ids=tokens[:, None], attention_mask=attention[:, : width + step + 1],
                              position_ids=next_position[:, None], past_key_values=caches[0]).logits[:, -1]
            ours = lean.step(tokens, attention[:, : width + step + 1], next_position, caches[1])
            pairs.append((reference, ours))
            logits = [reference, ours]
            next_position = next_position + 1
    return pairs


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
def test_lean_step_logits_match_the_model_forward(arch, tokenizer, prompts):
    assert len({len(p) for p in prompts}) > 1  # left padding: the forward packs grouped query heads
    model = build(arch, tokenizer)
    assert model.config.num_attention_heads > model.config.num_key_value_heads
    pairs = _lean_and_model_logits(model, prompts, steps=6)
    for reference, ours in pairs:
        assert ours.dtype == torch.float32
        # bit for bit: a last-bit difference can flip a sampled token
        assert torch.equal(ours, reference.float())


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_lean_step_logits_match_the_model_forward_without_padding(arch, tokenizer, prompts):
    model = build(arch, tokenizer)
    same_length = [prompt[:3] for prompt in prompts]  # no padding: the forward passes no mask, SDPA groups heads
    for reference, ours in _lean_and_model_logits(model, same_length, steps=4):
        assert torch.equal(ours, reference.float())


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
def test_engine_samples_the_same_tokens_with_and_without_the_lean_step(arch, tokenizer, prompts):
    model = build(arch, tokenizer)
    sampling = SamplingParams(max_completion_length=10, temperature=1.0)
    batches = [
        HFRolloutEngine(model, tokenizer, lean_decode=lean).generate(
            prompts, num_generations=3, sampling=sampling, generator=torch.Generator().manual_seed(3))
        for lean in (False, True)
    ]
    assert torch.equal(batches[0].completion_ids, batches[1].completion_ids)
    assert torch.equal(batches[0].completion_mask, batches[1].completion_mask)


def test_memory_levers_keep_the_lean_step(tokenizer, prompts):
    """activation_offloading and tiled_mlp replace layer and MLP forwards; without gradients those are the
    modules' own, so sampling keeps the lean step and draws the same tokens as the unwrapped model."""
    from posttrain.models.offload import enable_activation_offloading
    from posttrain.models.tiling import enable_tiled_mlp

    plain = build("qwen2", tokenizer)
    levered = build("qwen2", tokenizer)
    enable_activation_offloading(levered)
    enable_tiled_mlp(levered, 4)  # shorter than the prompts: the prefill is tiled, the decode steps are not
    assert LeanDecoder.build(levered) is not None
    sampling = SamplingParams(max_completion_length=10, temperature=1.0)
    batches = [HFRolloutEngine(model, tokenizer).generate(prompts, num_generations=3, sampling=sampling,
                                                          generator=torch.Generator().manual_seed(3))
               for model in (plain, levered)]
    assert torch.equal(batches[0].completion_ids, batches[1].completion_ids)
    levered.forward = levered.forward  # any other replaced forward still turns the lean step off
    assert LeanDecoder.build(levered) is None


def test_lora_adapters_apply_in_the_lean_step_and_can_be_disabled(tokenizer, prompts):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build("qwen2", tokenizer),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)  # B starts at zero: make the adapter change the output
    sampling = SamplingParams(max_completion_length=10, do_sample=False)

    def greedy(lean: bool, adapters: bool):
        engine = HFRolloutEngine(model, tokenizer, lean_decode=lean)
        if adapters:
            return engine.generate(prompts, sampling=sampling).completion_ids
        with model.disable_adapter():
            return engine.generate(prompts, sampling=sampling).completion_ids

    assert LeanDecoder.build(model) is not None
    with_adapters, without = greedy(True, True), greedy(True, False)
    assert not torch.equal(with_adapters, without)
    assert torch.equal(with_adapters, greedy(False, True))
    assert torch.equal(without, greedy(False, False))


def test_unsupported_models_fall_back_to_the_model_forward(tokenizer):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    assert LeanDecoder.build(gpt2) is None
    sliding = build("qwen2", tokenizer, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert "sliding_attention" in sliding.config.layer_types
    assert LeanDecoder.build(sliding) is None
    dynamic = build("llama", tokenizer, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert LeanDecoder.build(dynamic) is None
    hooked = build("qwen2", tokenizer)
    assert LeanDecoder.build(hooked) is not None
    hooked.model.layers[0].mlp.register_forward_hook(lambda module, args, output: output * 2)
    assert LeanDecoder.build(hooked) is None


def test_output_capturing_hooks_do_not_disable_the_lean_step(tokenizer, prompts):
    model = build("qwen2", tokenizer)
    with torch.no_grad():
        model(torch.tensor([prompts[0]]), output_hidden_states=True)  # transformers installs its capture hooks
    assert any(module._forward_hooks for module in model.modules())
    assert LeanDecoder.build(model) is not None


def _wrap_forward_in_autocast(model):
    """What accelerate's ``prepare_model`` does for bf16 mixed precision: forward replaced on the instance."""
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32

    model._original_forward = model.forward
    autocast_forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward.__func__)
    model.forward = MethodType(convert_outputs_to_fp32(autocast_forward), model)
    return model


def test_a_forward_wrapped_in_autocast_decodes_as_the_wrapper_does(tokenizer, prompts):
    model = _wrap_forward_in_autocast(build("qwen2", tokenizer))
    assert LeanDecoder.build(model) is None  # outside autocast the lean step would skip the wrapper's casts
    sampling = SamplingParams(max_completion_length=6, do_sample=False)
    plain = HFRolloutEngine(model, tokenizer, lean_decode=False).generate(prompts, sampling=sampling)
    assert torch.equal(HFRolloutEngine(model, tokenizer).generate(prompts, sampling=sampling).completion_ids,
                       plain.completion_ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainers sample: under the training autocast
        assert LeanDecoder.build(model) is not None
        lean = HFRolloutEngine(model, tokenizer).generate(prompts, sampling=sampling)
        forward = HFRolloutEngine(model, tokenizer, lean_decode=False).generate(prompts, sampling=sampling)
    assert torch.equal(lean.completion_ids, forward.completion_ids)
