"""Packed rows attend per sequence without a (tokens x tokens) mask, and everything else is transformers' SDPA."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    causal_mask_function,
    sliding_window_causal_mask_function,
)

from posttrain.models.offload import enable_activation_offloading
from posttrain.models.packed_attention import (
    PACKED_SDPA,
    PackedSequences,
    packed_sequence_bounds,
    use_packed_attention,
)
from posttrain.models.tiny import MATRIX_ARCHITECTURES, build_tiny_model, build_tokenizer_variant

LENGTHS = (7, 1, 12, 5, 9)  # a one-token sequence included


@pytest.fixture(scope="module")
def own_pad_tokenizer():
    return build_tokenizer_variant("own_pad")


def packed_row(vocab_size: int):
    """One row of the LENGTHS sequences, position ids restarting at 0, each sequence's first token unlabelled."""
    total = sum(LENGTHS)
    input_ids = torch.randint(5, vocab_size, (1, total), generator=torch.Generator().manual_seed(0))
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    labels = input_ids.masked_fill(position_ids == 0, -100)
    return input_ids, position_ids, labels


def float64_model(arch: str, tokenizer) -> torch.nn.Module:
    dropout_off = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if arch == "gpt2" else {}
    model = build_tiny_model(arch, tokenizer, **dropout_off)
    if arch in ("mixtral", "qwen3_moe"):
        model.set_experts_implementation("eager")  # the grouped-matmul experts take no float64
    return model.double().train()


def loss_and_grads(model, input_ids, position_ids, labels):
    model.zero_grad(set_to_none=True)
    # use_cache=False as the trainers pass it: with a cache transformers does not look for packed sequences at all
    loss = model(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


class MaskRecorder:
    """Records what the packed implementation's mask function hands the layers."""

    def __init__(self, monkeypatch):
        self.masks = []
        original = ALL_MASK_ATTENTION_FUNCTIONS[PACKED_SDPA]

        def record(*args, **kwargs):
            mask = original(*args, **kwargs)
            self.masks.append(mask)
            return mask

        monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS, PACKED_SDPA, record)


@pytest.mark.parametrize("arch", list(MATRIX_ARCHITECTURES))
def test_packed_rows_give_the_masked_sdpa_loss_and_gradients(arch, own_pad_tokenizer, monkeypatch):
    plain = float64_model(arch, own_pad_tokenizer)
    batch = packed_row(plain.config.vocab_size)
    model = copy.deepcopy(plain)
    switched = use_packed_attention(model) == [True]
    assert switched == (plain.config._attn_implementation == "sdpa")  # Gemma 2 runs eager attention: left alone
    if not switched:
        return
    recorder = MaskRecorder(monkeypatch)
    reference_loss, reference_grads = loss_and_grads(plain, *batch)
    loss, grads = loss_and_grads(model, *batch)
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=1e-12)
    assert grads.keys() == reference_grads.keys() and grads
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-10, msg=name)
    masks = [mask for mask in recorder.masks if mask is not None]
    if getattr(plain.config, "sliding_window", None):
        # a 4-token window inside longer sequences is not plain causal packing: transformers' full mask
        assert masks and all(torch.is_tensor(mask) for mask in masks)
    else:
        assert masks and all(isinstance(mask, PackedSequences) for mask in masks)
        assert masks[0].bounds == ((0, 7), (7, 8), (8, 20), (20, 25), (25, 34))


def test_a_packed_row_scores_each_sequence_as_if_alone(own_pad_tokenizer):
    """Not only transformers' mask reproduced: every sequence of the row gets the logits it gets alone."""
    model = float64_model("qwen2", own_pad_tokenizer)
    use_packed_attention(model)
    input_ids, position_ids, _ = packed_row(model.config.vocab_size)
    with torch.no_grad():
        packed = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        start = 0
        for length in LENGTHS:
            piece = slice(start, start + length)
            start += length
            alone = model(input_ids=input_ids[:, piece], use_cache=False).logits
            torch.testing.assert_close(packed[:, piece], alone, rtol=0, atol=1e-10)


