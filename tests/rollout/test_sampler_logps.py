"""The HF engine's own log-probs of the tokens it sampled (``RolloutBatch.sampler_logps``)."""

from __future__ import annotations

import torch

from posttrain.rollout import HFRolloutEngine, RolloutSequences, SamplingParams, completion_token_logps, sampling_keys


def _trainer_logps(model, batch, temperature):
    rows = RolloutSequences.from_batch(batch)
    with torch.no_grad():
        logps, _ = completion_token_logps(model, rows, temperature=temperature)
    return logps


def test_sampler_log_probs_equal_the_trainers_without_truncation(qwen2, tokenizer, prompts):
    keys = sampling_keys(0, "test", 0, positions=range(len(prompts)))
    sampling = SamplingParams(max_completion_length=6, temperature=0.7)
    batch = HFRolloutEngine(qwen2, tokenizer, sampler_logprobs=True).generate(prompts, num_generations=2,
                                                                              sampling=sampling, prompt_keys=keys)
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(batch.sampler_logps[mask], _trainer_logps(qwen2, batch, 0.7)[mask], atol=1e-5, rtol=1e-5)
    assert batch.sampler_logps[~mask].eq(0).all()
    plain = HFRolloutEngine(qwen2, tokenizer).generate(prompts, num_generations=2, sampling=sampling, prompt_keys=keys)
    assert plain.sampler_logps is None and torch.equal(plain.completion_ids, batch.completion_ids)


def test_top_k_sampler_log_probs_are_of_the_renormalised_distribution(qwen2, tokenizer, prompts):
    keys = sampling_keys(0, "test", 1, positions=range(len(prompts)))
    sampling = SamplingParams(max_completion_length=6, temperature=1.0, top_k=3)
    batch = HFRolloutEngine(qwen2, tokenizer, sampler_logprobs=True).generate(prompts, num_generations=2,
                                                                              sampling=sampling, prompt_keys=keys)
    mask = batch.completion_mask.bool()
    sampler, full = batch.sampler_logps[mask], _trainer_logps(qwen2, batch, 1.0)[mask]
    assert (sampler >= full - 1e-6).all() and (sampler - full).max() > 1e-3  # kept mass < 1: log-probs rise
