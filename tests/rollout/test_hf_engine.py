from __future__ import annotations

import pytest
import torch

from posttrain.errors import ConfigError, DataError
from posttrain.rollout import HFRolloutEngine, RolloutBatch, SamplingParams, make_rollout_engine

GREEDY = SamplingParams(max_completion_length=12, do_sample=False)


def hf_generate(model, tokenizer, prompts, max_new_tokens, eos_token_id=None, **kwargs) -> list[list[int]]:
    """Reference completions from model.generate, left-padded batch, cut at the first EOS (inclusive)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    encoded = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    tokenizer.padding_side = side
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    output = model.generate(
        **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **kwargs
    )
    rows = []
    for row in output[:, encoded["input_ids"].shape[1] :].tolist():
        kept = []
        for token in row:
            kept.append(token)
            if token == eos:
                break
        rows.append(kept)
    return rows


def test_greedy_matches_model_generate_with_left_padding(qwen2, tokenizer, prompts):
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: left padding is exercised
    batch = HFRolloutEngine(qwen2, tokenizer).generate(prompts, sampling=GREEDY)
    expected = hf_generate(qwen2, tokenizer, prompts, 12)
    assert batch.completion_token_lists() == expected
    assert batch.completion_ids.shape == (3, 12)
    assert batch.prompt_ids.shape == (3, max(len(p) for p in prompts))
    for row, prompt in enumerate(prompts):
        real = batch.prompt_ids[row][batch.prompt_mask[row].bool()].tolist()
        assert real == prompt
        assert batch.prompt_mask[row, : batch.prompt_ids.shape[1] - len(prompt)].sum() == 0  # padding on the left


def test_groups_are_prompt_major_and_identical_under_greedy(qwen2, tokenizer, prompts):
    batch = HFRolloutEngine(qwen2, tokenizer).generate(prompts, num_generations=3, sampling=GREEDY)
    assert batch.group_size == 3 and batch.num_prompts == 3 and batch.num_rows == 9
    assert batch.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    single = hf_generate(qwen2, tokenizer, prompts, 12)
    rows = batch.completion_token_lists()
    for g in range(3):
        for k in range(3):
            assert rows[g * 3 + k] == single[g]
            assert torch.equal(batch.prompt_ids[g * 3 + k], batch.prompt_ids[g * 3])


def test_eos_masks_truncation_and_early_finish_match_generate(qwen2, tokenizer, prompts):
    # Make a token the model actually emits the EOS, so rows stop at different steps.
    free_run = HFRolloutEngine(qwen2, tokenizer, eos_token_ids=[]).generate(prompts, sampling=GREEDY)
    first_row = free_run.completion_ids[0].tolist()
    eos = first_row[4]
    stop_at = first_row.index(eos)  # first occurrence
    engine = HFRolloutEngine(qwen2, tokenizer, eos_token_ids=[eos])
    batch = engine.generate(prompts, num_generations=2, sampling=GREEDY)
    expected = hf_generate(qwen2, tokenizer, prompts, 12, eos_token_id=eos)
    assert batch.completion_token_lists()[::2] == expected
    assert batch.completion_lengths[0].item() == stop_at + 1
    assert batch.completion_ids[0, stop_at].item() == eos
    assert torch.all(batch.completion_ids[0, stop_at + 1 :] == tokenizer.pad_token_id)
    assert batch.completion_mask[0].tolist() == [1] * (stop_at + 1) + [0] * (batch.completion_ids.shape[1] - stop_at - 1)
    for row, tokens in enumerate(batch.completion_token_lists()):
        ended_with_eos = tokens[-1] == eos
        assert batch.is_truncated[row].item() == (not ended_with_eos)
        assert ended_with_eos or len(tokens) == 12
    assert batch.is_truncated.dtype == torch.bool
    assert batch.is_truncated.any() or batch.completion_ids.shape[1] < 12


def test_dropping_finished_rows_naive_prefill_and_growing_cache_change_nothing(qwen2, tokenizer, prompts):
    free_run = HFRolloutEngine(qwen2, tokenizer, eos_token_ids=[]).generate(prompts, sampling=GREEDY)
    eos = free_run.completion_ids[1, 2].item()
    reference = HFRolloutEngine(
        qwen2, tokenizer, eos_token_ids=[eos], drop_finished_rows=False, share_prompt_prefill=False, reserve_cache=False
    )
    expected = reference.generate(prompts, num_generations=2, sampling=GREEDY)
    assert len(set(expected.completion_lengths.tolist())) > 1  # rows finish at different steps
    for share, reserve in [(True, True), (False, True), (True, False)]:
        engine = HFRolloutEngine(qwen2, tokenizer, eos_token_ids=[eos], share_prompt_prefill=share, reserve_cache=reserve)
        got = engine.generate(prompts, num_generations=2, sampling=GREEDY)
        assert torch.equal(got.completion_ids, expected.completion_ids)
        assert torch.equal(got.completion_mask, expected.completion_mask)
        assert torch.equal(got.is_truncated, expected.is_truncated)


def test_top_k_one_equals_greedy(qwen2, tokenizer, prompts):
    engine = HFRolloutEngine(qwen2, tokenizer)
    greedy = engine.generate(prompts, num_generations=2, sampling=GREEDY)
    top1 = engine.generate(
        prompts,
        num_generations=2,
        sampling=SamplingParams(max_completion_length=12, top_k=1, temperature=0.7),
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(top1.completion_ids, greedy.completion_ids)


def test_sampling_is_reproducible_with_a_generator_and_varies_across_seeds(qwen2, tokenizer, prompts):
    engine = HFRolloutEngine(qwen2, tokenizer)
    params = SamplingParams(max_completion_length=10, temperature=1.0, top_p=0.95)
    first = engine.generate(prompts, num_generations=4, sampling=params, generator=torch.Generator().manual_seed(7))
    second = engine.generate(prompts, num_generations=4, sampling=params, generator=torch.Generator().manual_seed(7))
    other = engine.generate(prompts, num_generations=4, sampling=params, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first.completion_ids, second.completion_ids)
    assert not torch.equal(first.completion_ids, other.completion_ids)
    # samples within a group differ (they share the prompt's cache, not the random draws)
    assert not torch.equal(first.completion_ids[0], first.completion_ids[1])
    naive = HFRolloutEngine(qwen2, tokenizer, share_prompt_prefill=False)
    same_draws = naive.generate(prompts, num_generations=4, sampling=params, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first.completion_ids, same_draws.completion_ids)


def test_repetition_penalty_matches_generate_per_prompt(qwen2, tokenizer, prompts):
    params = SamplingParams(max_completion_length=10, do_sample=False, repetition_penalty=1.5)
    batch = HFRolloutEngine(qwen2, tokenizer).generate(prompts, sampling=params)
    # one prompt at a time: no padding, so generate's penalty sees exactly prompt + completion
    expected = [hf_generate(qwen2, tokenizer, [p], 10, repetition_penalty=1.5)[0] for p in prompts]
    assert batch.completion_token_lists() == expected
    plain = HFRolloutEngine(qwen2, tokenizer).generate(prompts, sampling=SamplingParams(max_completion_length=10, do_sample=False))
    assert batch.completion_token_lists() != plain.completion_token_lists()


def first_stop_length(tokenizer, tokens: list[int], stop: str) -> int | None:
    """Brute force: the fewest leading tokens whose decoded text contains ``stop``."""
    for n in range(1, len(tokens) + 1):
        if stop in tokenizer.decode(tokens[:n], skip_special_tokens=False):
            return n
    return None


def test_stop_strings_end_the_completion_on_the_token_that_completes_them(qwen2, tokenizer, prompts):
    long = SamplingParams(max_completion_length=16, do_sample=False)
    free_run = HFRolloutEngine(qwen2, tokenizer, eos_token_ids=[]).generate(prompts, sampling=long)
    rows = free_run.completion_token_lists()
    # a stop string spanning two tokens of row 2, taken from the middle of its completion
    pair_text = tokenizer.decode(rows[2][6:8])
    stop = pair_text[-3:] if len(pair_text) >= 3 else pair_text
    params = SamplingParams(max_completion_length=16, do_sample=False, stop_strings=[stop])
    batch = HFRolloutEngine(qwen2, tokenizer, eos_token_ids=[]).generate(prompts, sampling=params)
    expected_lengths = [first_stop_length(tokenizer, row, stop) for row in rows]
    assert expected_lengths[2] is not None and expected_lengths[2] <= 8
    for row, n in enumerate(expected_lengths):
        got = batch.completion_token_lists()[row]
        if n is None:
            assert got == rows[row] and batch.is_truncated[row]
        else:
            assert got == rows[row][:n] and not batch.is_truncated[row]
            assert stop in tokenizer.decode(got)


def test_tensor_prompts_with_mask_or_leading_pads(qwen2, tokenizer, prompts):
    engine = HFRolloutEngine(qwen2, tokenizer)
    reference = engine.generate(prompts, sampling=GREEDY)
    from posttrain.rollout import left_pad

    ids, mask = left_pad(prompts, tokenizer.pad_token_id, "cpu")
    with_mask = engine.generate(ids, prompt_mask=mask, sampling=GREEDY)
    inferred = engine.generate(ids, sampling=GREEDY)
    one = engine.generate(torch.tensor(prompts[0]), sampling=GREEDY)
    assert torch.equal(with_mask.completion_ids, reference.completion_ids)
    assert torch.equal(inferred.completion_ids, reference.completion_ids)
    assert torch.equal(one.completion_ids[0], reference.completion_ids[0])


def test_peft_model_with_gradient_checkpointing_in_train_mode(tokenizer, prompts, make_qwen2):
    peft = pytest.importorskip("peft")
    base = make_qwen2(tokenizer, seed=1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    model.gradient_checkpointing_enable()
    model.train()
    model.base_model.model.model.layers[0].eval()  # a user-chosen mixed state must come back as it was
    batch = HFRolloutEngine(model, tokenizer).generate(prompts, num_generations=2, sampling=GREEDY)
    assert model.training and not model.base_model.model.model.layers[0].training
    assert model.base_model.model.model.layers[1].training
    model.eval()
    expected = hf_generate(model, tokenizer, prompts, 12)
    assert batch.completion_token_lists()[::2] == expected
    with model.disable_adapter():
        without_adapter = hf_generate(model, tokenizer, prompts, 12)
    assert without_adapter != expected  # the adapter really was used


def test_rollout_batch_helpers(qwen2, tokenizer, prompts):
    batch = HFRolloutEngine(qwen2, tokenizer).generate(prompts[:2], num_generations=2, sampling=GREEDY)
    assert isinstance(batch, RolloutBatch)
    full = batch.prompt_completion_ids
    assert full.shape == (4, batch.prompt_ids.shape[1] + batch.completion_ids.shape[1])
    assert torch.equal(full[:, batch.prompt_ids.shape[1] :], batch.completion_ids)
    assert torch.equal(batch.prompt_completion_mask.sum(1), batch.prompt_mask.sum(1) + batch.completion_mask.sum(1))
    texts = batch.decode_completions(tokenizer)
    assert texts[0] == tokenizer.decode(batch.completion_token_lists()[0], skip_special_tokens=True)
    assert batch.to("cpu").completion_ids.data_ptr() != 0


def test_bad_inputs_raise_typed_errors(qwen2, tokenizer, prompts):
    engine = HFRolloutEngine(qwen2, tokenizer)
    with pytest.raises(DataError, match="row 1"):
        engine.generate([prompts[0], []], sampling=GREEDY)
    with pytest.raises(DataError, match="list of token ids"):
        engine.generate(["a text prompt"], sampling=GREEDY)
    with pytest.raises(DataError, match="no prompts"):
        engine.generate([], sampling=GREEDY)
    with pytest.raises(ConfigError, match="num_generations"):
        engine.generate(prompts, num_generations=0, sampling=GREEDY)
    with pytest.raises(ConfigError, match="unknown rollout engine"):
        make_rollout_engine("tgi", qwen2, tokenizer)
    assert isinstance(make_rollout_engine("hf", qwen2, tokenizer), HFRolloutEngine)


def test_single_token_completions(qwen2, tokenizer, prompts):
    engine = HFRolloutEngine(qwen2, tokenizer)
    one = engine.generate(prompts, num_generations=2, sampling=SamplingParams(max_completion_length=1, do_sample=False))
    full = engine.generate(prompts, num_generations=2, sampling=GREEDY)
    assert one.completion_ids.shape == (6, 1)
    assert torch.equal(one.completion_ids[:, 0], full.completion_ids[:, 0])
    assert one.is_truncated.all() and one.completion_mask.sum() == 6


def test_keyed_sampling_gives_each_prompt_the_same_completions_whatever_shares_its_batch(qwen2, tokenizer, prompts):
    """With sampling keys, a prompt's group is a function of its key: alone, first or last in a batch, it is the same."""
    from posttrain.rollout import sampling_keys

    engine = HFRolloutEngine(qwen2, tokenizer)
    params = SamplingParams(max_completion_length=10, temperature=1.0, top_p=0.95)
    keys = sampling_keys(0, "train", 0, positions=range(len(prompts)))
    together = engine.generate(prompts, num_generations=3, sampling=params, prompt_keys=keys)
    groups = together.completion_ids.view(len(prompts), 3, -1)
    lengths = together.completion_lengths.view(len(prompts), 3)
    for index, prompt in enumerate(prompts):
        alone = engine.generate([prompt], num_generations=3, sampling=params, prompt_keys=keys[index : index + 1])
        width = alone.completion_ids.shape[1]
        assert torch.equal(alone.completion_lengths, lengths[index])
        assert torch.equal(alone.completion_ids, groups[index, :, :width])
    reversed_order = engine.generate(prompts[::-1], num_generations=3, sampling=params, prompt_keys=keys.flip(0))
    assert torch.equal(reversed_order.completion_lengths.view(-1, 3).flip(0), lengths)
    # the completions of one group differ, and another key gives other completions
    assert not torch.equal(groups[0, 0], groups[0, 1])
    other = engine.generate(prompts, num_generations=3, sampling=params, prompt_keys=keys + 1)
    assert not torch.equal(other.completion_ids, together.completion_ids)
    with pytest.raises(ConfigError) as error:
        engine.generate(prompts, sampling=params, prompt_keys=keys, generator=torch.Generator())
    assert error.value.field == "prompt_keys"
    with pytest.raises(ConfigError, match="3 prompts"):
        engine.generate(prompts, sampling=params, prompt_keys=keys[:1])


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_sampling_in_slices_gives_the_same_completions_and_bounds_each_slice(qwen2, tokenizer, prompts, monkeypatch, penalty):
    """max_batch_tokens samples the rows in slices (cutting through groups when a group does not fit);
    with sampling keys every row draws the same tokens whatever its slice, EOS and stop strings included."""
    from posttrain.rollout import sampling_keys

    keys = sampling_keys(1, "train", 0, positions=range(len(prompts)))
    params = SamplingParams(max_completion_length=10, temperature=1.0, top_p=0.95, repetition_penalty=penalty)
    free_run = HFRolloutEngine(qwen2, tokenizer, eos_token_ids=[]).generate(
        prompts, num_generations=3, sampling=params, prompt_keys=keys)
    eos = free_run.completion_ids.flatten().mode().values.item()  # the most sampled token ends some rows early
    whole = HFRolloutEngine(qwen2, tokenizer, eos_token_ids=[eos]).generate(
        prompts, num_generations=3, sampling=params, prompt_keys=keys)
    assert len(set(whole.completion_lengths.tolist())) > 1  # rows end at different steps
    row_positions = max(len(p) for p in prompts) + params.max_completion_length
    slices = []
    original = HFRolloutEngine._sample_rows
    monkeypatch.setattr(HFRolloutEngine, "_sample_rows", lambda self, *a, **k: slices.append(a[4] - a[3]) or original(self, *a, **k))
    # (rows the budget holds, rows per slice): a budget of a group or more is rounded down to whole groups
    for budget_rows, rows_per_slice, share in [(1, 1, True), (2, 2, True), (4, 3, True), (5, 3, False), (9, 9, True)]:
        slices.clear()
        engine = HFRolloutEngine(qwen2, tokenizer, eos_token_ids=[eos], share_prompt_prefill=share,
                                 max_batch_tokens=budget_rows * row_positions)
        sliced = engine.generate(prompts, num_generations=3, sampling=params, prompt_keys=keys)
        assert max(slices) == rows_per_slice and sum(slices) == 9
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "is_truncated", "prompt_index"):
            assert torch.equal(getattr(sliced, name), getattr(whole, name)), (rows_per_slice, name)
    with pytest.raises(ConfigError) as error:
        HFRolloutEngine(qwen2, tokenizer, max_batch_tokens=0)
    assert error.value.field == "rollout_max_batch_tokens"


def test_the_sampling_loop_writes_rows_by_index_only_when_rows_leave_the_batch(qwen2, tokenizer, prompts):
    """Per-token index_put calls into the outputs were a sixth of the loop's time on the benchmark's model."""
    from torch.overrides import TorchFunctionMode

    class CountIndexWrites(TorchFunctionMode):
        writes = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.__setitem__:
                index = args[1] if isinstance(args[1], tuple) else (args[1],)
                CountIndexWrites.writes += any(torch.is_tensor(part) for part in index)
            return func(*args, **(kwargs or {}))

    engine = HFRolloutEngine(qwen2, tokenizer, eos_token_ids=[], sampler_logprobs=True)
    params = SamplingParams(max_completion_length=12, temperature=1.0)
    with CountIndexWrites():
        batch = engine.generate(prompts, num_generations=2, sampling=params, generator=torch.Generator().manual_seed(0))
    assert batch.completion_ids.shape == (6, 12) and bool(batch.is_truncated.all())
    assert CountIndexWrites.writes <= 4  # tokens, lengths, flags and log-probs once at the end, not once per token
