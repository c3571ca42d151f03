"""The rest of TRL's GRPO/RLOO vocabulary: each field implemented (checked against float64 or by hand) or
refused with the reason, never accepted and ignored."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain import ConfigError, GRPOConfig, GRPOTrainer
from posttrain.rollout.sequences import RolloutSequences
from posttrain.trainers.rloo import RLOOConfig


def _prompts(n=8):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i % 3}?"}]} for i in range(n)])


def _length_reward(completions, **kwargs):
    return [float(len(c[0]["content"])) / 10.0 for c in completions]


def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=6, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                  disable_tqdm=True, report_to="none")
    values.update(overrides)
    return GRPOConfig(**values)


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("grpo")), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, disable_tqdm=True, save_strategy="no", loss_type="bnpo")
    return GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=args, train_dataset=_prompts(4))


def _micro_batch(vocab_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])
    prompt_ids = torch.randint(5, vocab_size, (3, 4), generator=generator).masked_fill(prompt_mask == 0, 0)
    completion_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    completion_ids = torch.randint(5, vocab_size, (3, 5), generator=generator).masked_fill(completion_mask == 0, 0)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "loss_mask": completion_mask.clone(),
            "advantages": torch.tensor([1.5, -0.5, -1.0]), "is_truncated": torch.tensor([False, True, False]),
            "num_items_in_batch": torch.tensor(10.0)}


def _float64_logps_and_entropy(model, inputs):
    """Completion log-probs and entropies from the model's own full logits in float64 (an independent path)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits.double()
    start = inputs["prompt_ids"].shape[1]
    log_probs = torch.log_softmax(logits[:, start - 1 : -1], dim=-1)
    logps = log_probs.gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    return logps, -(log_probs.exp() * log_probs).sum(-1)


class _Fields:
    """Set trainer.args fields for one test and put them back."""

    def __init__(self, trainer, **values):
        self.args, self.values = trainer.args, values

    def __enter__(self):
        self.saved = {name: getattr(self.args, name) for name in self.values}
        for name, value in self.values.items():
            setattr(self.args, name, value)

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            setattr(self.args, name, value)


# ----------------------------------------------------------------------------- the loss terms


def test_top_entropy_quantile_trains_only_on_the_high_entropy_tokens(trainer):
    """bnpo on policy: loss = -sum over kept tokens of A / all loss tokens; kept = entropy >= the 0.6-quantile."""
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = _micro_batch(model.config.vocab_size)
    with torch.no_grad():
        _, entropy = _float64_logps_and_entropy(model, inputs)
    mask = inputs["loss_mask"].bool()
    threshold = np.quantile(entropy[mask].numpy(), 0.6)
    kept = (entropy >= threshold) & mask
    expected = -(inputs["advantages"].double()[:, None] * kept).sum() / mask.sum()
    with _Fields(trainer, top_entropy_quantile=0.4):
        loss = trainer.compute_loss(model, RolloutSequences.from_dict(inputs))
    assert 0 < kept.sum() < mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)


def test_entropy_coef_subtracts_the_mean_entropy_with_its_gradient(trainer):
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 2
    inputs = _micro_batch(model.config.vocab_size, seed=1)
    mask = inputs["loss_mask"].bool()
    base = trainer.compute_loss(model, RolloutSequences.from_dict(inputs))
    trainer.entropy_bonus.coef = 0.3  # what entropy_coef=0.3 sets when the trainer is built
    try:
        with _Fields(trainer, entropy_coef=0.3):
            loss = trainer.compute_loss(model, RolloutSequences.from_dict(inputs))
    finally:
        trainer.entropy_bonus.coef = 0.0
    _, entropy = _float64_logps_and_entropy(model, inputs)
    expected_term = -0.3 * entropy[mask].mean() / 2  # averaged over 2 accumulated micro-batches
    assert (loss - base).item() == pytest.approx(expected_term.item(), rel=1e-4)
    weight = model.model.layers[0].mlp.up_proj.weight
    (grad,) = torch.autograd.grad(loss - base, weight)
    (expected_grad,) = torch.autograd.grad(expected_term, weight)
    assert expected_grad.abs().sum() > 0
    torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-3, atol=1e-7)


def test_off_policy_mask_drops_drifted_negative_advantage_sequences(trainer):
    """old log-probs shifted per row: row 0 (A > 0) is kept, row 1 (KL 0.2) is kept, row 2 (KL 1.0) is dropped."""
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = _micro_batch(model.config.vocab_size, seed=2)
    with torch.no_grad():
        current, _ = _float64_logps_and_entropy(model, inputs)
    shift = torch.tensor([[1.0], [0.2], [1.0]], dtype=torch.float64)  # log pi_old - log pi per token
    inputs["old_logps"] = (current + shift).float()
    mask, advantages = inputs["loss_mask"].bool(), inputs["advantages"].double()

    def expected(keep):
        ratio = torch.exp(-shift).expand_as(current)
        clipped = ratio.clamp(0.8, 1.2)
        per_token = -torch.min(ratio * advantages[:, None], clipped * advantages[:, None])
        return (per_token * keep[:, None] * mask).sum() / mask.sum()

    with _Fields(trainer, off_policy_mask_threshold=0.5):
        masked = trainer.compute_loss(model, RolloutSequences.from_dict(inputs))
    unmasked = trainer.compute_loss(model, RolloutSequences.from_dict(inputs))
    assert masked.item() == pytest.approx(expected(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)).item(), rel=1e-4)
    assert unmasked.item() == pytest.approx(expected(torch.ones(3, dtype=torch.float64)).item(), rel=1e-4)


