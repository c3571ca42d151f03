"""GRPOTrainer: config vocabulary, the generation schedule, advantages and every loss variant against
hand computations, reward-function plumbing, and end-to-end runs in the ways TRL users call it."""

import json
import math
import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain import ConfigError, GRPOConfig, GRPOTrainer
from posttrain.data.prompts import RepeatedBlockSampler
from posttrain.rollout.sequences import RolloutSequences
from posttrain.trainers.online import ScoredRollout, resolve_generation_schedule


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models gain nothing from a second thread, and lose a lot when the cores are shared
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prompts(n=8, conversational=True):
    rows = []
    for i in range(n):
        question = f"What is {i} + {i % 3}?"
        prompt = [{"role": "user", "content": question}] if conversational else question + " Answer:"
        rows.append({"prompt": prompt, "answer": i + i % 3})
    return Dataset.from_list(rows)


def _length_reward(prompts, completions, **kwargs):
    return [float(len(c[0]["content"] if isinstance(c, list) else c)) / 10.0 for c in completions]


def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=6, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                  disable_tqdm=True, report_to="none")
    values.update(overrides)
    return GRPOConfig(**values)


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("grpo")), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, disable_tqdm=True, save_strategy="no")
    return GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=args, train_dataset=_prompts(4))


# ----------------------------------------------------------------------------- configuration


def test_config_older_names_and_defaults():
    config = GRPOConfig(output_dir="o", max_new_tokens=128, warmup_ratio=0.1, per_device_train_batch_size=4,
                        num_generations=4, scale_rewards=False)
    assert config.max_completion_length == 128
    assert config.warmup_steps == pytest.approx(0.1)
    assert config.learning_rate == 1e-6 and config.loss_type == "dapo" and config.beta == 0.0
    assert config.epsilon_high == config.epsilon == 0.2
    assert config.scale_rewards == "none"


@pytest.mark.parametrize(
    "batch, accumulation, generations, expected_steps",
    [(4, 1, 4, 1), (1, 4, 8, 8), (2, 2, 4, 2), (3, 2, 4, 4), (8, 1, 4, 1)],
)
def test_generation_schedule_holds_whole_groups(batch, accumulation, generations, expected_steps):
    steps, generation_batch = resolve_generation_schedule(
        per_device_batch_size=batch, gradient_accumulation_steps=accumulation, num_generations=generations)
    assert steps == expected_steps
    assert generation_batch == batch * steps
    assert generation_batch % generations == 0 and steps % accumulation == 0


@pytest.mark.parametrize("overrides, field", [
    (dict(num_generations=1), "num_generations"),
    (dict(per_device_train_batch_size=1, num_generations=2, steps_per_generation=3), "num_generations"),
    (dict(steps_per_generation=2, generation_batch_size=8), "steps_per_generation"),
    (dict(generation_batch_size=6), "generation_batch_size"),
    (dict(loss_type="ppo"), "loss_type"),
    (dict(scale_rewards="median"), "scale_rewards"),
    (dict(importance_sampling_level="word"), "importance_sampling_level"),
    (dict(temperature=0.0), "temperature"),
])
def test_config_errors_name_the_field(overrides, field):
    values = dict(output_dir="o", per_device_train_batch_size=4, num_generations=4)
    values.update(overrides)
    with pytest.raises(ConfigError) as info:
        GRPOConfig(**values)
    assert info.value.field == field


def test_unknown_loss_type_lists_the_known_ones():
    with pytest.raises(ConfigError, match="dapo"):
        GRPOConfig(output_dir="o", per_device_train_batch_size=4, num_generations=4, loss_type="ppo")


def test_sampler_repeats_each_block_then_moves_on():
    sampler = RepeatedBlockSampler(7, block_size=2, repeats=3, shuffle=False)
    assert list(sampler) == [0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 4, 5, 4, 5, 4, 5]  # row 6: partial block, dropped
    assert len(sampler) == 18
    shuffled = list(RepeatedBlockSampler(6, block_size=3, repeats=2, shuffle=True, seed=1))
    assert shuffled[0:3] == shuffled[3:6] and shuffled[6:9] == shuffled[9:12]
    assert sorted(shuffled[0:3] + shuffled[6:9]) == list(range(6)) and shuffled[0:6] != [0, 1, 2, 0, 1, 2]


