"""The architectures and tokenizers users bring, crossed with every trainer (docs/architectures.md).

Tiny random models are built offline from transformers' config classes
(:data:`posttrain.models.tiny.MATRIX_ARCHITECTURES`). For each architecture: the chunked log-probs
equal ``log_softmax(model(...).logits)``; every trainer takes two optimizer steps with finite
losses; the same rows padded right, padded left or packed give the same SFT loss. Tokenizer
variants (own pad, pad == EOS, no pad, BOS written by the template) are crossed with SFT, DPO and
GRPO on two architectures.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset

from posttrain.models.lm_head import target_positions, token_logps, weighted_target_nll
from posttrain.models.tiny import (
    MATRIX_ARCHITECTURES,
    TOKENIZER_VARIANTS,
    build_tiny_model,
    build_tokenizer_variant,
)

ARCHITECTURES = tuple(MATRIX_ARCHITECTURES)
TRAINERS = ("sft", "reward", "dpo", "grpo", "rloo", "ppo", "online_dpo")
# trainer x architecture cells in the fast subset, the rest marked slow, to keep the not-slow part of
# this file well under 90 s on one core (SFT and DPO losses are checked on every architecture by the
# layout tests below)
FAST_TRAINER_CELLS = {
    "sft": ("llama", "gemma2", "gpt2"),
    "dpo": ("mistral", "mixtral", "granite", "phi3"),
    "reward": ("llama", "gpt2"),
    "grpo": ("qwen3_moe", "gemma2", "gpt2"),
    "rloo": ("mistral", "phi3"),
    "ppo": ("qwen2", "gpt2"),
    "online_dpo": ("olmo2", "mixtral"),
}


def _has_sequence_classification(arch: str) -> bool:
    import transformers

    config_class = getattr(transformers, MATRIX_ARCHITECTURES[arch][0])
    return config_class in transformers.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING


def _score_model(arch: str, tokenizer, seed: int = 1):
    """A reward / value model of ``arch``, or of Llama where transformers has no such class for ``arch``."""
    return build_tiny_model(arch if _has_sequence_classification(arch) else "llama", tokenizer, reward=True, seed=seed)


@pytest.fixture(scope="module")
def own_pad_tokenizer():
    return build_tokenizer_variant("own_pad")


def _cell(trainer: str, arch: str):
    marks = []
    if arch not in FAST_TRAINER_CELLS[trainer]:
        marks.append(pytest.mark.slow)
    if trainer == "reward" and not _has_sequence_classification(arch):
        marks.append(pytest.mark.skip(reason=f"transformers has no sequence-classification class for {arch}"))
    return pytest.param(trainer, arch, marks=marks, id=f"{trainer}-{arch}")


# ----------------------------------------------------------------------------- data


def _conversations(n: int = 4) -> Dataset:
    return Dataset.from_list([
        {"messages": [{"role": "user", "content": f"What is {i} + {i % 3}?"},
                      {"role": "assistant", "content": f"The answer is {i + i % 3}." + " Yes." * (i % 2)}]}
        for i in range(n)
    ])


def _preferences(n: int = 4) -> Dataset:
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
         "chosen": [{"role": "assistant", "content": f"{i + 1}"}],
         "rejected": [{"role": "assistant", "content": f"It is {i + 7}, I think."}]}
        for i in range(n)
    ])


def _prompts(n: int = 4) -> Dataset:
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"Count to {i + 2}."}]} for i in range(n)])


def _length_reward(prompts, completions, **kwargs):
    return [len(c[0]["content"] if isinstance(c, list) else c) / 10.0 for c in completions]


def _common(tmp_path) -> dict:
    return dict(output_dir=str(tmp_path / "out"), max_steps=2, learning_rate=1e-3, logging_steps=1,
                save_strategy="no", report_to="none", disable_tqdm=True)


# ----------------------------------------------------------------------------- trainers


def _train(method: str, arch: str, tokenizer, tmp_path):
    """Build ``method``'s trainer on a tiny ``arch`` model, train two optimizer steps, return the trainer."""
    import posttrain

    common = _common(tmp_path)
    policy = build_tiny_model(arch, tokenizer)
    if method == "sft":
        args = posttrain.SFTConfig(per_device_train_batch_size=2, max_length=64, **common)
        trainer = posttrain.SFTTrainer(model=policy, args=args, train_dataset=_conversations(),
                                       processing_class=tokenizer)
    elif method == "reward":
        args = posttrain.RewardConfig(per_device_train_batch_size=2, max_length=64, **common)
        trainer = posttrain.RewardTrainer(model=build_tiny_model(arch, tokenizer, reward=True), args=args,
                                          train_dataset=_preferences(), processing_class=tokenizer)
    elif method == "dpo":
        args = posttrain.DPOConfig(per_device_train_batch_size=2, max_length=64, **common)
        trainer = posttrain.DPOTrainer(model=policy, args=args, train_dataset=_preferences(),
                                       processing_class=tokenizer)
    elif method in ("grpo", "rloo"):
        config, trainer_class = ((posttrain.GRPOConfig, posttrain.GRPOTrainer) if method == "grpo"
                                 else (posttrain.RLOOConfig, posttrain.RLOOTrainer))
        args = config(per_device_train_batch_size=4, num_generations=2, max_completion_length=4, **common)
        trainer = trainer_class(model=policy, reward_funcs=_length_reward, args=args, train_dataset=_prompts(),
                                processing_class=tokenizer)
    elif method == "online_dpo":
        args = posttrain.OnlineDPOConfig(per_device_train_batch_size=2, max_completion_length=4, **common)
        trainer = posttrain.OnlineDPOTrainer(model=policy, reward_funcs=_length_reward, args=args,
                                             train_dataset=_prompts(), processing_class=tokenizer)
    elif method == "ppo":
        common.pop("max_steps")
        # two batches of 4 rollouts, one epoch of one mini-batch each: two optimizer steps
        args = posttrain.PPOConfig(per_device_train_batch_size=4, total_episodes=8, num_ppo_epochs=1,
                                   num_mini_batches=1, response_length=4, num_sample_generations=0, **common)
        trainer = posttrain.PPOTrainer(args=args, processing_class=tokenizer, model=policy,
                                       reward_model=_score_model(arch, tokenizer),
                                       train_dataset=_prompts())
    else:  # pragma: no cover - the parametrisation lists every method
        raise AssertionError(method)
    trainer.train()
    return trainer