def test_offloaded_layers_recompute_the_packed_attention(own_pad_tokenizer):
    plain = float64_model("llama", own_pad_tokenizer)
    batch = packed_row(plain.config.vocab_size)
    reference_loss, reference_grads = loss_and_grads(plain, *batch)
    model = copy.deepcopy(plain)
    use_packed_attention(model)
    enable_activation_offloading(model)
    loss, grads = loss_and_grads(model, *batch)
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=1e-12)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-10, msg=name)


def test_other_batches_are_transformers_sdpa_bit_for_bit(own_pad_tokenizer):
    """Padded rows, a single sequence and cached generation go through SDPA's own mask and attention."""
    plain = build_tiny_model("qwen2", own_pad_tokenizer).eval()
    model = copy.deepcopy(plain)
    use_packed_attention(model)
    input_ids = torch.randint(5, plain.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    with torch.no_grad():
        for kwargs in (dict(attention_mask=attention_mask), dict(), dict(position_ids=torch.arange(11)[None])):
            assert torch.equal(model(input_ids=input_ids, use_cache=False, **kwargs).logits,
                               plain(input_ids=input_ids, use_cache=False, **kwargs).logits)
        generated = [m.generate(input_ids[:1], max_new_tokens=5, do_sample=False) for m in (plain, model)]
    assert torch.equal(generated[0], generated[1])


def _call(mask_function, length=10, **overrides):
    kwargs = dict(batch_size=1, q_length=length, kv_length=length, q_offset=0, kv_offset=0, mask_function=mask_function,
                  attention_mask=None, local_size=None, device="cpu")
    kwargs.update(overrides)
    return packed_sequence_bounds(kwargs)


def _packing(mask_function, sequence_ids):
    ids = torch.tensor(sequence_ids)

    def masked(batch_idx, head_idx, q_idx, kv_idx):
        return mask_function(batch_idx, head_idx, q_idx, kv_idx) & (ids[q_idx] == ids[kv_idx])

    return masked


def test_the_packed_layout_is_read_from_the_mask_function():
    sequence_ids = [0, 0, 0, 1, 2, 2, 2, 2, 3, 3]
    assert _call(_packing(causal_mask_function, sequence_ids)).bounds == ((0, 3), (3, 4), (4, 8), (8, 10))
    assert _call(causal_mask_function) is None  # one sequence: no mask at all, as SDPA's causal path
    # a window shorter than a sequence, attention across sequences, a batch, a cache offset, a padding mask: not
    # plain causal packing
    assert _call(_packing(sliding_window_causal_mask_function(2), sequence_ids)) is None

    def leaky(batch_idx, head_idx, q_idx, kv_idx):
        return causal_mask_function(batch_idx, head_idx, q_idx, kv_idx) & ((kv_idx != q_idx - 1) | (q_idx != 3))

    assert _call(leaky) is None  # token 3 skips token 2 but sees token 0: not a sequence boundary
    packed = _packing(causal_mask_function, sequence_ids)
    assert _call(packed, batch_size=2) is None
    assert _call(packed, q_offset=3) is None
    assert _call(packed, attention_mask=torch.ones(1, 10, dtype=torch.bool)) is None


@pytest.mark.slow  # a fresh interpreter loads the saved model, about 5 s
def test_a_saved_model_names_plain_sdpa(own_pad_tokenizer, tmp_path):
    """The implementation is registered in this process only: a saved config must not ask another one for it."""
    model = build_tiny_model("qwen2", own_pad_tokenizer)
    use_packed_attention(model)
    model.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "config.json")) as handle:
        assert PACKED_SDPA not in json.dumps(json.load(handle))
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, transformers; "
         "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]); print(m.config._attn_implementation)",
         str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split()[-1] == "sdpa"


def test_a_peft_model_is_switched_through_its_base_model(own_pad_tokenizer):
    from peft import LoraConfig, get_peft_model

    plain = float64_model("llama", own_pad_tokenizer)
    batch = packed_row(plain.config.vocab_size)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # adapters that act
    reference = get_peft_model(copy.deepcopy(plain), lora)
    wrapped = copy.deepcopy(reference)
    assert use_packed_attention(wrapped, None) == [True, False]
    assert wrapped.get_base_model().config._attn_implementation == PACKED_SDPA
    reference_loss, reference_grads = loss_and_grads(reference, *batch)
    loss, grads = loss_and_grads(wrapped, *batch)
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=1e-12)
    assert any("lora_" in name for name in grads)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-10, msg=name)