# ----------------------------------------------------------------------------- advantages


def _scored(rewards, group_size, per_function=None):
    rewards = torch.tensor(rewards, dtype=torch.float32)
    per_function = rewards.unsqueeze(1) if per_function is None else torch.tensor(per_function, dtype=torch.float32)
    return ScoredRollout(rows={}, prompts=[], completions=[], rewards_per_function=per_function, rewards=rewards,
                         reward_names=["r"], group_size=group_size)


def test_group_relative_advantages_by_hand(trainer):
    scored = _scored([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], group_size=4)
    advantages, metrics = trainer.compute_advantages(scored, {})
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
    assert advantages.tolist() == pytest.approx(expected, rel=1e-5)
    assert metrics["frac_reward_zero_std"] == 0.5


def test_unscorable_completion_is_left_out_of_its_group(trainer):
    scored = _scored([1.0, float("nan"), 3.0, 2.0], group_size=4)
    advantages, _ = trainer.compute_advantages(scored, {})
    std = 1.0  # unbiased std of (1, 3, 2)
    assert advantages.tolist() == pytest.approx([-1 / (std + 1e-4), 0.0, 1 / (std + 1e-4), 0.0], rel=1e-5)


def test_scale_rewards_none_only_centres(trainer):
    trainer.args.scale_rewards = "none"
    try:
        advantages, _ = trainer.compute_advantages(_scored([1.0, 3.0, 10.0, 20.0], group_size=2), {})
    finally:
        trainer.args.scale_rewards = "group"
    assert advantages.tolist() == pytest.approx([-1.0, 1.0, -5.0, 5.0])


# ----------------------------------------------------------------------------- the loss, by hand


def _micro_batch(vocab_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(5, vocab_size, (3, 4), generator=generator)
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, 0)
    completion_ids = torch.randint(5, vocab_size, (3, 5), generator=generator)
    completion_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "loss_mask": completion_mask.clone(),
        "advantages": torch.tensor([1.5, -0.5, -1.0]), "is_truncated": torch.tensor([False, True, False]),
    }


