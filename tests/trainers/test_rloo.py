"""RLOOTrainer: config, leave-one-out advantages with the KL in the reward, the sequence-level loss with
the KL in the loss, all against hand computations; end-to-end runs."""

import math
import os

import pytest
import torch
from datasets import Dataset

from posttrain import ConfigError, RLOOConfig, RLOOTrainer
from posttrain.rollout.sequences import RolloutSequences
from posttrain.trainers.online import ScoredRollout


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models gain nothing from a second thread, and lose a lot when the cores are shared
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prompts(n=8):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": i + 1}
                              for i in range(n)])


def _length_reward(completions, **kwargs):
    return [len(c[0]["content"]) / 10.0 for c in completions]


def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=6, learning_rate=1e-3, logging_steps=1, save_strategy="no", disable_tqdm=True)
    values.update(overrides)
    return RLOOConfig(**values)


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    args = RLOOConfig(output_dir=str(tmp_path_factory.mktemp("rloo")), per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=6, disable_tqdm=True, save_strategy="no", beta=0.1)
    return RLOOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=args, train_dataset=_prompts(4))


def test_config_defaults_and_older_names():
    config = RLOOConfig(output_dir="o", max_new_tokens=32, per_device_train_batch_size=2)
    assert config.max_completion_length == 32 and config.num_generations == 2 and config.beta == 0.05
    assert config.kl_in_reward and config.kl_estimator == "k1"
    assert RLOOConfig(output_dir="o", per_device_train_batch_size=2, kl_in_reward=False).kl_estimator == "k3"
    with pytest.raises(ConfigError) as info:
        RLOOConfig(output_dir="o", per_device_train_batch_size=2, reward_clip_range=[1.0, -1.0])
    assert info.value.field == "reward_clip_range"
    with pytest.raises(ConfigError, match="k3"):
        RLOOConfig(output_dir="o", per_device_train_batch_size=2, kl_estimator="k9")


def _scored(rewards, group_size):
    rewards = torch.tensor(rewards, dtype=torch.float32)
    return ScoredRollout(rows={}, prompts=[], completions=[], rewards_per_function=rewards.unsqueeze(1),
                         rewards=rewards, reward_names=["r"], group_size=group_size)


def test_leave_one_out_advantages_with_kl_in_the_reward(trainer):
    rewards = [1.0, 2.0, 3.0, 6.0]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    old = torch.tensor([[-1.0, -2.0, 9.0], [-0.5, -0.5, -0.5], [-3.0, 9.0, 9.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.5, 0.0], [-0.5, -1.0, -0.5], [-2.0, 0.0, 0.0], [-1.0, -1.0, -2.0]])
    rows = RolloutSequences(prompt_ids=torch.ones(4, 1, dtype=torch.long), prompt_mask=torch.ones(4, 1, dtype=torch.long),
                            completion_ids=mask, completion_mask=mask, loss_mask=mask, is_truncated=torch.zeros(4, dtype=torch.bool),
                            old_logps=old, ref_logps=ref)
    advantages, metrics = trainer.compute_advantages(_scored(rewards, 4), rows)
    # k1 summed over each completion's tokens: 0.5 + 0.5, 0.5, -1.0, 1.0
    shaped = [1.0 - 0.1 * 1.0, 2.0 - 0.1 * 0.5, 3.0 - 0.1 * (-1.0), 6.0 - 0.1 * 1.0]
    expected = [r - (sum(shaped) - r) / 3 for r in shaped]
    assert advantages.tolist() == pytest.approx(expected, rel=1e-5)
    assert metrics["kl"] == pytest.approx((0.5 + 0.5 + 0.5 - 1.0 + 1.0) / 9, rel=1e-5)


def test_reward_clipping_and_normalisation(trainer):
    args = trainer.args
    args.beta, args.reward_clip_range, args.normalize_advantages = 0.0, [0.0, 4.0], True
    try:
        advantages, metrics = trainer.compute_advantages(_scored([-3.0, 1.0, 2.0, 9.0], 2), {})
    finally:
        args.beta, args.reward_clip_range, args.normalize_advantages = 0.1, None, False
    raw = torch.tensor([0.0 - 1.0, 1.0 - 0.0, 2.0 - 4.0, 4.0 - 2.0], dtype=torch.float64)  # clipped, then LOO
    expected = (raw - raw.mean()) / (raw.std() + 1e-4)
    assert advantages.tolist() == pytest.approx(expected.tolist(), rel=1e-4)
    assert metrics["frac_reward_zero_std"] == 0.0


def _micro_batch(vocab_size):
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(5, vocab_size, (3, 3), generator=generator)
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1]])
    completion_ids = torch.randint(5, vocab_size, (3, 4), generator=generator)
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    return {"prompt_ids": prompt_ids * prompt_mask, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids * completion_mask, "completion_mask": completion_mask,
            "loss_mask": completion_mask.clone(), "advantages": torch.tensor([0.8, -0.3, 1.1]),
            "is_truncated": torch.zeros(3, dtype=torch.bool), "num_items_in_batch": completion_mask.sum().float()}


def _float64_logps(model, inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits.double()
    start = inputs["prompt_ids"].shape[1]
    log_probs = torch.log_softmax(logits[:, start - 1 : -1], dim=-1)
    return log_probs.gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1) * inputs["completion_mask"]


