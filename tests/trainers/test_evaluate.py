"""Evaluation as TRL scripts use it: ``compute_metrics`` and ``preprocess_logits_for_metrics`` in SFT,
reward and DPO, datasets passed to ``evaluate()`` (raw, or a dict of named sets) in every trainer, and
the attributes callbacks read."""

import copy

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain import (
    ConfigError,
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    RewardConfig,
    RewardTrainer,
    RLOOConfig,
    RLOOTrainer,
    SFTConfig,
    SFTTrainer,
)

COMMON = dict(per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_strategy="no",
              disable_tqdm=True, report_to="none")


def _prompt_completion(n=6, offset=0):
    return Dataset.from_list([{"prompt": f"{i + offset}+1=", "completion": str(i + offset + 1)} for i in range(n)])


def _preferences(n=6, conversational=True):
    from posttrain.tasks import get_task

    return get_task("arithmetic").as_preference(n, conversational=conversational)


def _prompts(n=2):
    return Dataset.from_list([{"prompt": f"What is {i} + 1?"} for i in range(n)])


def _one_batch(trainer, dataset):
    """The whole prepared ``dataset`` as one collated batch (eval batch size covers it)."""
    rows = [dataset[i] for i in range(len(dataset))]
    return trainer.data_collator(rows)


class Recorder:
    """A user's ``compute_metrics``: keeps what it was given, returns a few numbers computed from it."""

    def __init__(self, metric):
        self.metric = metric
        self.calls = []

    def __call__(self, eval_prediction):
        self.calls.append((np.asarray(eval_prediction.predictions), np.asarray(eval_prediction.label_ids)))
        return self.metric(*self.calls[-1])


def _next_token_accuracy(predictions, labels):
    # the usual causal-LM metric: logits/predictions at t are scored against the label at t+1
    preds, targets = predictions[:, :-1], labels[:, 1:]
    mask = targets != -100
    return {"next_token_accuracy": float((preds[mask] == targets[mask]).mean()), "scored": int(mask.sum())}


# ----------------------------------------------------------------------------- SFT


def _sft(tiny_model_dir, tmp_path, **kwargs):
    eval_size = kwargs.pop("eval_size", 6)
    args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_eval_batch_size=kwargs.pop("eval_batch", 8), **COMMON)
    return SFTTrainer(model=tiny_model_dir, args=args, train_dataset=_prompt_completion(4),
                      eval_dataset=_prompt_completion(eval_size, offset=10), **kwargs)


def _reference_argmax_and_targets(trainer, dataset):
    """Argmax of the model's own logits and the loss mask, from a plain forward (independent of the chunked head)."""
    batch = _one_batch(trainer, dataset)
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["completion_mask"][:, 1:].bool()
    return logits.argmax(-1), targets, batch


def test_sft_compute_metrics_gets_argmax_ids_and_loss_masked_labels(tiny_model_dir, tmp_path):
    recorder = Recorder(_next_token_accuracy)
    trainer = _sft(tiny_model_dir, tmp_path, compute_metrics=recorder)
    metrics = trainer.evaluate()

    assert len(recorder.calls) == 1
    assert "eval_next_token_accuracy" in metrics and "eval_loss" in metrics
    predictions, labels = recorder.calls[0]
    argmax, targets, batch = _reference_argmax_and_targets(trainer, trainer.eval_dataset)
    assert predictions.shape == labels.shape == tuple(batch["input_ids"].shape)
    # labels: the input ids where a token is a loss target, -100 elsewhere
    expected_labels = np.where(np.pad(targets.numpy(), ((0, 0), (1, 0))), batch["input_ids"].numpy(), -100)
    np.testing.assert_array_equal(labels, expected_labels)
    # predictions: the model's argmax at each position that predicts a target, -100 elsewhere
    scored = np.pad(targets.numpy(), ((0, 0), (0, 1)))
    np.testing.assert_array_equal(predictions[scored], argmax.numpy()[scored])
    assert (predictions[~scored] == -100).all()
    expected = (argmax[:, :-1][targets] == batch["input_ids"][:, 1:][targets]).float().mean().item()
    assert metrics["eval_next_token_accuracy"] == pytest.approx(expected)
    assert metrics["eval_scored"] == int(targets.sum())


