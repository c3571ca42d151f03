"""OnlineDPOTrainer: ranking by judge / reward model / reward functions, the loss on fixed pairs, training, PEFT."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM

from posttrain import ConfigError, OnlineDPOConfig, OnlineDPOTrainer, RewardFunctionError
from posttrain.rollout import RolloutBatch


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models run fastest on one thread; several threads on a shared, loaded CPU are ~10x slower
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def reward_model_dir():
    from posttrain.models.tiny import tiny_model_path

    return tiny_model_path(reward=True)


def _prompts(n: int = 8) -> Dataset:
    return Dataset.from_list([{"prompt": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(n)])


def _config(tmp_path, **overrides) -> OnlineDPOConfig:
    values = dict(output_dir=str(tmp_path / "odpo"), per_device_train_batch_size=2, max_steps=1,
                  max_completion_length=5, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                  disable_tqdm=True)
    values.update(overrides)
    return OnlineDPOConfig(**values)


def _first_pick(prompts, pairs):
    return [0] * len(pairs)


# ----------------------------------------------------------------------------- configuration


def test_config_older_names_and_checks():
    args = OnlineDPOConfig(output_dir="o", max_new_tokens=33, beta=[0.2])
    assert args.max_completion_length == 33 and args.beta == 0.2
    assert OnlineDPOConfig(output_dir="o", beta=[0.1, 0.05]).beta == [0.1, 0.05]
    with pytest.raises(ConfigError) as error:
        OnlineDPOConfig(output_dir="o", loss_type="hinge")
    assert error.value.field == "loss_type"
    with pytest.raises(ConfigError) as error:
        OnlineDPOConfig(output_dir="o", beta=[0.0])
    assert error.value.field == "beta"


def test_ranking_needs_exactly_one_source(tiny_model_dir, reward_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="rank") as error:
        OnlineDPOTrainer(model=tiny_model_dir, args=_config(tmp_path), train_dataset=_prompts())
    assert error.value.field == "reward_funcs"
    with pytest.raises(ConfigError, match="both") as error:
        OnlineDPOTrainer(model=tiny_model_dir, reward_funcs=reward_model_dir, judge=_first_pick,
                         args=_config(tmp_path), train_dataset=_prompts())
    assert error.value.field == "judge"


# ----------------------------------------------------------------------------- the loss on a fixed batch


def _fixed_rollout(pad: int, eos: int) -> RolloutBatch:
    """Two prompts (lengths 3 and 2, left-padded), two completions each (right-padded)."""
    prompt_ids = torch.tensor([[40, 41, 42], [40, 41, 42], [pad, 50, 51], [pad, 50, 51]])
    prompt_mask = (torch.arange(3) >= torch.tensor([0, 0, 1, 1])[:, None]).long()
    completion_ids = torch.tensor([[60, 61, eos, pad], [62, 63, 64, 65], [70, eos, pad, pad], [71, 72, 73, eos]])
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    return RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask,
                        is_truncated=torch.tensor([False, True, False, False]),
                        prompt_index=torch.tensor([0, 0, 1, 1]), group_size=2)


def _sequence_logps(model, rollout: RolloutBatch) -> torch.Tensor:
    """Summed completion log-probs of each row from full float64 logits, one unpadded row at a time."""
    sums = []
    with torch.no_grad():
        for b in range(rollout.num_rows):
            prompt = rollout.prompt_ids[b][rollout.prompt_mask[b].bool()]
            completion = rollout.completion_ids[b][rollout.completion_mask[b].bool()]
            ids = torch.cat([prompt, completion])[None]
            logps = torch.log_softmax(model(ids).logits.double()[0, :-1], -1)
            targets = ids[0, 1:]
            token_logps = logps.gather(-1, targets[:, None])[:, 0]
            sums.append(token_logps[len(prompt) - 1:].sum())
    return torch.stack(sums)


@pytest.mark.parametrize("loss_type, share", [("sigmoid", True), ("ipo", True), ("sigmoid", False)])
@pytest.mark.parametrize("ranking", ["judge", "reward_function"])
def test_loss_on_fixed_pairs_matches_hand_computation(tiny_model_dir, tmp_path, monkeypatch, loss_type, share, ranking):
    tok_dir = tiny_model_dir
    policy = AutoModelForCausalLM.from_pretrained(tok_dir)
    reference = AutoModelForCausalLM.from_pretrained(tok_dir)
    with torch.no_grad():  # move the policy away from the reference so the loss is not trivial
        for param in policy.model.layers[0].parameters():
            param.add_(0.05 * torch.randn_like(param))
    beta = 0.3
    args = _config(tmp_path, beta=beta, loss_type=loss_type, missing_eos_penalty=2.0, share_prompt_forward=share)
    if ranking == "judge":
        calls = []

        def judge(prompts, pairs):
            calls.append((prompts, pairs))
            return [1, 0]

        kwargs = dict(judge=judge)
        chosen, rejected = [1, 2], [0, 3]
    else:
        seen = {}

        def prefers_row_zero(prompts, completions, answer, **kwargs):
            seen["answer"] = answer
            return [0.0, 1.0, 0.0, 0.5]  # row 1 loses its lead to the missing-EOS penalty (1 - 2 < 0)

        kwargs = dict(reward_funcs=prefers_row_zero)
        chosen, rejected = [0, 3], [1, 2]
    trainer = OnlineDPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=_prompts(), **kwargs)
    tok = trainer.processing_class
    rollout = _fixed_rollout(tok.pad_token_id, tok.eos_token_id)
    monkeypatch.setattr(trainer, "_generate", lambda model, inputs: rollout)
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    loss = trainer.compute_loss(trainer.model, inputs)

    policy_sums, ref_sums = _sequence_logps(policy, rollout), _sequence_logps(reference, rollout)
    margin = (policy_sums[chosen] - ref_sums[chosen]) - (policy_sums[rejected] - ref_sums[rejected])
    if loss_type == "sigmoid":
        expected = -F.logsigmoid(beta * margin).mean()
    else:
        expected = ((margin - 1 / (2 * beta)) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    if ranking == "judge":
        assert calls[0][0] == ["What is 0 + 2?", "What is 1 + 2?"] and len(calls[0][1]) == 2
    else:
        assert seen["answer"] == ["2", "2", "3", "3"]  # extra columns reach reward functions, one per completion


@pytest.mark.slow  # several short runs
def test_judge_answers_are_checked(tiny_model_dir, tmp_path):
    def bad_judge(prompts, pairs):
        return [0]

    trainer = OnlineDPOTrainer(model=tiny_model_dir, judge=bad_judge, args=_config(tmp_path), train_dataset=_prompts())
    with pytest.raises(RewardFunctionError, match="bad_judge"):
        trainer.train()

    class PairJudge:  # an object with a `.judge` method works too
        def judge(self, prompts, pairs):
            return [1] * len(pairs)

    trainer = OnlineDPOTrainer(model=tiny_model_dir, judge=PairJudge(), args=_config(tmp_path), train_dataset=_prompts())
    trainer.train()
    assert trainer.state.global_step == 1


# ----------------------------------------------------------------------------- training end to end


def test_reward_model_run_logs_metrics_and_saves(tiny_model_dir, reward_model_dir, tmp_path):
    from transformers import pipeline

    args = _config(tmp_path, max_steps=2)
    trainer = OnlineDPOTrainer(model=tiny_model_dir, reward_funcs=reward_model_dir, args=args, train_dataset=_prompts())
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0
    for name in ("objective/scores", "objective/scores_margin", "objective/kl", "objective/rlhf_reward",
                 "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "val/contain_eos_token", "beta"):
        assert name in first, name
    assert first["objective/scores_margin"] >= 0  # the chosen completion is the higher-scored one
    trainer.save_model()
    generator = pipeline("text-generation", model=str(tmp_path / "odpo"))
    assert generator("What is", max_new_tokens=2, do_sample=False)[0]["generated_text"].startswith("What is")


def test_peft_uses_the_base_model_as_reference(tiny_model_dir, reward_model_dir, tmp_path):
    from peft import LoraConfig

    trainer = OnlineDPOTrainer(model=tiny_model_dir, reward_funcs=[reward_model_dir], args=_config(tmp_path),
                               train_dataset=_prompts(),
                               peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert trainer.reference.kind == "adapters_disabled"
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.train()
    assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if n in base)
    trainer.save_model()
    assert os.path.isfile(tmp_path / "odpo" / "adapter_config.json")


def _length_score(prompts, completions, **kwargs):
    return [len(c) / 10.0 for c in completions]


def _resumable_online_dpo(model_dir, tmp_path, name, resume=None):
    """4 steps of 2 prompts over 6 prompts: the checkpoint at step 2 is mid-epoch, step 4 starts epoch 2."""
    args = _config(tmp_path, output_dir=str(tmp_path / name), max_steps=4, save_strategy="steps", save_steps=2,
                   max_completion_length=4)
    trainer = OnlineDPOTrainer(model=model_dir, reward_funcs=_length_score, args=args, train_dataset=_prompts(6))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.slow  # three runs; GRPO's resume test is fast
def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path):
    straight = _resumable_online_dpo(tiny_model_dir, tmp_path, "a")
    resumed = _resumable_online_dpo(tiny_model_dir, tmp_path, "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for (name, param), other in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(other, param, rtol=0, atol=0, msg=name)
    losses = lambda t: {e["step"]: e["loss"] for e in t.state.log_history if "loss" in e}  # noqa: E731
    assert losses(resumed) == losses(straight) and len(losses(straight)) == 4


def test_reward_functions_log_metric_reaches_the_log_and_log_extra_is_announced(tiny_model_dir, tmp_path, caplog):
    import json

    def length_with_logging(prompts, completions, log_metric=None, log_extra=None, **kwargs):
        lengths = [float(len(c)) for c in completions]
        log_metric("mean_chars", sum(lengths) / len(lengths))
        log_extra("chars", lengths)
        return lengths

    args = _config(tmp_path, max_steps=2, logging_steps=1)
    trainer = OnlineDPOTrainer(model=tiny_model_dir, reward_funcs=length_with_logging, args=args, train_dataset=_prompts())
    with caplog.at_level("WARNING", logger="posttrain"):
        trainer.train()
    logged = [r for r in trainer.state.log_history if "mean_chars" in r]
    assert len(logged) == 2 and all(r["mean_chars"] >= 0 for r in logged)
    with open(os.path.join(args.output_dir, "metrics.jsonl")) as handle:
        assert sum("mean_chars" in json.loads(line) for line in handle) == 2
    assert caplog.text.count("log_extra") == 1


@pytest.mark.slow  # GRPO's is fast
def test_rollout_max_batch_tokens_samples_in_slices_with_the_same_run(tiny_model_dir, tmp_path, monkeypatch):
    """Pairs sampled one row at a time give the same run as the whole batch at once (keyed draws)."""
    from posttrain.rollout.hf_engine import HFRolloutEngine

    slices = []
    original = HFRolloutEngine._row_slices
    monkeypatch.setattr(HFRolloutEngine, "_row_slices",
                        lambda self, rows, group, positions: slices.append(original(self, rows, group, positions))
                        or slices[-1])

    def run(name, budget):
        slices.clear()
        args = _config(tmp_path, output_dir=str(tmp_path / name), max_steps=2, rollout_max_batch_tokens=budget)
        trainer = OnlineDPOTrainer(model=tiny_model_dir, reward_funcs=_length_score, args=args, train_dataset=_prompts())
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], list(slices)

    whole, whole_slices = run("whole", None)
    sliced, sliced_slices = run("sliced", 1)  # less than one row: one row per slice
    assert whole_slices == [[(0, 4)], [(0, 4)]]
    assert sliced_slices == [[(0, 1), (1, 2), (2, 3), (3, 4)]] * 2
    assert sliced == whole and len(whole) == 2
    with pytest.raises(ConfigError) as error:
        _config(tmp_path, rollout_max_batch_tokens=64, use_vllm=True)
    assert error.value.field == "rollout_max_batch_tokens"