# ----------------------------------------------------------------------------- long padded batches, padding-free


def padded_batch(vocab_size: int):
    """Three rows of a left-padded prompt (widths 3, 5, 1) and a right-padded completion (6, 2, 4 tokens)."""
    prompts, completions = (3, 5, 1), (6, 2, 4)
    width = max(prompts) + max(completions)
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.zeros(3, width, dtype=torch.long)
    attention_mask = torch.zeros(3, width, dtype=torch.long)
    completion_mask = torch.zeros(3, width, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        start, stop = max(prompts) - prompt, max(prompts) + completion
        input_ids[row, start:stop] = torch.randint(5, vocab_size, (stop - start,), generator=generator)
        attention_mask[row, start:stop] = 1
        completion_mask[row, max(prompts):stop] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, completion_mask, attention_mask, position_ids


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "qwen3_moe"])
def test_long_padded_batches_are_scored_padding_free(arch, own_pad_tokenizer, monkeypatch):
    """token_logps of a padded batch (as online methods score rollouts): one packed row with the packed attention
    gives the padded forward's log-probs, entropies and gradients, and no (B, 1, L, L) mask is built."""
    from posttrain.models import packed_attention
    from posttrain.models.lm_head import token_logps

    monkeypatch.setattr(packed_attention, "PADDING_FREE_MIN_LENGTH", 8)  # the batch is 11 wide
    plain = float64_model(arch, own_pad_tokenizer)
    batch = padded_batch(plain.config.vocab_size)
    model = copy.deepcopy(plain)
    use_packed_attention(model)
    recorder = MaskRecorder(monkeypatch)
    results, router_losses = [], []
    for candidate in (plain, model):
        candidate.zero_grad(set_to_none=True)
        scored = token_logps(candidate, *batch, with_entropy=True)
        (scored.logps.sum() + 0.1 * scored.entropy.sum() + scored.router_loss).backward()  # MoE: the router loss too
        grads = {name: p.grad.clone() for name, p in candidate.named_parameters() if p.grad is not None}
        results.append((scored.logps.detach(), scored.entropy.detach(), grads))
        router_losses.append(scored.router_loss)
    assert [type(mask) for mask in recorder.masks] == [PackedSequences]
    assert recorder.masks[0].bounds == ((0, 9), (9, 16), (16, 21))
    (logps, entropy, grads), (packed_logps, packed_entropy, packed_grads) = results
    assert bool((logps != 0).any())
    torch.testing.assert_close(packed_logps, logps, rtol=0, atol=1e-10)
    torch.testing.assert_close(packed_entropy, entropy, rtol=0, atol=1e-10)
    assert packed_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=0, atol=1e-10, msg=name)
    if arch == "qwen3_moe":  # the load-balancing loss over the same tokens, padding excluded either way
        assert torch.is_tensor(router_losses[0]) and router_losses[0].item() > 0
        torch.testing.assert_close(router_losses[1], router_losses[0], rtol=0, atol=1e-10)