@pytest.mark.parametrize("kl_in_reward", [True, False])
def test_sequence_loss_and_gradient_match_hand_computation(trainer, kl_in_reward):
    model = trainer.model
    model.train()
    args = trainer.args
    args.kl_in_reward, args.kl_estimator = kl_in_reward, ("k1" if kl_in_reward else "k3")
    trainer.current_gradient_accumulation_steps = 2
    inputs = _micro_batch(model.config.vocab_size)
    with torch.no_grad():
        current = _float64_logps(model, inputs)
    # sequence log-ratios of +0.5, -0.1, +0.05: the first is clipped (A > 0), the others are not
    inputs["old_logps"] = (current - torch.tensor([[0.5, 0, 0, 0], [-0.1, 0, 0, 0], [0.05, 0, 0, 0]])).float()
    inputs["ref_logps"] = (current - 0.3 * inputs["completion_mask"]).float()  # k3 per token at x = 0.3
    try:
        loss = trainer.compute_loss(model, RolloutSequences.from_dict(inputs))
        logps = _float64_logps(model, inputs)
        ratios = torch.exp(logps.sum(1) - inputs["old_logps"].double().sum(1))
        advantages = inputs["advantages"].double()
        per_sequence = -torch.minimum(ratios * advantages, ratios.clamp(0.8, 1.2) * advantages)
        expected = per_sequence.mean()
        if not kl_in_reward:
            x = inputs["ref_logps"].double() - logps
            k3 = (torch.exp(x) - x - 1) * inputs["completion_mask"]
            expected = expected + 0.1 * k3.sum(1).mean()
        expected = expected / 2
        assert ratios[0].item() == pytest.approx(math.exp(0.5), rel=1e-4)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
        weight = model.model.layers[1].self_attn.q_proj.weight
        (grad,) = torch.autograd.grad(loss, weight)
        (expected_grad,) = torch.autograd.grad(expected, weight)
        assert torch.allclose(grad.double(), expected_grad.double(), rtol=1e-3, atol=1e-7) and grad.abs().sum() > 0
    finally:
        args.kl_in_reward, args.kl_estimator = True, "k1"


def test_kl_in_reward_needs_the_sampling_log_probs(trainer):
    assert trainer.needs_generation_logps("train") and trainer.needs_generation_logps("eval")
    assert trainer.reference.kind == "frozen_copy"


def test_trains_with_a_reference_and_saves(tiny_model_dir, tmp_path):
    args = _config(tmp_path, max_steps=2, beta=0.05, num_iterations=2)
    trainer = RLOOTrainer(tiny_model_dir, reward_funcs=[_length_reward], args=args, train_dataset=_prompts(8))
    trainer.train()
    logged = {key for record in trainer.state.log_history for key in record}
    for key in ("loss", "reward", "reward_std", "kl", "entropy", "clip_ratio/region_mean", "frac_reward_zero_std",
                "completions/mean_length", "completions/clipped_ratio"):
        assert key in logged, key
    trainer.save_model()
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")


def test_generate_completions_gives_leave_one_out_advantages(tiny_model_dir, tmp_path):
    trainer = RLOOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=_config(tmp_path, beta=0.0),
                          train_dataset=_prompts(4))
    rows = trainer.generate_completions(_prompts(1)[0], num_generations=3)
    rewards = [row["reward"] for row in rows]
    expected = [r - (sum(rewards) - r) / 2 for r in rewards]
    assert [row["advantage"] for row in rows] == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_reward_goes_up_on_an_easy_task(tiny_model_dir, tmp_path):
    """Reward = share of completion tokens from the lower half of the vocabulary (about 0.5 at random)."""

    def low_tokens(completion_ids, **kwargs):
        return [sum(token < 512 for token in ids) / max(len(ids), 1) for ids in completion_ids]

    args = _config(tmp_path, max_steps=40, learning_rate=1e-2, num_generations=8, per_device_train_batch_size=8,
                   max_completion_length=8, logging_steps=5, beta=0.0)
    trainer = RLOOTrainer(tiny_model_dir, reward_funcs=low_tokens, args=args, train_dataset=_prompts(40))
    trainer.train()
    rewards = [record["reward"] for record in trainer.state.log_history if "reward" in record]
    # each logged reward averages 5 steps of 8 completions; compare the first and last 10 steps
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.05, rewards


def _resumable_rloo(model_dir, tmp_path, name, resume=None):
    """4 optimizer steps, each one generation over 2 prompts in 2 micro-batches, with the KL in the reward
    (reference log-probs); 4 prompts make an epoch of 2 steps, so the resumed half starts epoch 2."""
    args = _config(tmp_path, output_dir=str(tmp_path / name), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                   max_completion_length=4, max_steps=4, save_strategy="steps", save_steps=2, normalize_advantages=True)
    trainer = RLOOTrainer(model_dir, reward_funcs=_length_reward, args=args, train_dataset=_prompts(4))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.slow  # three runs; GRPO's resume test is fast
def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path):
    straight = _resumable_rloo(tiny_model_dir, tmp_path, "a")
    resumed = _resumable_rloo(tiny_model_dir, tmp_path, "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for (name, param), other in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(other, param, rtol=0, atol=0, msg=name)
    losses = lambda t: {e["step"]: e["loss"] for e in t.state.log_history if "loss" in e}  # noqa: E731
    assert losses(resumed) == losses(straight) and len(losses(straight)) == 4