def test_sft_preprocess_logits_sees_one_batch_of_logits(tiny_model_dir, tmp_path):
    seen = []

    def preprocess(logits, labels):
        seen.append((tuple(logits.shape), logits.detach().clone()))
        return logits.argmax(-1)

    recorder = Recorder(_next_token_accuracy)
    trainer = _sft(tiny_model_dir, tmp_path, compute_metrics=recorder, preprocess_logits_for_metrics=preprocess,
                   eval_batch=2)
    metrics = trainer.evaluate()

    vocab = trainer.model.config.vocab_size
    assert len(seen) == 3  # 6 rows, 2 per batch: called once per batch, never on the whole set
    assert all(shape[0] == 2 and shape[2] == vocab for shape, _ in seen)
    # the logits it gets are the model's own
    first = trainer.eval_dataset.select(range(2))
    batch = _one_batch(trainer, first)
    with torch.no_grad():
        own = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(seen[0][1], own.float(), rtol=1e-4, atol=1e-4)
    # and the metric agrees with the default (argmax computed from hidden states in chunks) path
    reference = _sft(tiny_model_dir, tmp_path, compute_metrics=Recorder(_next_token_accuracy)).evaluate()
    assert metrics["eval_next_token_accuracy"] == pytest.approx(reference["eval_next_token_accuracy"])
    assert metrics["eval_scored"] == reference["eval_scored"]


@pytest.mark.parametrize("layout", [dict(padding_free=True, max_length=None), dict(packing=True, max_length=24)])
def test_sft_metrics_do_not_depend_on_the_batch_layout(tiny_model_dir, tmp_path, layout):
    def build(**fields):
        args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_eval_batch_size=8, **fields, **COMMON)
        return SFTTrainer(model=tiny_model_dir, args=args, train_dataset=_prompt_completion(4),
                          eval_dataset=_prompt_completion(6, offset=10), compute_metrics=Recorder(_next_token_accuracy))

    padded, flat = build().evaluate(), build(**layout).evaluate()
    assert flat["eval_scored"] == padded["eval_scored"]
    assert flat["eval_next_token_accuracy"] == pytest.approx(padded["eval_next_token_accuracy"])
    assert flat["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-5)


def test_sft_predict_prepares_a_raw_dataset_and_evaluate_needs_no_compute_metrics(tiny_model_dir, tmp_path):
    trainer = _sft(tiny_model_dir, tmp_path)
    output = trainer.predict(_prompt_completion(3))  # a raw dataset, prepared like the eval set
    assert output.predictions is not None and output.predictions.shape[0] == 3
    metrics = trainer.evaluate()
    assert set(metrics) >= {"eval_loss", "eval_mean_token_accuracy"}


def test_sft_evaluate_prepares_raw_and_named_datasets(tiny_model_dir, tmp_path):
    recorder = Recorder(_next_token_accuracy)
    trainer = _sft(tiny_model_dir, tmp_path, compute_metrics=recorder)
    single = trainer.evaluate(eval_dataset=_prompt_completion(4, offset=20))
    assert np.isfinite(single["eval_loss"]) and "eval_next_token_accuracy" in single
    named = trainer.evaluate(eval_dataset={"a": _prompt_completion(4, offset=20), "b": _prompt_completion(2)})
    for name in ("a", "b"):
        assert np.isfinite(named[f"eval_{name}_loss"])
        assert f"eval_{name}_next_token_accuracy" in named
        assert f"eval_{name}_mean_token_accuracy" in named
    assert named["eval_a_loss"] == pytest.approx(single["eval_loss"])
    assert recorder.calls[-1][1].shape[0] == 2


def test_sft_named_eval_sets_at_construction(tiny_model_dir, tmp_path):
    args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_eval_batch_size=8, **COMMON)
    trainer = SFTTrainer(model=tiny_model_dir, args=args, train_dataset=_prompt_completion(4),
                         eval_dataset={"a": _prompt_completion(4, offset=20), "b": _prompt_completion(2)},
                         compute_metrics=Recorder(_next_token_accuracy))
    metrics = trainer.evaluate()
    assert {"eval_a_loss", "eval_b_loss", "eval_a_next_token_accuracy", "eval_b_next_token_accuracy"} <= set(metrics)
    assert metrics["eval_a_loss"] != metrics["eval_b_loss"]


