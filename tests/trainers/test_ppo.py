"""PPOTrainer plumbing on the tiny model: rollouts, rewards, advantages, updates, saving, PEFT, errors.

The losses and GAE themselves are tested by hand in tests/losses; here every quantity the trainer
feeds them is recomputed independently (full logits, the reward model's own pooled score, a plain
GAE loop in float64) and compared.
"""

from __future__ import annotations

import copy
import math
import os
import shutil

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from posttrain import ConfigError, DataError, PPOConfig, PPOTrainer


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


def _prompts(n: int = 16) -> Dataset:
    return Dataset.from_list([{"prompt": f"What is {i} + {i % 5}?", "answer": str(i + i % 5)} for i in range(n)])


def _config(tmp_path, **overrides) -> PPOConfig:
    values = dict(output_dir=str(tmp_path / "ppo"), per_device_train_batch_size=4, total_episodes=8,
                  response_length=6, num_ppo_epochs=2, num_mini_batches=2, learning_rate=1e-4,
                  logging_steps=1, save_strategy="no", disable_tqdm=True, num_sample_generations=0)
    values.update(overrides)
    return PPOConfig(**values)


# ----------------------------------------------------------------------------- configuration


def test_config_names_and_defaults():
    args = PPOConfig(output_dir="o", kl_coef=0.1, cliprange=0.3, max_new_tokens=12)
    assert (args.kl_coef, args.cliprange, args.response_length) == (0.1, 0.3, 12)
    assert args.stop_token == "eos" and args.num_ppo_epochs == 4 and args.bf16 is False


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(per_device_train_batch_size=6, num_mini_batches=4), "num_mini_batches"),
        (dict(per_device_train_batch_size=8, num_mini_batches=2, gradient_accumulation_steps=3),
         "gradient_accumulation_steps"),
        (dict(temperature=0.0), "temperature"),
        (dict(kl_estimator="k9"), "kl_estimator"),
        (dict(stop_token="newline"), "stop_token"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as error:
        PPOConfig(output_dir="o", **overrides)
    assert error.value.field == field


# ----------------------------------------------------------------------------- construction


def test_value_model_starts_as_the_reward_model(tiny_model_dir, reward_model_dir, tmp_path):
    trainer = PPOTrainer(args=_config(tmp_path), model=tiny_model_dir, reward_model=reward_model_dir,
                         train_dataset=_prompts())
    reward, value = trainer.reward_model, trainer.value_model
    assert value is not reward
    for (name, r), (_, v) in zip(reward.named_parameters(), value.named_parameters()):
        assert torch.equal(r, v), name
        assert v.data_ptr() != r.data_ptr()
    assert not any(p.requires_grad for p in reward.parameters())
    assert all(p.requires_grad for p in value.parameters())
    assert trainer.reference.kind == "frozen_copy"


def test_older_positional_order_and_older_names(tiny_model_dir, reward_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, num_labels=1)
    trainer = PPOTrainer(_config(tmp_path), tok, policy, ref, reward, _prompts(), value)
    assert trainer.policy is policy and trainer.value_model is value and trainer.reward_model is reward
    assert trainer.reference.kind == "model"
    older = PPOTrainer(config=_config(tmp_path), tokenizer=tok, policy=tiny_model_dir, reward_model=reward_model_dir,
                       train_dataset=_prompts())
    assert older.args.response_length == 6


def test_missing_pieces_are_clear_errors(tiny_model_dir, reward_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="reward model") as error:
        PPOTrainer(args=_config(tmp_path), model=tiny_model_dir, train_dataset=_prompts())
    assert error.value.field == "reward_model_path"
    with pytest.raises(ConfigError) as error:
        PPOTrainer(args=_config(tmp_path), reward_model=reward_model_dir, train_dataset=_prompts())
    assert error.value.field == "sft_model_path"
    with pytest.raises(DataError, match="prompt"):
        PPOTrainer(args=_config(tmp_path), model=tiny_model_dir, reward_model=reward_model_dir,
                   train_dataset=Dataset.from_list([{"question": "1+1"}] * 4))


def test_reward_model_with_another_vocabulary_is_refused(tiny_model_dir, tmp_path):
    from transformers import Qwen2Config

    other = AutoModelForSequenceClassification.from_config(Qwen2Config(
        vocab_size=77, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, num_labels=1, pad_token_id=0))
    with pytest.raises(ConfigError, match="vocabulary") as error:
        PPOTrainer(args=_config(tmp_path), model=tiny_model_dir, reward_model=other, train_dataset=_prompts())
    assert error.value.field == "reward_model_path"


def test_prompts_from_conversations_and_pretokenized_ids(tiny_model_dir, reward_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = Dataset.from_list([{"messages": [{"role": "user", "content": "1+1?"},
                                                {"role": "assistant", "content": "2"}]}] * 4)
    trainer = PPOTrainer(args=_config(tmp_path), model=tiny_model_dir, reward_model=reward_model_dir,
                         train_dataset=messages)
    ids = trainer.train_dataset[0]["prompt_input_ids"]
    text = tok.apply_chat_template([{"role": "user", "content": "1+1?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    pretokenized = Dataset.from_list([{"input_ids": [5, 6, 7]}] * 4)
    trainer = PPOTrainer(args=_config(tmp_path), model=tiny_model_dir, reward_model=reward_model_dir,
                         train_dataset=pretokenized)
    assert trainer.train_dataset[0]["prompt_input_ids"] == [5, 6, 7]


# ----------------------------------------------------------------------------- one rollout, recomputed


def _gae_by_hand(rewards, values, lengths, gamma, lam):
    advantages = torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            advantages[b, t] = last
    return advantages


def test_rollout_quantities_match_an_independent_computation(tiny_model_dir, reward_model_dir, tmp_path):
    args = _config(tmp_path, temperature=0.8, missing_eos_penalty=1.5, kl_coef=0.2, gamma=0.9, lam=0.7,
                   local_rollout_forward_batch_size=3)
    trainer = PPOTrainer(args=args, model=tiny_model_dir, reward_model=reward_model_dir, train_dataset=_prompts())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    rollout = trainer._rollout(batch)
    seq, mask = rollout, rollout.loss_mask.double()
    width = seq.prompt_width
    lengths = mask.sum(-1).long().tolist()

    with torch.no_grad():
        logits = trainer.policy(seq.input_ids, attention_mask=seq.attention_mask,
                                position_ids=seq.position_ids).logits.double()
        logps = torch.log_softmax(logits[:, :-1] / 0.8, -1).gather(-1, seq.input_ids[:, 1:, None])[..., 0]
        logps = logps[:, width - 1:]
        torch.testing.assert_close(rollout.old_logps.double() * mask, logps * mask, atol=1e-4, rtol=1e-4)

        value_model = trainer.value_model
        hidden = value_model.model(seq.input_ids, attention_mask=seq.attention_mask,
                                   position_ids=seq.position_ids).last_hidden_state
        values = value_model.score(hidden)[..., 0].double()[:, width - 1:-1]
        torch.testing.assert_close(rollout.values.double() * mask, values * mask, atol=1e-5, rtol=1e-5)

        # the reward model's own pooled score of each unpadded prompt + completion
        scores = []
        for b in range(4):
            row = seq.input_ids[b][seq.attention_mask[b].bool()][None]
            scores.append(trainer.reward_model(row).logits[0, 0].item())
        truncated = torch.tensor([n == seq.completion_ids.shape[1] and
                                  seq.completion_ids[b, n - 1].item() != trainer._tokenizer.eos_token_id
                                  for b, n in enumerate(lengths)])
        expected_scores = torch.tensor(scores, dtype=torch.float64) - 1.5 * truncated.double()
        torch.testing.assert_close(rollout.scores.double(), expected_scores, atol=1e-5, rtol=1e-5)

    # step 0: the policy is the reference, so the KL penalty is 0 and the score sits on the last token
    rewards = torch.zeros_like(mask)
    for b, n in enumerate(lengths):
        rewards[b, n - 1] = expected_scores[b]
    advantages = _gae_by_hand(rewards, values * mask, lengths, 0.9, 0.7)
    returns = advantages + values * mask
    torch.testing.assert_close(rollout.returns.double() * mask, returns * mask, atol=1e-4, rtol=1e-4)
    valid = mask.bool()
    whitened = (advantages - advantages[valid].mean()) / advantages[valid].std()
    torch.testing.assert_close(rollout.advantages.double()[valid], whitened[valid], atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------- training


def test_train_logs_metrics_steps_and_saves_a_pipeline_model(tiny_model_dir, reward_model_dir, tmp_path):
    from transformers import pipeline

    args = _config(tmp_path, save_strategy="steps", save_steps=2, num_sample_generations=2)
    trainer = PPOTrainer(args=args, model=tiny_model_dir, reward_model=reward_model_dir, train_dataset=_prompts(),
                         eval_dataset=_prompts(4))
    before = {n: p.detach().clone() for n, p in trainer.value_model.named_parameters()}
    result = trainer.train()
    assert result.global_step == 2  # 8 episodes / 4 prompts per update
    # 2 updates x 2 epochs x 2 mini-batches optimizer steps
    steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {8}
    logged = [entry for entry in trainer.state.log_history if "loss/policy" in entry]
    assert len(logged) == 2
    for name in ("objective/kl", "objective/scores", "objective/rlhf_reward", "objective/entropy",
                 "policy/clipfrac", "val/clipfrac", "loss/policy", "loss/value", "episode", "eps", "lr"):
        assert name in logged[-1] and math.isfinite(logged[-1][name]), name
    assert logged[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the first rollout
    assert logged[-1]["episode"] == 8
    assert any(not torch.equal(before[n], p) for n, p in trainer.value_model.named_parameters())
    assert os.path.isfile(tmp_path / "ppo" / "completions.jsonl")
    assert os.path.isdir(tmp_path / "ppo" / "checkpoint-2")

    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_objective/scores"])
    trainer.save_model()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo")
    assert torch.equal(saved.model.embed_tokens.weight, trainer.policy.model.embed_tokens.weight)
    generator = pipeline("text-generation", model=str(tmp_path / "ppo"))
    assert generator("What is 1 + 2?", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("What is")


def test_first_minibatch_ratio_is_one(tiny_model_dir, reward_model_dir, tmp_path):
    """One epoch, one mini-batch: the update's only forward sees the rollout policy, so ratio = 1, no clipping."""
    args = _config(tmp_path, total_episodes=4, num_ppo_epochs=1, num_mini_batches=1)
    trainer = PPOTrainer(args=args, model=tiny_model_dir, reward_model=reward_model_dir, train_dataset=_prompts())
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "val/ratio" in entry][0]
    assert logged["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert logged["policy/approxkl"] == pytest.approx(0.0, abs=1e-8)
    assert logged["policy/clipfrac"] == 0.0


def test_peft_trains_adapters_of_policy_and_value_model(tiny_model_dir, reward_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel

    args = _config(tmp_path, total_episodes=4, num_mini_batches=1, learning_rate=1e-2)
    trainer = PPOTrainer(args=args, model=tiny_model_dir, reward_model=reward_model_dir, train_dataset=_prompts(),
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert isinstance(trainer.policy, PeftModel) and isinstance(trainer.value_model, PeftModel)
    assert trainer.reference.kind == "adapters_disabled"
    trainable = {n for n, p in trainer.value_model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)
    base_before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if "lora_" not in n}
    head_before = {n: p.detach().clone() for n, p in trainer.value_model.named_parameters()
                   if "score" in n and p.requires_grad}
    trainer.train()
    for name, param in trainer.policy.named_parameters():
        if name in base_before:
            assert torch.equal(param, base_before[name]), name
    assert any(not torch.equal(p, head_before[n]) for n, p in trainer.value_model.named_parameters() if n in head_before)
    trainer.save_model()
    assert os.path.isfile(tmp_path / "ppo" / "adapter_config.json")


# ----------------------------------------------------------------------------- checkpoints and resuming


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _resumable_run(model_dir, reward_dir, tmp_path, name, peft=False, logging_steps=1, resume=None) -> PPOTrainer:
    """4 updates of 4 prompts over 12 prompts (3 batches an epoch), a checkpoint every 2 updates."""
    args = _config(tmp_path, output_dir=str(tmp_path / name), total_episodes=16, save_strategy="steps", save_steps=2,
                   logging_steps=logging_steps)
    trainer = PPOTrainer(args=args, model=model_dir, reward_model=reward_dir, train_dataset=_prompts(12),
                         peft_config=_lora() if peft else None)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _update_logs(trainer: PPOTrainer) -> dict[int, dict]:
    # eps is a speed, the one logged value that is not a function of the run's state
    return {entry["step"]: {k: v for k, v in entry.items() if k != "eps"}
            for entry in trainer.state.log_history if "loss/policy" in entry}


# logging every 3 updates: the log at update 3 averages metrics of updates 1-2 saved in the checkpoint
@pytest.mark.parametrize("peft, logging_steps", [(False, 3), pytest.param(True, 1, marks=pytest.mark.slow)],
                         ids=["full", "lora"])
def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, reward_model_dir, tmp_path, peft, logging_steps):
    """A: 4 updates straight through. B: resumed from A's checkpoint-2 (mid-epoch), runs updates 3-4."""
    run_a = _resumable_run(tiny_model_dir, reward_model_dir, tmp_path, "a", peft=peft, logging_steps=logging_steps)
    checkpoint = tmp_path / "a" / "checkpoint-2"
    expected = {"config.json" if not peft else "adapter_config.json", "optimizer.pt", "scheduler.pt",
                "rng_state.pth", "trainer_state.json", "ppo_state.pt", "value_model"}
    assert expected <= set(os.listdir(checkpoint))
    if peft:
        resume = str(checkpoint)  # an explicit directory
    else:
        shutil.copytree(checkpoint, tmp_path / "b" / "checkpoint-2")
        resume = True  # the latest checkpoint in B's own output_dir
    run_b = _resumable_run(tiny_model_dir, reward_model_dir, tmp_path, "b", peft=peft, logging_steps=logging_steps,
                           resume=resume)

    assert run_b.state.global_step == 4 and run_b.state.log_history[-1]["episode"] == 16
    for network in ("policy", "value_model"):
        trained_a = dict(getattr(run_a, network).named_parameters())
        trained_b = dict(getattr(run_b, network).named_parameters())
        assert trained_a.keys() == trained_b.keys()
        for name, param in trained_a.items():
            torch.testing.assert_close(trained_b[name], param, rtol=0, atol=0, msg=f"{network}.{name}")
    logs_a, logs_b = _update_logs(run_a), _update_logs(run_b)
    assert 3 in logs_b and 4 in logs_b and sorted(logs_b) == sorted(logs_a)
    for step in logs_a:  # those before the checkpoint come back with trainer_state.json
        assert logs_b[step] == logs_a[step], step
    # updates 3-4 moved the policy, so equal final weights are more than a copy of the checkpoint's
    from posttrain.trainers.ppo_checkpoint import load_weights

    at_checkpoint = copy.deepcopy(run_a.policy)
    load_weights(at_checkpoint, str(checkpoint), "policy")
    assert any(not torch.equal(p, q) for p, q in zip(at_checkpoint.parameters(), run_a.policy.parameters()))


def test_resume_errors_name_the_missing_piece(tiny_model_dir, reward_model_dir, tmp_path, capsys):
    from posttrain.cli.main import main

    args = _config(tmp_path, output_dir=str(tmp_path / "run"), save_strategy="steps", save_steps=2)
    trainer = PPOTrainer(args=args, model=tiny_model_dir, reward_model=reward_model_dir, train_dataset=_prompts())
    with pytest.raises(ConfigError, match="no checkpoint") as error:
        trainer.train(resume_from_checkpoint=True)
    assert error.value.field == "resume_from_checkpoint" and str(tmp_path / "run") in str(error.value)
    with pytest.raises(ConfigError, match="does not exist"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "nowhere"))

    trainer.train()
    saved = tmp_path / "run" / "checkpoint-2"
    for removed, named in (("value_model", "value_model/model.safetensors"), ("optimizer.pt", "optimizer.pt")):
        broken = tmp_path / f"without-{removed}"
        shutil.copytree(saved, broken)
        target = broken / removed
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        with pytest.raises(ConfigError) as error:
            trainer.train(resume_from_checkpoint=str(broken))
        assert named in str(error.value) and error.value.fix and error.value.field == "resume_from_checkpoint"

    # the command line passes `--resume_from_checkpoint true` as a string: it means the latest checkpoint
    data = tmp_path / "prompts.jsonl"
    _prompts(4).to_json(str(data))
    code = main(["ppo", "--model_name_or_path", tiny_model_dir, "--reward_model_path", reward_model_dir,
                 "--dataset_name", str(data), "--output_dir", str(tmp_path / "empty"),
                 "--resume_from_checkpoint", "true"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    last_line = err.splitlines()[-1]
    assert "Traceback" not in err and "resume_from_checkpoint" in last_line and str(tmp_path / "empty") in last_line


# ----------------------------------------------------------------------------- learning


class _CountingBackbone(torch.nn.Module):
    """Hidden state at position t = how many of the target tokens occur up to t (a 1-d feature)."""

    def __init__(self, vocab_size: int, targets: list[int]) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 1)
        with torch.no_grad():
            self.embed.weight.zero_()
            self.embed.weight[targets] = 1.0

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        from types import SimpleNamespace

        features = self.embed(input_ids)
        if attention_mask is not None:
            features = features * attention_mask[..., None]
        return SimpleNamespace(last_hidden_state=features.cumsum(1))


class _CountingRewardModel(torch.nn.Module):
    """A reward model whose score is the number of target tokens in prompt + completion."""

    base_model_prefix = "model"

    def __init__(self, vocab_size: int, targets: list[int]) -> None:
        super().__init__()
        self.model = _CountingBackbone(vocab_size, targets)
        self.score = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.score.weight.fill_(1.0)

    def get_input_embeddings(self):
        return self.model.embed

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        from types import SimpleNamespace

        # the score layer at every position, as a decoder classifier computes it (read at the last attended token)
        hidden = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return SimpleNamespace(logits=self.score(hidden)[:, -1])


@pytest.mark.slow
def test_ppo_raises_the_reward_it_is_given(tiny_model_dir, tmp_path):
    """End to end: with a reward that counts a few tokens, PPO makes the policy emit them more often."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = _prompts(64)
    # the target tokens: the policy's most frequent first sampled tokens, so the reward is not too sparse
    with torch.no_grad():
        ids = tok(prompts["prompt"][:16], return_tensors="pt", padding=True, padding_side="left")
        logits = policy(**ids).logits[:, -1]
    targets = torch.topk(torch.softmax(logits, -1).mean(0), 5).indices.tolist()
    targets = [t for t in targets if t not in (tok.eos_token_id, tok.pad_token_id)]
    reward_model = _CountingRewardModel(policy.config.vocab_size, targets)

    args = _config(tmp_path, per_device_train_batch_size=16, total_episodes=16 * 30, response_length=8,
                   num_mini_batches=2, num_ppo_epochs=4, learning_rate=2e-3, kl_coef=0.01, temperature=1.0,
                   logging_steps=1, vf_coef=0.5)
    trainer = PPOTrainer(args=args, model=policy, processing_class=tok, reward_model=reward_model,
                         train_dataset=prompts)
    trainer.train()
    scores = [entry["objective/scores"] for entry in trainer.state.log_history if "objective/scores" in entry]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 0.5, scores  # half a target token more per 8-token completion (measured: ~+1)


# ----------------------------------------------------------------------------- the reward model given


@pytest.mark.parametrize("how", ["argument", "config"])
def test_a_causal_lm_given_as_reward_model_is_a_clear_error(tiny_model_dir, tmp_path, how):
    # AutoModelForSequenceClassification would load it with a random score head and only a load report
    args = _config(tmp_path, reward_model_path=tiny_model_dir if how == "config" else None)
    reward_model = tiny_model_dir if how == "argument" else None
    with pytest.raises(ConfigError) as error:
        PPOTrainer(args=args, model=tiny_model_dir, reward_model=reward_model, train_dataset=_prompts())
    message = str(error.value)
    assert tiny_model_dir in message and "ForCausalLM" in message
    assert "posttrain reward" in message and "AutoModelForSequenceClassification" in message
    assert error.value.field == "reward_model_path"
    with pytest.raises(ConfigError, match="causal language model"):
        PPOTrainer(args=_config(tmp_path), model=tiny_model_dir, train_dataset=_prompts(),
                   reward_model=AutoModelForCausalLM.from_pretrained(tiny_model_dir))


@pytest.mark.slow  # GRPO's is fast
def test_rollout_max_batch_tokens_samples_in_slices_with_the_same_run(tiny_model_dir, reward_model_dir, tmp_path,
                                                                       monkeypatch):
    """Rollouts sampled one row at a time give the same updates as the whole batch at once (keyed draws)."""
    from posttrain.rollout.hf_engine import HFRolloutEngine

    slices = []
    original = HFRolloutEngine._row_slices
    monkeypatch.setattr(HFRolloutEngine, "_row_slices",
                        lambda self, rows, group, positions: slices.append(original(self, rows, group, positions))
                        or slices[-1])

    def run(name, budget):
        slices.clear()
        args = _config(tmp_path, output_dir=str(tmp_path / name), rollout_max_batch_tokens=budget)
        trainer = PPOTrainer(args=args, model=tiny_model_dir, reward_model=reward_model_dir, train_dataset=_prompts())
        trainer.train()
        return _update_logs(trainer), list(slices)

    whole, whole_slices = run("whole", None)
    sliced, sliced_slices = run("sliced", 1)
    assert whole_slices == [[(0, 4)], [(0, 4)]]
    assert sliced_slices == [[(0, 1), (1, 2), (2, 3), (3, 4)]] * 2
    assert sliced == whole and len(whole) == 2
