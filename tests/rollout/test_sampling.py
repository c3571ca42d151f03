from __future__ import annotations

import math

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.rollout.sampling import (
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    choose_next_tokens,
    process_logits,
)

NEG_INF = float("-inf")


def log_probs(*probs: float) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]])


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[0, 1, 1]])  # token 1 twice: penalised once
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))


def test_repetition_penalty_ignores_masked_positions_and_keeps_input():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, 1.0, -4.0]])
    seen = torch.tensor([[0, 3], [3, 0]])
    mask = torch.tensor([[1, 0], [1, 0]])
    out = apply_repetition_penalty(logits, seen, 4.0, mask)
    assert torch.equal(out, torch.tensor([[0.5, -1.0, 0.5, 3.0], [1.0, 1.0, 1.0, -16.0]]))
    assert logits[0, 0] == 2.0  # not modified in place


def test_temperature_divides():
    out = apply_temperature(torch.tensor([[1.0, 2.0, -3.0]]), 0.5)
    assert torch.equal(out, torch.tensor([[2.0, 4.0, -6.0]]))


def test_top_k_keeps_k_largest_and_ties():
    out = apply_top_k(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 2)
    assert torch.equal(out, torch.tensor([[NEG_INF, 3.0, 2.0, NEG_INF]]))
    tied = apply_top_k(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), 1)
    assert torch.equal(tied, torch.tensor([[NEG_INF, 2.0, 2.0, NEG_INF]]))
    same = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.equal(apply_top_k(same, 0), same) and torch.equal(apply_top_k(same, None), same)


def test_top_p_keeps_smallest_nucleus():
    # probabilities 0.15, 0.5, 0.05, 0.3 (unsorted on purpose)
    logits = log_probs(0.15, 0.5, 0.05, 0.3)
    # mass before each token, sorted: 0.5 -> 0, 0.3 -> 0.5, 0.15 -> 0.8, 0.05 -> 0.95
    kept_075 = torch.isfinite(apply_top_p(logits, 0.75))
    assert kept_075.tolist() == [[False, True, False, True]]
    kept_085 = torch.isfinite(apply_top_p(logits, 0.85))
    assert kept_085.tolist() == [[True, True, False, True]]
    kept_tiny = torch.isfinite(apply_top_p(logits, 0.01))
    assert kept_tiny.tolist() == [[False, True, False, False]]  # the top token always survives
    assert torch.equal(apply_top_p(logits, 1.0), logits)


def test_min_p_drops_tokens_below_fraction_of_top():
    logits = log_probs(0.5, 0.3, 0.15, 0.05)
    assert torch.isfinite(apply_min_p(logits, 0.2)).tolist() == [[True, True, True, False]]  # threshold 0.1
    assert torch.isfinite(apply_min_p(logits, 0.7)).tolist() == [[True, False, False, False]]  # threshold 0.35
    assert torch.equal(apply_min_p(logits, 0.0), logits)


def test_process_logits_order_and_greedy_skips_warpers():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=2.0, top_k=2, repetition_penalty=4.0)
    seen = torch.tensor([[0]])
    out = process_logits(logits, params, seen)
    # penalty: 2 -> 0.5; temperature: /2 -> [0.25, 0.5, 0, -0.5]; top-2 keeps tokens 0 and 1
    assert torch.allclose(out, torch.tensor([[0.25, 0.5, NEG_INF, NEG_INF]]))
    greedy = process_logits(logits, SamplingParams(do_sample=False, temperature=2.0, top_k=1, repetition_penalty=4.0), seen)
    assert torch.allclose(greedy, torch.tensor([[0.5, 1.0, 0.0, -1.0]]))


def test_choose_next_tokens_greedy_and_temperature_zero_are_argmax():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, -1.0, 4.9]])
    assert choose_next_tokens(logits, SamplingParams(do_sample=False)).tolist() == [1, 0]
    assert choose_next_tokens(logits, SamplingParams(temperature=0.0)).tolist() == [1, 0]


def test_sampling_frequencies_match_probabilities_and_respect_filters():
    probs = [0.6, 0.3, 0.1, 0.0]
    logits = torch.tensor([[math.log(p) if p else NEG_INF for p in probs]]).repeat(20000, 1)
    generator = torch.Generator().manual_seed(0)
    draws = choose_next_tokens(logits, SamplingParams(), generator)
    counts = torch.bincount(draws, minlength=4).double() / len(draws)
    assert counts[3] == 0
    assert torch.allclose(counts[:3], torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), atol=0.015)
    again = choose_next_tokens(logits, SamplingParams(), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_a_draw_at_the_top_of_the_range_takes_the_last_token_with_mass(monkeypatch):
    import posttrain.rollout.sampling as sampling_module

    # the uniform draw is in [0, 1); force the edge where rounding would step past the last index
    monkeypatch.setattr(sampling_module.torch, "rand", lambda shape, **kw: torch.ones(shape, dtype=kw["dtype"]))
    logits = torch.tensor([[0.0, 1.0, NEG_INF, NEG_INF], [0.0, 0.0, 0.0, 0.0]])
    assert sampling_module.sample_from_logits(logits).tolist() == [1, 3]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_completion_length=0), "max_completion_length"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(stop_strings=[""]), "stop_strings"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs, field):
    with pytest.raises(ConfigError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field
    assert "Fix:" in str(info.value)


def test_sampling_params_accepts_none_top_k_and_single_stop_string():
    params = SamplingParams(top_k=None, stop_strings="</answer>")
    assert params.stop_strings == ["</answer>"]
    assert params.is_greedy is False
    assert SamplingParams(do_sample=False).is_greedy and SamplingParams(temperature=0).is_greedy


def test_keyed_uniform_is_uniform_and_a_function_of_stream_and_step_only():
    from posttrain.rollout.sampling import keyed_uniform, row_streams, sampling_keys

    keys = sampling_keys(3, "train", 5, positions=range(4))
    streams = row_streams(keys, 2)
    assert streams.shape == (8,) and len(set(streams.tolist())) == 8  # every completion has its own stream
    # a row's draw does not depend on which rows are beside it
    assert torch.equal(keyed_uniform(streams, 7)[5:6], keyed_uniform(streams[5:6], 7))
    assert not torch.equal(keyed_uniform(streams, 7), keyed_uniform(streams, 8))
    # the (rows, tokens) table the engine precomputes holds the same numbers as token-by-token draws
    table = keyed_uniform(streams.unsqueeze(1), torch.arange(10))
    assert table.shape == (8, 10) and torch.equal(table[:, 7], keyed_uniform(streams, 7))
    many = keyed_uniform(row_streams(sampling_keys(0, positions=range(2000)), 10), 3)
    assert many.dtype == torch.float64 and bool(((many >= 0) & (many < 1)).all())
    counts = torch.histc(many.float(), bins=10, min=0, max=1)
    assert counts.min() > 20000 * 0.09 / 1 and counts.max() < 20000 * 0.11  # 2000 per bin expected
    # a uniform draw inverts the cumulative distribution: 0.6 lands in the second token's mass [0.5, 0.8)
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    chosen = choose_next_tokens(logits, SamplingParams(), uniform=torch.tensor([0.6], dtype=torch.float64))
    assert chosen.tolist() == [1]