def test_the_padding_free_layout_is_used_only_where_it_is_the_same(own_pad_tokenizer, monkeypatch):
    from posttrain.models import packed_attention
    from posttrain.models.lm_head import target_positions
    from posttrain.models.packed_attention import padding_free_layout

    model = build_tiny_model("qwen2", own_pad_tokenizer)
    input_ids, completion_mask, attention_mask, position_ids = padded_batch(model.config.vocab_size)
    selected = target_positions(completion_mask, position_ids)
    assert padding_free_layout(model, input_ids, attention_mask, position_ids, selected) is None  # plain sdpa
    use_packed_attention(model)
    assert padding_free_layout(model, input_ids, attention_mask, position_ids, selected) is None  # narrower than 2,048
    monkeypatch.setattr(packed_attention, "PADDING_FREE_MIN_LENGTH", 8)
    packed_ids, packed_positions, index = padding_free_layout(model, input_ids, attention_mask, position_ids, selected)
    assert packed_ids.shape == (1, 21) and torch.equal(packed_ids[0], input_ids[attention_mask.bool()])
    assert packed_positions[0].tolist() == list(range(9)) + list(range(7)) + list(range(5))
    assert index.shape == (int(selected.sum()),)
    assert padding_free_layout(model, input_ids, attention_mask, None, selected) is not None  # positions counted
    holed = attention_mask.clone()
    holed[0, 6] = 0
    shifted = position_ids + 1
    for mask, positions in ((holed, position_ids), (attention_mask, shifted), (torch.ones_like(attention_mask), None)):
        assert padding_free_layout(model, input_ids, mask, positions, selected) is None


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen3_moe"])  # tied, untied head, MoE router loss
def test_the_sft_head_scores_long_padded_batches_padding_free(arch, own_pad_tokenizer, monkeypatch):
    from posttrain.models import packed_attention
    from posttrain.models.lm_head import target_positions, weighted_target_nll

    monkeypatch.setattr(packed_attention, "PADDING_FREE_MIN_LENGTH", 8)
    plain = float64_model(arch, own_pad_tokenizer)
    input_ids, completion_mask, attention_mask, position_ids = padded_batch(plain.config.vocab_size)
    selected = target_positions(completion_mask, position_ids)
    weights = torch.linspace(0.5, 1.5, int(selected.sum()), dtype=torch.float64)
    model = copy.deepcopy(plain)
    use_packed_attention(model)
    recorder = MaskRecorder(monkeypatch)
    results = []
    for candidate in (plain, model):
        candidate.zero_grad(set_to_none=True)
        loss, _ = weighted_target_nll(candidate, input_ids, selected, weights, attention_mask, position_ids)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in candidate.named_parameters() if p.grad is not None}))
    assert [type(mask) for mask in recorder.masks] == [PackedSequences]
    (loss, grads), (packed_loss, packed_grads) = results
    torch.testing.assert_close(packed_loss, loss, rtol=0, atol=1e-10)
    assert packed_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("arch,variant", [("qwen2", "pad_is_eos"), ("gpt2", "no_pad"), ("llama", "own_pad")])
def test_reward_scores_and_values_of_long_padded_batches_are_padding_free(arch, variant, monkeypatch):
    """Reward models (RewardTrainer, PPO, model rewards) and value models (PPO) read a long padded batch as one
    packed row: the same scores, values and gradients as the padded forward, and no (B, 1, L, L) mask."""
    from posttrain.models import packed_attention
    from posttrain.models.reward_scoring import sequence_scores
    from posttrain.models.value_head import AutoModelForCausalLMWithValueHead, token_values

    monkeypatch.setattr(packed_attention, "PADDING_FREE_MIN_LENGTH", 8)  # the batch is 11 wide
    tokenizer = build_tokenizer_variant(variant)
    dropout_off = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if arch == "gpt2" else {}
    classifier = build_tiny_model(arch, tokenizer, reward=True, **dropout_off).double().train()
    torch.manual_seed(3)
    with_value_head = AutoModelForCausalLMWithValueHead(build_tiny_model(arch, tokenizer, **dropout_off)).double().train()
    input_ids, _, attention_mask, position_ids = padded_batch(classifier.config.vocab_size)
    attended = attention_mask.bool()
    for plain in (classifier, with_value_head):
        model = copy.deepcopy(plain)
        assert use_packed_attention(model) == [True]
        recorder = MaskRecorder(monkeypatch)
        results = []
        for candidate in (plain, model):
            candidate.zero_grad(set_to_none=True)
            values = token_values(candidate, input_ids, attention_mask, position_ids)
            scores = sequence_scores(candidate, input_ids, attention_mask) if plain is classifier else values.new_zeros(3)
            (scores.sum() + (values * attention_mask).square().sum()).backward()
            grads = {name: p.grad.clone() for name, p in candidate.named_parameters() if p.grad is not None}
            results.append((scores.detach(), values.detach(), grads))
        assert recorder.masks and all(type(mask) is PackedSequences for mask in recorder.masks)
        assert recorder.masks[0].bounds == ((0, 9), (9, 16), (16, 21))
        (scores, values, grads), (packed_scores, packed_values, packed_grads) = results
        torch.testing.assert_close(packed_scores, scores, rtol=0, atol=1e-10)
        torch.testing.assert_close(packed_values[attended], values[attended], rtol=0, atol=1e-10)
        assert bool((packed_values[~attended] == 0).all())
        assert grads and packed_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(packed_grads[name], grad, rtol=0, atol=1e-10, msg=name)