# ----------------------------------------------------------------------------- reward


def _pair_metrics(predictions, labels):
    return {"pair_accuracy": float((predictions.argmax(-1) == labels).mean()),
            "pair_margin": float((predictions[:, 0] - predictions[:, 1]).mean())}


def test_reward_compute_metrics_gets_reward_pairs(tiny_model_dir, tmp_path):
    recorder = Recorder(_pair_metrics)
    args = RewardConfig(output_dir=str(tmp_path / "rm"), per_device_eval_batch_size=8, **COMMON)
    trainer = RewardTrainer(model=tiny_model_dir, args=args, train_dataset=_preferences(4),
                            eval_dataset=_preferences(6), compute_metrics=recorder)
    metrics = trainer.evaluate()

    predictions, labels = recorder.calls[0]
    assert predictions.shape == (6, 2) and labels.shape == (6,) and (labels == 0).all()
    batch = _one_batch(trainer, trainer.eval_dataset)
    with torch.no_grad():  # the model's own pooled score of each sequence
        scores = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    scores = scores.numpy()
    np.testing.assert_allclose(predictions, np.stack([scores[:6], scores[6:]], axis=-1), rtol=1e-5, atol=1e-5)
    assert metrics["eval_pair_accuracy"] == pytest.approx(metrics["eval_accuracy"])
    assert metrics["eval_pair_margin"] == pytest.approx(metrics["eval_margin"], rel=1e-5)


def test_reward_evaluate_prepares_raw_and_named_datasets(tiny_model_dir, tmp_path):
    args = RewardConfig(output_dir=str(tmp_path / "rm"), per_device_eval_batch_size=8, **COMMON)
    trainer = RewardTrainer(model=tiny_model_dir, args=args, train_dataset=_preferences(4),
                            compute_metrics=Recorder(_pair_metrics))
    single = trainer.evaluate(eval_dataset=_preferences(6))
    assert np.isfinite(single["eval_loss"]) and "eval_pair_accuracy" in single
    named = trainer.evaluate(eval_dataset={"a": _preferences(6), "b": _preferences(2, conversational=False)})
    assert {"eval_a_loss", "eval_b_loss", "eval_a_pair_accuracy", "eval_b_accuracy"} <= set(named)
    assert named["eval_a_loss"] == pytest.approx(single["eval_loss"])


# ----------------------------------------------------------------------------- DPO


def _dpo(tiny_model_dir, tmp_path, **kwargs):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs from the policy, so the implicit rewards are not all zero
        for parameter in reference.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_eval_batch_size=8, beta=0.3, **COMMON)
    return DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=_preferences(4),
                      processing_class=AutoTokenizer.from_pretrained(tiny_model_dir), **kwargs), reference