def _logged_losses(trainer) -> list[float]:
    return [value for entry in trainer.state.log_history for key, value in entry.items()
            if "loss" in key and isinstance(value, (int, float))]


def _assert_two_finite_steps(trainer) -> None:
    assert trainer.state.global_step == 2
    losses = _logged_losses(trainer)
    assert losses, trainer.state.log_history
    assert all(math.isfinite(value) for value in losses), trainer.state.log_history
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("method, arch", [_cell(m, a) for m in TRAINERS for a in ARCHITECTURES])
def test_every_trainer_takes_two_finite_steps(method, arch, own_pad_tokenizer, tmp_path):
    trainer = _train(method, arch, copy.deepcopy(own_pad_tokenizer), tmp_path)
    _assert_two_finite_steps(trainer)


# ----------------------------------------------------------------------------- log-probs


def _padded_batch(vocab_size: int, pad_id: int):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab_size, (3, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # left padding
    attention_mask[1, 8:] = 0  # right padding
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_id)
    completion_mask = attention_mask.clone()
    completion_mask[:, :5] = 0
    return input_ids, attention_mask, completion_mask


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_logps_equal_log_softmax_of_the_model_logits(arch, own_pad_tokenizer):
    model = build_tiny_model(arch, own_pad_tokenizer).eval()  # eval: GPT-2 has dropout
    if hasattr(model.config, "output_router_logits"):
        model.config.output_router_logits = False  # the SFT loss would add the router loss (tested below)
    input_ids, attention_mask, completion_mask = _padded_batch(len(own_pad_tokenizer), own_pad_tokenizer.pad_token_id)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    out = token_logps(model, input_ids, completion_mask, attention_mask, position_ids, chunk_size=4)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    expected = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = target_positions(completion_mask)
    assert torch.equal(out.mask, mask) and mask.sum() > 10
    torch.testing.assert_close(out.logps[mask].double(), expected[mask], rtol=0, atol=2e-5)
    # SFT's fused loss goes through the same head
    weights = torch.full((int(mask.sum()),), 1.0 / float(mask.sum()))
    nll, _ = weighted_target_nll(model, input_ids, mask, weights, attention_mask, position_ids, chunk_size=4)
    torch.testing.assert_close(nll.double(), -expected[mask].mean(), rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- layouts


def _left_padded(batch: dict) -> dict:
    """The right-padded ``batch`` with its padding moved to the left; positions count real tokens."""
    mask = batch["attention_mask"]
    order = torch.argsort(mask, dim=1, stable=True)  # padding (0) first, then the tokens in order
    left = {key: batch[key].gather(1, order) for key in ("input_ids", "attention_mask", "completion_mask")}
    left["position_ids"] = (left["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    return left


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sft_loss_is_the_same_padded_right_left_padding_free_or_packed(arch, own_pad_tokenizer, tmp_path):
    import posttrain

    tokenizer = copy.deepcopy(own_pad_tokenizer)
    model = build_tiny_model(arch, tokenizer).eval()
    losses = {}
    for layout in ("right", "left", "padding_free", "packed"):
        # padding-free without packing needs max_length=None (the rows here are short)
        args = posttrain.SFTConfig(per_device_train_batch_size=4, padding_free=layout == "padding_free",
                                   max_length=None if layout == "padding_free" else 256,
                                   packing=layout == "packed", **_common(tmp_path))
        trainer = posttrain.SFTTrainer(model=model, args=args, train_dataset=_conversations(),
                                       processing_class=tokenizer)
        rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
        batch = trainer.data_collator(rows)
        if layout == "left":
            batch = _left_padded(batch)
        with torch.no_grad():
            losses[layout] = float(trainer.compute_loss(model, batch))
    assert len(trainer.train_dataset) == (1 if layout == "packed" else 4)
    for layout, value in losses.items():
        assert value == pytest.approx(losses["right"], abs=2e-5), (layout, losses)


# ----------------------------------------------------------------------------- tokenizer variants

VARIANT_ARCHITECTURES = ("llama", "gpt2")
VARIANT_TRAINERS = ("sft", "dpo", "grpo")


@pytest.mark.parametrize("variant", TOKENIZER_VARIANTS)
def test_tokenizer_variants_are_what_they_say(variant):
    tokenizer = build_tokenizer_variant(variant)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    if variant == "own_pad":
        assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    elif variant == "pad_is_eos":
        assert tokenizer.pad_token_id == tokenizer.eos_token_id
    elif variant == "no_pad":
        assert tokenizer.pad_token is None
    else:
        assert tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
        assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id  # and the tokenizer adds it too
        assert tokenizer(text)["input_ids"][:2] == [tokenizer.bos_token_id] * 2  # the doubling to avoid
    if variant != "template_bos":
        assert tokenizer.bos_token is None


def _variant_cell(arch: str, method: str, variant: str):
    # fast: Llama with every variant but its own pad (every other test's tokenizer has one), and GPT-2 with no
    # pad token (how GPT-2 ships); the rest slow
    fast = (arch == "llama" and variant != "own_pad") or variant == "no_pad"
    return pytest.param(arch, method, variant, marks=[] if fast else [pytest.mark.slow],
                        id=f"{arch}-{method}-{variant}")


@pytest.mark.parametrize("arch, method, variant", [
    _variant_cell(a, m, v) for a in VARIANT_ARCHITECTURES for m in VARIANT_TRAINERS for v in TOKENIZER_VARIANTS
])
def test_trainers_with_every_tokenizer_variant(arch, method, variant, tmp_path):
    tokenizer = build_tokenizer_variant(variant)
    trainer = _train(method, arch, tokenizer, tmp_path)
    _assert_two_finite_steps(trainer)
    if variant == "template_bos":
        # the template's BOS starts every row once: never doubled by the tokenizer's own
        bos = tokenizer.bos_token_id
        for row in trainer.train_dataset.select(range(2)):
            ids = row["input_ids"] if "input_ids" in row else row["prompt_input_ids"]
            assert ids[0] == bos and ids[1] != bos


def _first_batch_loss(method: str, model, tokenizer, tmp_path, reference=None) -> float:
    """``method``'s loss on its first batch of 4 rows; DPO against ``reference`` (which should differ from
    ``model``: against a copy of itself every DPO loss is log 2 whatever the log-probs)."""
    import posttrain

    if method == "sft":
        args = posttrain.SFTConfig(per_device_train_batch_size=4, max_length=64, **_common(tmp_path))
        trainer = posttrain.SFTTrainer(model=model, args=args, train_dataset=_conversations(), processing_class=tokenizer)
    else:
        args = posttrain.DPOConfig(per_device_train_batch_size=4, max_length=64, **_common(tmp_path))
        trainer = posttrain.DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=_preferences(),
                                       processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        return float(trainer.compute_loss(model, batch))


@pytest.mark.parametrize("method", ("sft", "dpo"))
@pytest.mark.parametrize("arch", VARIANT_ARCHITECTURES)
def test_pad_equal_to_eos_or_missing_gives_the_loss_of_a_separate_pad(arch, method, tmp_path):
    # the EOS that ends each completion is a target; a pad token equal to it must not mask it out
    own = build_tokenizer_variant("own_pad")
    model = build_tiny_model(arch, own).eval()
    reference = build_tiny_model(arch, own, seed=1).eval()
    losses = {variant: _first_batch_loss(method, model, build_tokenizer_variant(variant), tmp_path, reference)
              for variant in ("own_pad", "pad_is_eos", "no_pad")}
    assert method == "sft" or abs(losses["own_pad"] - math.log(2)) > 1e-4
    for variant, value in losses.items():
        assert value == pytest.approx(losses["own_pad"], abs=1e-6), (variant, losses)


@pytest.mark.parametrize("arch", ("qwen3_moe", "mixtral"))
def test_sft_loss_adds_the_router_loss_as_transformers_does(arch, own_pad_tokenizer, tmp_path):
    import posttrain

    model = build_tiny_model(arch, own_pad_tokenizer).eval()
    assert model.config.output_router_logits and model.config.router_aux_loss_coef > 0
    args = posttrain.SFTConfig(per_device_train_batch_size=4, max_length=64, **_common(tmp_path))
    trainer = posttrain.SFTTrainer(model=model, args=args, train_dataset=_conversations(),
                                   processing_class=own_pad_tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    assert reference.aux_loss > 0
    torch.testing.assert_close(loss, reference.loss, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ("pad_is_eos", "no_pad"))
def test_reward_scores_with_pad_equal_to_eos_or_missing_equal_those_of_a_separate_pad(variant, tmp_path):
    import posttrain

    model = build_tiny_model("llama", build_tokenizer_variant("own_pad"), reward=True).eval()
    rewards = {}
    for name in ("own_pad", variant):
        tokenizer = build_tokenizer_variant(name)
        scorer = copy.deepcopy(model)
        args = posttrain.RewardConfig(per_device_train_batch_size=4, max_length=64, **_common(tmp_path))
        trainer = posttrain.RewardTrainer(model=scorer, args=args, train_dataset=_preferences(),
                                          processing_class=tokenizer)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        with torch.no_grad():
            _, outputs = trainer.compute_loss(scorer, batch, return_outputs=True)
        rewards[name] = torch.cat([outputs["rewards_chosen"], outputs["rewards_rejected"]])
    torch.testing.assert_close(rewards[variant], rewards["own_pad"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_dpo_loss_is_the_same_padded_or_padding_free(arch, own_pad_tokenizer, tmp_path):
    import posttrain

    model = build_tiny_model(arch, own_pad_tokenizer).eval()
    reference = build_tiny_model(arch, own_pad_tokenizer, seed=1).eval()
    losses = {}
    for padding_free in (False, True):
        args = posttrain.DPOConfig(per_device_train_batch_size=4, max_length=64, padding_free=padding_free,
                                   **_common(tmp_path))
        trainer = posttrain.DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=_preferences(),
                                       processing_class=own_pad_tokenizer)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        with torch.no_grad():
            losses[padding_free] = float(trainer.compute_loss(model, batch))
    assert abs(losses[False] - math.log(2)) > 1e-4  # the log-probs matter
    assert losses[True] == pytest.approx(losses[False], abs=2e-5), losses


@pytest.mark.parametrize("padding_free", (False, True))
def test_dpo_loss_adds_the_router_loss_of_the_policy(padding_free, own_pad_tokenizer, tmp_path):
    import posttrain

    model = build_tiny_model("qwen3_moe", own_pad_tokenizer).eval()
    reference = build_tiny_model("qwen3_moe", own_pad_tokenizer, seed=1).eval()
    args = posttrain.DPOConfig(per_device_train_batch_size=4, max_length=64, padding_free=padding_free,
                               **_common(tmp_path))
    trainer = posttrain.DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=_preferences(),
                                   processing_class=own_pad_tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    losses = {}
    with torch.no_grad():
        for router in (True, False):
            model.config.output_router_logits = router
            losses[router] = trainer.compute_loss(model, batch)
        model.config.output_router_logits = True
        expected = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                         position_ids=batch.get("position_ids")).aux_loss * model.config.router_aux_loss_coef
    assert expected > 1e-3
    torch.testing.assert_close(losses[True] - losses[False], expected, rtol=0, atol=1e-6)