def test_adaptive_entropy_moves_the_coefficient_once_per_optimizer_step():
    from types import SimpleNamespace

    from posttrain.trainers.grpo_terms import EntropyBonus

    args = SimpleNamespace(entropy_coef=0.01, use_adaptive_entropy=True, entropy_target=1.0, entropy_coef_delta=0.005,
                           entropy_coef_min=0.0, entropy_coef_max=0.012)
    bonus = EntropyBonus(args)
    low, high = torch.full((2, 3), 0.5), torch.full((2, 3), 2.0)
    mask = torch.ones(2, 3)
    call = dict(training=True, accumulation_steps=2, num_processes=1)
    term, _ = bonus.loss_term(low, mask, end_of_step=False, **call)
    assert term.item() == 0.0  # no step measured yet: the bonus waits
    term, metrics = bonus.loss_term(high, mask, end_of_step=True, **call)
    # step mean entropy (0.5 * 6 + 2.0 * 6) / 12 = 1.25 > target: the coefficient goes down by delta
    assert bonus.last_entropy == pytest.approx(1.25) and metrics["entropy_coef"] == pytest.approx(0.005)
    term, _ = bonus.loss_term(low, mask, end_of_step=True, **call)
    assert term.item() == 0.0  # the previous step was above the target
    assert bonus.coef == pytest.approx(0.01)  # 0.5 <= target: up again
    term, _ = bonus.loss_term(low, mask, end_of_step=True, **call)
    assert term.item() == pytest.approx(-0.01 * 0.5 / 2)
    assert bonus.coef == pytest.approx(0.012)  # capped at entropy_coef_max
    restored = EntropyBonus(args)
    restored.load_state_dict(bonus.state_dict())
    assert (restored.coef, restored.last_entropy) == (bonus.coef, bonus.last_entropy)


@pytest.mark.slow  # three runs
def test_adaptive_entropy_state_survives_a_resume(tiny_model_dir, tmp_path):
    def run(name, resume=None):
        args = _config(tmp_path, output_dir=str(tmp_path / name), per_device_train_batch_size=2, num_generations=2,
                       max_completion_length=4, max_steps=3, save_strategy="steps", save_steps=2,
                       gradient_accumulation_steps=2,
                       use_adaptive_entropy=True, entropy_target=100.0, entropy_coef_delta=0.01)
        trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=args, train_dataset=_prompts(2))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run("a")
    resumed = run("b", resume=str(tmp_path / "a" / "checkpoint-2"))
    # entropy below the target: up by delta once per optimizer step (not per micro-batch)
    assert straight.entropy_bonus.coef == pytest.approx(0.03)
    assert resumed.entropy_bonus.coef == pytest.approx(0.03)
    losses = lambda t: {e["step"]: e["loss"] for e in t.state.log_history if "loss" in e}  # noqa: E731
    assert losses(resumed)[3] == losses(straight)[3]


def test_cast_lm_head_to_fp32_computes_the_head_product_in_float32(tiny_model_dir):
    from posttrain.models.lm_head import compute_head_in_float32, forward_hidden_states, token_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    ids = torch.randint(5, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    targets = torch.ones_like(ids)
    with torch.no_grad():
        hidden = forward_hidden_states(model, ids)[:, :-1].double()
        logits = hidden @ model.get_output_embeddings().weight.double().t()
        reference = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        plain = token_logps(model, ids, targets).logps.double()
        assert compute_head_in_float32(model)
        cast = token_logps(model, ids, targets).logps.double()
    plain_error, cast_error = (plain - reference).abs().max(), (cast - reference).abs().max()
    assert cast_error < 1e-4 < plain_error  # bf16 rounds each logit to ~3 significant digits


def test_cast_lm_head_to_fp32_marks_policy_and_reference_and_refuses_a_lora_head(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    from posttrain.models.lm_head import HEAD_FLOAT32_ATTRIBUTE, output_head

    args = _config(tmp_path, cast_lm_head_to_fp32=True, beta=0.1)
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=args, train_dataset=_prompts(4))
    assert output_head(trainer.model).transform.float32_matmul
    assert getattr(trainer.reference.model, HEAD_FLOAT32_ATTRIBUTE, False)
    with pytest.raises(ConfigError, match="cast_lm_head_to_fp32"):
        GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=_config(tmp_path, cast_lm_head_to_fp32=True),
                    train_dataset=_prompts(4), peft_config=LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))