def _completion_logps(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(-1)


def test_dpo_compute_metrics_gets_implicit_rewards(tiny_model_dir, tmp_path):
    recorder = Recorder(_pair_metrics)
    trainer, reference = _dpo(tiny_model_dir, tmp_path, eval_dataset=_preferences(6), compute_metrics=recorder)
    metrics = trainer.evaluate()

    predictions, labels = recorder.calls[0]
    assert predictions.shape == (6, 2) and (labels == 0).all()
    batch = _one_batch(trainer, trainer.eval_dataset)
    rewards = 0.3 * (_completion_logps(trainer.model, batch) - _completion_logps(reference, batch))
    np.testing.assert_allclose(predictions, torch.stack([rewards[:6], rewards[6:]], -1).numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(predictions).max() > 1e-3
    assert metrics["eval_pair_accuracy"] == pytest.approx(metrics["eval_rewards/accuracies"])
    assert metrics["eval_pair_margin"] == pytest.approx(metrics["eval_rewards/margins"], rel=1e-4, abs=1e-6)


def test_dpo_named_eval_sets_and_ref_model_attribute(tiny_model_dir, tmp_path):
    trainer, reference = _dpo(tiny_model_dir, tmp_path, compute_metrics=Recorder(_pair_metrics),
                              eval_dataset={"a": _preferences(4), "b": _preferences(2, conversational=False)})
    metrics = trainer.evaluate()
    assert {"eval_a_loss", "eval_b_loss", "eval_a_pair_accuracy", "eval_b_pair_margin"} <= set(metrics)
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())


def test_dpo_ref_model_is_none_without_a_separate_reference(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    args = DPOConfig(output_dir=str(tmp_path / "dpo"), **COMMON)
    with_adapter = DPOTrainer(model=tiny_model_dir, args=args, train_dataset=_preferences(4),
                              peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert with_adapter.ref_model is None
    precomputed = DPOTrainer(model=tiny_model_dir, args=DPOConfig(output_dir=str(tmp_path / "p"),
                                                                  precompute_ref_log_probs=True, **COMMON),
                             train_dataset=_preferences(4))
    assert precomputed.ref_model is None
    default = DPOTrainer(model=tiny_model_dir, args=args, train_dataset=_preferences(4))
    assert isinstance(default.ref_model, torch.nn.Module) and default.ref_model is not default.model


# ----------------------------------------------------------------------------- online methods


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_online_evaluate_prepares_raw_prompts(tiny_model_dir, tmp_path, method):
    config_class, trainer_class = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}[method]
    args = config_class(output_dir=str(tmp_path / method), num_generations=2, max_completion_length=4,
                        per_device_eval_batch_size=2, **COMMON)
    trainer = trainer_class(model=tiny_model_dir, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                            args=args, train_dataset=_prompts(4))
    metrics = trainer.evaluate(eval_dataset=_prompts(2))
    assert np.isfinite(metrics["eval_loss"])
    named = trainer.evaluate(eval_dataset={"a": _prompts(2), "b": _prompts(1)})
    assert {"eval_a_loss", "eval_b_loss"} <= set(named)


# ----------------------------------------------------------------------------- construction


@pytest.mark.parametrize("method", ["sft", "reward", "dpo"])
def test_missing_train_dataset_is_a_config_error(tiny_model_dir, tmp_path, method):
    build = {
        "sft": lambda: SFTTrainer(model=tiny_model_dir, args=SFTConfig(output_dir=str(tmp_path / "s"))),
        "reward": lambda: RewardTrainer(model=tiny_model_dir, args=RewardConfig(output_dir=str(tmp_path / "r"))),
        "dpo": lambda: DPOTrainer(model=tiny_model_dir, args=DPOConfig(output_dir=str(tmp_path / "d"))),
    }[method]
    with pytest.raises(ConfigError, match="train_dataset"):
        build()


def test_aux_loss_enabled_follows_the_router_logits_flag(tiny_model_dir, tmp_path, caplog):
    args = SFTConfig(output_dir=str(tmp_path / "sft"), **COMMON)
    assert SFTTrainer(model=tiny_model_dir, args=args, train_dataset=_prompt_completion(4)).aux_loss_enabled is False
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.output_router_logits = True
    with caplog.at_level("WARNING", logger="posttrain"):
        trainer = SFTTrainer(model=model, args=args, train_dataset=_prompt_completion(4),
                             processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    assert trainer.aux_loss_enabled is True
    assert "load-balancing loss" not in caplog.text  # SFT adds it