def _float64_logps(model, inputs, temperature):
    """Completion log-probs from the full logits in float64: an independent path to the same numbers."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits.double() / temperature
    start = inputs["prompt_ids"].shape[1]
    log_probs = torch.log_softmax(logits[:, start - 1 : -1], dim=-1)
    return log_probs.gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)


def _expected_loss(logps, old_logps, ref_logps, inputs, *, loss_type, eps_low, eps_high, beta, max_len, items):
    """The GRPO objective written out token by token."""
    mask, advantages = inputs["loss_mask"], inputs["advantages"].double()
    per_row = []
    for i in range(mask.shape[0]):
        terms = []
        for t in range(mask.shape[1]):
            if not mask[i, t]:
                continue
            ratio = torch.exp(logps[i, t] - old_logps[i, t])
            clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
            term = -torch.min(ratio * advantages[i], clipped * advantages[i])
            if beta:
                x = ref_logps[i, t] - logps[i, t]
                term = term + beta * (torch.exp(x) - x - 1) * ratio
            terms.append(term)
        per_row.append(terms)
    total = sum(sum(terms) for terms in per_row)
    tokens = sum(len(terms) for terms in per_row)
    if loss_type == "grpo":
        return sum(sum(terms) / len(terms) for terms in per_row) / len(per_row)
    if loss_type == "bnpo":
        return total / tokens
    if loss_type == "dr_grpo":
        return total / (len(per_row) * max_len)
    return total / items


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_loss_and_gradient_match_hand_computation(trainer, loss_type, beta):
    model = trainer.model
    model.train()
    args = trainer.args
    args.loss_type, args.beta, args.epsilon, args.epsilon_high, args.temperature = loss_type, beta, 0.2, 0.28, 0.7
    trainer.current_gradient_accumulation_steps = 2
    inputs = _micro_batch(model.config.vocab_size)
    inputs["num_items_in_batch"] = torch.tensor(17.0)  # tokens of the whole accumulation window
    with torch.no_grad():
        current = _float64_logps(model, inputs, 0.7)
    noise = torch.Generator().manual_seed(1)
    # old and reference policies a little away from the current one, so that clipping and the KL both act
    inputs["old_logps"] = (current + 0.3 * torch.randn(current.shape, generator=noise, dtype=torch.float64)).float()
    inputs["ref_logps"] = (current + 0.2 * torch.randn(current.shape, generator=noise, dtype=torch.float64)).float()
    try:
        loss = trainer.compute_loss(model, RolloutSequences.from_dict(inputs))
        expected = _expected_loss(
            _float64_logps(model, inputs, 0.7), inputs["old_logps"].double(), inputs["ref_logps"].double(), inputs,
            loss_type=loss_type, eps_low=0.2, eps_high=0.28, beta=beta, max_len=args.max_completion_length, items=17.0,
        )
        if loss_type != "dapo":
            expected = expected / 2  # averaged over the 2 accumulated micro-batches
        assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
        weight = model.model.layers[0].mlp.up_proj.weight
        (grad,) = torch.autograd.grad(loss, weight)
        (expected_grad,) = torch.autograd.grad(expected, weight)
        assert torch.allclose(grad.double(), expected_grad.double(), rtol=1e-3, atol=1e-6)
        assert grad.abs().sum() > 0
    finally:
        args.loss_type, args.beta, args.epsilon_high, args.temperature = "dapo", 0.0, 0.2, 1.0


def test_on_policy_loss_is_minus_the_mean_advantage(trainer):
    """Without old log-probs the ratio is 1: the loss is -mean(A) over tokens, zero for centred advantages."""
    trainer.model.train()
    trainer.args.loss_type = "bnpo"
    trainer.current_gradient_accumulation_steps = 1
    inputs = _micro_batch(trainer.model.config.vocab_size)
    inputs["num_items_in_batch"] = torch.tensor(10.0)
    try:
        loss = trainer.compute_loss(trainer.model, RolloutSequences.from_dict(inputs))
    finally:
        trainer.args.loss_type = "dapo"
    tokens = inputs["loss_mask"].sum(1).double()
    expected = -(inputs["advantages"].double() * tokens).sum() / tokens.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_sequence_level_ratio_is_the_mean_token_log_ratio(trainer):
    model = trainer.model
    model.train()
    trainer.args.importance_sampling_level, trainer.args.loss_type = "sequence", "grpo"
    trainer.current_gradient_accumulation_steps = 1
    inputs = _micro_batch(model.config.vocab_size, seed=3)
    with torch.no_grad():
        current = _float64_logps(model, inputs, 1.0)
    inputs["old_logps"] = (current - 0.3 * inputs["loss_mask"]).float()  # every token: log-ratio +0.3
    inputs["advantages"] = torch.tensor([1.5, -0.5, 2.0])
    inputs["num_items_in_batch"] = inputs["loss_mask"].sum()
    try:
        loss = trainer.compute_loss(model, RolloutSequences.from_dict(inputs))
    finally:
        trainer.args.importance_sampling_level, trainer.args.loss_type = "token", "dapo"
    ratio = math.exp(0.3)  # 1.35: clipped to 1.2 where A > 0, not where A < 0
    expected = (-1.2 * 1.5 + ratio * 0.5 - 1.2 * 2.0) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------- reward plumbing


def test_reward_functions_receive_rows_columns_and_state(tiny_model_dir, tmp_path):
    calls = []

    def recording(prompts, completions, completion_ids, answer, trainer_state, **kwargs):
        calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer,
                          state=trainer_state, extra=kwargs))
        return [1.0 if i % 2 else None for i in range(len(prompts))]

    dataset = _prompts(4).add_column("difficulty", ["easy", "hard", "easy", "hard"])
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=[recording, _length_reward],
                          args=_config(tmp_path, num_generations=2, per_device_train_batch_size=4), train_dataset=dataset)
    rows = trainer.generate_completions(dataset[:2])
    call = calls[-1]
    assert len(call["prompts"]) == 4 and call["prompts"][0] == call["prompts"][1] == dataset[0]["prompt"]
    assert call["answer"] == [0, 0, 2, 2] and call["extra"]["difficulty"] == ["easy", "easy", "hard", "hard"]
    assert call["completions"][0][0]["role"] == "assistant"  # conversational prompts get message completions
    tokenizer = trainer.processing_class
    texts = [c[0]["content"] for c in call["completions"]]
    assert texts == tokenizer.batch_decode(call["completion_ids"], skip_special_tokens=True)
    assert call["state"] is trainer.state
    assert [r["rewards"]["recording"] for r in rows] == [None, 1.0, None, 1.0]  # None stays None
    assert rows[0]["reward"] == pytest.approx(rows[0]["rewards"]["_length_reward"])  # None excluded, not 0
    assert trainer.state.global_step == 0


def test_prompt_completion_data_with_string_prompts(tiny_model_dir, tmp_path):
    dataset = Dataset.from_list([{"prompt": f"{i} + 1 =", "completion": f" {i + 1}", "answer": i + 1} for i in range(4)])
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs="accuracy", args=_config(tmp_path), train_dataset=dataset)
    rows = trainer.generate_completions(dataset[0], num_generations=2)
    assert [row["prompt"] for row in rows] == ["0 + 1 =", "0 + 1 ="]
    assert all(isinstance(row["completion"], str) and row["rewards"]["accuracy"] in (0.0, 1.0) for row in rows)


def test_vllm_without_a_gpu_is_a_config_error_at_construction(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="vllm|GPU"):
        GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=_config(tmp_path, use_vllm=True),
                    train_dataset=_prompts(4))


def test_missing_reward_funcs_lists_the_builtins(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="accuracy") as info:
        GRPOTrainer(tiny_model_dir, args=_config(tmp_path), train_dataset=_prompts(4))
    assert info.value.field == "reward_funcs"


# ----------------------------------------------------------------------------- end to end


def test_seed_config_trains(tiny_model_dir, tmp_path):
    args = GRPOConfig(output_dir=str(tmp_path / "seed"), per_device_train_batch_size=4, num_train_epochs=1,
                      learning_rate=1e-5, num_generations=4, max_new_tokens=128)
    args.max_steps, args.logging_steps, args.save_strategy, args.disable_tqdm = 2, 1, "no", True  # keep it short
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=_length_reward, args=args, train_dataset=_prompts(8))
    trainer.train()
    logged = {key for record in trainer.state.log_history for key in record}
    for key in ("loss", "reward", "reward_std", "rewards/_length_reward/mean", "rewards/_length_reward/std",
                "frac_reward_zero_std", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/region_mean", "completions/mean_length", "completions/min_length",
                "completions/max_length", "completions/clipped_ratio", "num_tokens"):
        assert key in logged, key
    trainer.save_model()
    assert os.path.isfile(tmp_path / "seed" / "model.safetensors")


@pytest.mark.parametrize("share", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_share_prompt_forward_runs_each_prompt_once_with_the_same_losses(share, tiny_model_dir, tmp_path):
    def run(share_prompt_forward):
        torch.manual_seed(0)
        args = _config(tmp_path / str(share_prompt_forward), max_steps=2, beta=0.04, num_iterations=2,
                       share_prompt_forward=share_prompt_forward)
        trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=args, train_dataset=_prompts(4))
        rows = []  # rows of each forward with gradient (rollouts and old log-probs run without)

        def record(module, args, kwargs):
            if torch.is_grad_enabled():
                inputs = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
                rows.append(inputs.shape[0])

        trainer.model.register_forward_pre_hook(record, with_kwargs=True)
        trainer.train()
        return [record["loss"] for record in trainer.state.log_history if "loss" in record], rows

    losses, rows_per_forward = run(share)
    baseline, _ = run(not share)
    assert losses == pytest.approx(baseline, abs=1e-6)
    # one prompt x 4 completions per micro-batch: shared, the prompt runs on 1 row, then 4 completions
    assert rows_per_forward == ([1, 4] * 2 if share else [4] * 2)


def test_rollouts_sample_under_the_training_autocast(tiny_model_dir, tmp_path, monkeypatch):
    from posttrain.rollout.lean_decode import LeanDecoder
    from tests.rollout.test_lean_decode import _wrap_forward_in_autocast

    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=_config(tmp_path), train_dataset=_prompts(4))
    # as with bf16 mixed precision: accelerate wraps forward in autocast, and accelerator.autocast() enters it
    _wrap_forward_in_autocast(trainer.model)
    monkeypatch.setattr(trainer.accelerator, "autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    built = []
    build = LeanDecoder.build
    monkeypatch.setattr(LeanDecoder, "build", lambda model: built.append(build(model)) or built[-1])
    rows = trainer.generate_completions(_prompts(1))
    assert len(rows) == 4 and built
    assert all(decoder is not None for decoder in built)  # the lean step runs, under the same autocast


def test_memory_lean_config_generates_once_for_two_optimizer_steps(tiny_model_dir, tmp_path):
    calls = []

    def counting(prompts, completions, **kwargs):
        calls.append(len(prompts))
        return [float(len(c[0]["content"])) for c in completions]

    args = _config(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=4, num_generations=8,
                   max_grad_norm=0.1, lr_scheduler_type="cosine", warmup_ratio=0.1, adam_beta2=0.99, weight_decay=0.1,
                   max_steps=2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=counting, args=args, train_dataset=_prompts(4), tokenizer=tokenizer)
    assert trainer.args.steps_per_generation == 8 and trainer.needs_generation_logps("train")
    trainer.train()
    assert calls == [8]  # one prompt x 8 completions, spread over 2 x 4 micro-steps
    assert trainer.state.global_step == 2


def test_three_reward_functions_with_weights(tiny_model_dir, tmp_path):
    import re

    def incremental_format(completions, **kwargs):
        return [0.25 * sum(tag in c[0]["content"] for tag in ("<think>", "</think>", "<answer>", "</answer>"))
                for c in completions]

    def strict_format(completions, **kwargs):
        pattern = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>$", re.DOTALL)
        return [1.0 if pattern.match(c[0]["content"]) else 0.0 for c in completions]

    def correctness(completions, answer, **kwargs):
        return [1.0 if str(a) in c[0]["content"] else 0.0 for c, a in zip(completions, answer)]

    args = _config(tmp_path, max_steps=1, reward_weights=[0.5, 1.0, 2.0])
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=[incremental_format, strict_format, correctness], args=args,
                          train_dataset=_prompts(4))
    rows = trainer.generate_completions(_prompts(1), num_generations=3)
    for row in rows:
        weighted = 0.5 * row["rewards"]["incremental_format"] + row["rewards"]["strict_format"] + 2 * row["rewards"]["correctness"]
        assert row["reward"] == pytest.approx(weighted)
    trainer.train()
    for name in ("incremental_format", "strict_format", "correctness"):
        assert f"rewards/{name}/mean" in trainer.state.log_history[0]


def test_lora_with_kl_uses_the_base_model_as_reference(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    args = _config(tmp_path, max_steps=2, beta=0.1, save_strategy="no")
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=args, train_dataset=_prompts(8),
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert trainer.reference.kind == "adapters_disabled"
    trainer.train()
    kls = [record["kl"] for record in trainer.state.log_history if "kl" in record]
    assert kls and all(k >= 0 for k in kls)
    trainer.save_model()
    assert os.path.isfile(tmp_path / "out" / "adapter_config.json")


@pytest.mark.slow  # trains and evaluates
def test_reuse_with_num_iterations_logs_completions_and_evaluates(tiny_model_dir, tmp_path, capsys):
    args = _config(tmp_path, max_steps=2, num_iterations=2, log_completions=True, num_completions_to_print=2,
                   eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=args, train_dataset=_prompts(4),
                          eval_dataset=_prompts(2))
    assert trainer.needs_generation_logps("train")
    trainer.train()
    lines = [json.loads(line) for line in open(tmp_path / "out" / "completions.jsonl")]
    assert [line["step"] for line in lines] == [1] * 4  # one generation, used by both steps: logged once
    assert {"prompt", "completion", "rewards", "reward", "advantage"} <= set(lines[0])
    assert "completions at step 1" in capsys.readouterr().out
    assert any("eval_loss" in record and "eval_reward" in record for record in trainer.state.log_history)


def test_truncated_completions_get_no_loss_when_masked(trainer):
    trainer.args.mask_truncated_completions = True
    trainer.model.train()
    try:
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(1)])
        rows = trainer._generate_and_score(batch, mode="train", record=False).rows
    finally:
        trainer.args.mask_truncated_completions = False
    truncated = rows.is_truncated
    assert truncated.any()  # a random tiny model rarely stops within 6 tokens
    assert rows.loss_mask[truncated].sum() == 0
    assert torch.equal(rows.loss_mask[~truncated], rows.completion_mask[~truncated])


@pytest.mark.slow
def test_reward_goes_up_on_an_easy_task(tiny_model_dir, tmp_path):
    """Reward = share of completion tokens from the lower half of the vocabulary (about 0.5 at random)."""

    def low_tokens(completion_ids, **kwargs):
        return [sum(token < 512 for token in ids) / max(len(ids), 1) for ids in completion_ids]

    args = _config(tmp_path, max_steps=40, learning_rate=1e-2, num_generations=8, per_device_train_batch_size=8,
                   max_completion_length=8, logging_steps=5)
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=low_tokens, args=args, train_dataset=_prompts(40))
    trainer.train()
    rewards = [record["reward"] for record in trainer.state.log_history if "reward" in record]
    # each logged reward averages 5 steps of 8 completions; compare the first and last 10 steps
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.1, rewards


def test_sampler_order_is_a_function_of_the_epoch():
    """A run resumed in epoch 2 must see epoch 2's order, not the first epoch's again."""
    sampler = RepeatedBlockSampler(12, block_size=4, repeats=1, seed=3)
    epochs = [list(sampler) for _ in range(2)]
    assert epochs[0] == epochs[1]  # without set_epoch, the same epoch again
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != epochs[0] and sorted(second) == list(range(12))
    fresh = RepeatedBlockSampler(12, block_size=4, repeats=1, seed=3)
    fresh.set_epoch(1)
    assert list(fresh) == second


def _resumable_grpo(model_dir, tmp_path, name, resume=None):
    """6 optimizer steps over 2 prompts; each generation serves 4 steps (2 micro-batches x 2 iterations),
    so the checkpoint at step 3 falls inside a generation, and step 5 starts a new epoch."""
    args = _config(tmp_path, output_dir=str(tmp_path / name), per_device_train_batch_size=2, num_generations=2,
                   steps_per_generation=2, num_iterations=2, max_completion_length=4, max_steps=6,
                   save_strategy="steps", save_steps=3, scale_rewards="batch")
    trainer = GRPOTrainer(model_dir, reward_funcs=_length_reward_or_none, args=args, train_dataset=_prompts(2))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _length_reward_or_none(prompts, completions, **kwargs):
    # None (unscorable) for some completions, so the reward computer's running count of them moves
    lengths = [len(c[0]["content"]) for c in completions]
    return [n / 10.0 if n % 3 else None for n in lengths]


def test_resume_inside_a_generation_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path):
    straight = _resumable_grpo(tiny_model_dir, tmp_path, "a")
    checkpoint = tmp_path / "a" / "checkpoint-3"
    resumed = _resumable_grpo(tiny_model_dir, tmp_path, "b", resume=str(checkpoint))
    assert resumed.state.global_step == 6
    for (name, param), other in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(other, param, rtol=0, atol=0, msg=name)
    losses = lambda t: {e["step"]: e["loss"] for e in t.state.log_history if "loss" in e}  # noqa: E731
    assert losses(resumed) == losses(straight) and len(losses(straight)) == 6
    counts = [getattr(t.reward_computer, "num_all_none_rows", None) for t in (straight, resumed)]
    assert counts[0] == counts[1]
    assert (checkpoint / "online_state.pt").is_file()  # the buffer of the generation under way
    # the resumed steps moved the weights: equality is more than a copy of the checkpoint
    saved = AutoModelForCausalLM.from_pretrained(str(checkpoint))
    assert any(not torch.equal(p, q) for p, q in zip(saved.parameters(), straight.model.parameters()))


@pytest.mark.slow  # two runs
def test_include_num_input_tokens_seen_counts_the_trained_rollout_tokens(tiny_model_dir, tmp_path):
    seen = {}
    for mode in ("non_padding", "all"):
        args = _config(tmp_path, max_steps=2, include_num_input_tokens_seen=mode)
        trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=args, train_dataset=_prompts(8))
        trainer.train()
        seen[mode] = trainer.state.num_input_tokens_seen
        shortest_prompt = min(len(ids) for ids in trainer.train_dataset["prompt_input_ids"])
    # 2 steps x 4 completions: each row holds its prompt and at least one completion token
    assert 8 * (shortest_prompt + 1) <= seen["non_padding"] <= seen["all"]


def test_router_aux_loss_coef_is_refused_and_a_moe_config_is_told(tiny_model_dir, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ConfigError, match="router_aux_loss_coef"):
        _config(tmp_path, router_aux_loss_coef=0.01)
    assert _config(tmp_path, router_aux_loss_coef=0.0).router_aux_loss_coef == 0.0
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.output_router_logits = True  # as a Mixture-of-Experts config sets it
    with caplog.at_level("WARNING", logger="posttrain"):
        GRPOTrainer(model, reward_funcs=_length_reward, args=_config(tmp_path), train_dataset=_prompts(4),
                    processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    assert caplog.text.count("does not add the MoE router") == 1


def test_rollout_max_batch_tokens_samples_in_slices_with_the_same_run(tiny_model_dir, tmp_path, monkeypatch):
    """A generation batch sampled 3 rows at a time (cutting through the groups of 4) gives the same completions,
    rewards and losses as the whole batch at once."""
    from posttrain.rollout.hf_engine import HFRolloutEngine

    calls = []  # (row positions, slices) of each generation
    original = HFRolloutEngine._row_slices
    monkeypatch.setattr(HFRolloutEngine, "_row_slices",
                        lambda self, rows, group, positions: calls.append((positions, original(self, rows, group, positions)))
                        or calls[-1][1])

    def run(max_batch_tokens):
        calls.clear()
        torch.manual_seed(0)
        args = _config(tmp_path / str(max_batch_tokens), max_steps=2, per_device_train_batch_size=8,
                       rollout_max_batch_tokens=max_batch_tokens)
        trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=args, train_dataset=_prompts(4))
        trainer.train()
        logged = [(r["loss"], r["reward"], r["entropy"]) for r in trainer.state.log_history if "loss" in r]
        return logged, list(calls)

    whole, whole_calls = run(None)
    assert [slices for _, slices in whole_calls] == [[(0, 8)], [(0, 8)]]
    budget = 3 * max(positions for positions, _ in whole_calls)
    sliced, sliced_calls = run(budget)
    for positions, slices in sliced_calls:
        assert slices == [(0, 3), (3, 6), (6, 8)] and 3 * positions <= budget
    assert sliced == whole
    with pytest.raises(ConfigError) as error:
        _config(tmp_path, rollout_max_batch_tokens=0)
    assert error.value.field == "rollout_max_batch_tokens"
    with pytest.raises(ConfigError) as error:
        _config(tmp_path, rollout_max_batch_tokens=4096, use_vllm=True)
    assert error.value.field == "rollout_max_batch_tokens"