# ----------------------------------------------------------------------------- generation and data options


def test_generation_kwargs_reach_the_sampler(tiny_model_dir, tmp_path):
    args = _config(tmp_path, generation_kwargs='{"top_k": 1, "repetition_penalty": 1.3, "do_sample": true}')
    assert (args.top_k, args.repetition_penalty) == (1, 1.3)
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=args, train_dataset=_prompts(4))
    assert (trainer.sampling.top_k, trainer.sampling.repetition_penalty) == (1, 1.3)
    rows = trainer.generate_completions(_prompts(1), num_generations=4)
    assert len({row["completion"] for row in rows}) == 1  # top_k = 1: every draw is the argmax


@pytest.mark.parametrize("kwargs, match", [
    ({"num_beams": 4}, "num_beams"),
    ({"temperature": 0.5}, "temperature"),
    ({"max_new_tokens": 99}, "max_completion_length"),
    ({"do_sample": False}, "greedily"),
])
def test_generation_kwargs_the_sampler_cannot_honour_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match) as error:
        GRPOConfig(output_dir="o", generation_kwargs=kwargs)
    assert error.value.field == "generation_kwargs"


def test_chat_template_kwargs_reach_the_prompt_template(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}{{ mode | default('plain') }}:{% endif %}")
    args = _config(tmp_path, chat_template_kwargs={"mode": "think"})
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=args, train_dataset=_prompts(4),
                          processing_class=tokenizer)
    text = tokenizer.decode(trainer.train_dataset[0]["prompt_input_ids"])
    assert text.endswith("think:") and "plain" not in text


def test_grpo_pad_to_multiple_of_pads_micro_batches(tiny_model_dir, tmp_path):
    args = _config(tmp_path, pad_to_multiple_of=8)
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=args, train_dataset=_prompts(4))
    trainer.model.train()
    rows = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert rows.prompt_ids.shape[1] % 8 == 0 and rows.completion_ids.shape[1] % 8 == 0
    assert GRPOConfig(output_dir="o", pad_to_multiple_of="auto").pad_to_multiple_of is None


def test_log_unique_prompts_prints_one_row_per_prompt(tmp_path, capsys):
    from posttrain.report.completions import CompletionsLog

    rows = [{"prompt": p, "completion": c, "rewards": {}, "reward": 0.0, "advantage": 0.0}
            for p in ("first prompt", "second prompt") for c in ("alpha", "beta")]
    log = CompletionsLog()
    log.replace(list(rows))
    log.flush(str(tmp_path), 1, None, unique_prompts=True)
    printed = capsys.readouterr().out
    assert "alpha" in printed and "beta" not in printed
    assert len(open(tmp_path / "completions.jsonl").readlines()) == 4  # the file keeps every row


def test_log_unique_prompts_reaches_the_table_in_training(tiny_model_dir, tmp_path, capsys):
    args = _config(tmp_path, max_steps=1, log_completions=True, log_unique_prompts=True)
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=args, train_dataset=_prompts(4))
    trainer.train()
    printed = capsys.readouterr().out
    lines = [json.loads(line) for line in open(tmp_path / "out" / "completions.jsonl")]
    assert len(lines) == 4 and len({line["prompt"] for line in lines}) == 1
    assert printed.count("What is") == 1


# ----------------------------------------------------------------------------- refused with the reason


@pytest.mark.parametrize("config_class", [GRPOConfig, RLOOConfig])
@pytest.mark.parametrize("field_name, value", [
    ("cache_implementation", "static"),
    ("ds3_gather_for_generation", False),
    ("use_transformers_continuous_batching", True),
    ("use_transformers_paged", True),
    ("transformers_continuous_batching_config", {"max_batch_tokens": 64}),
])
def test_options_posttrain_cannot_honour_are_refused(config_class, field_name, value):
    with pytest.raises(ConfigError) as error:
        config_class(output_dir="o", **{field_name: value})
    assert error.value.field in (field_name, "use_transformers_continuous_batching")


def test_defaults_and_accepted_values_build():
    config = RLOOConfig(output_dir="o", cache_implementation="dynamic", log_multimodal=False,
                        chat_template_kwargs='{"enable_thinking": false}', generation_kwargs={"top_p": 0.9})
    assert config.chat_template_kwargs == {"enable_thinking": False} and config.top_p == 0.9


@pytest.mark.parametrize("overrides, field_name", [
    ({"log_completions_hub_repo": "me/completions"}, "log_completions_hub_repo"),
    ({"top_entropy_quantile": 1.5}, "top_entropy_quantile"),
    ({"off_policy_mask_threshold": 0.0}, "off_policy_mask_threshold"),
    ({"entropy_coef_min": 0.5, "entropy_coef_max": 0.1}, "entropy_coef_min"),
])
def test_grpo_only_fields_are_checked(overrides, field_name):
    with pytest.raises(ConfigError) as error:
        GRPOConfig(output_dir="o", **overrides)
    assert error.value.field == field_name
