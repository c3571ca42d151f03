"""DPOTrainer on tiny models: exact values against hand computations, reference strategies, and the
calls TRL users write."""

import copy
import json
import math

import pytest
import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain import ConfigError, DataError, DPOConfig, DPOTrainer
from posttrain.trainers.reference import ReferenceSyncCallback, mix_into_reference


# ----------------------------------------------------------------------------- helpers


def _preferences(n=8, conversational=True):
    from posttrain.tasks import get_task

    return get_task("arithmetic").as_preference(n, conversational=conversational)


def _uneven_preferences(n=8):
    """Arithmetic pairs whose chosen (even rows) or rejected (odd rows) answer is several tokens longer."""
    def lengthen(row, index):
        side = "chosen" if index % 2 == 0 else "rejected"
        row[side] = [{"role": "assistant", "content": row[side][0]["content"] + " is the answer I give to this"}]
        return row

    return _preferences(n).map(lengthen, with_indices=True)


def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=1,
                  learning_rate=1e-3, logging_steps=1, save_strategy="no", disable_tqdm=True)
    values.update(overrides)
    return DPOConfig(**values)


def _batch(trainer, n=4, dataset=None):
    dataset = dataset if dataset is not None else trainer.train_dataset
    return trainer.data_collator([dataset[i] for i in range(n)])


def _last_metrics(trainer):
    bucket = trainer._metrics["train"] if any(trainer._metrics["train"].values()) else trainer._metrics["eval"]
    return {name: values[-1] for name, values in bucket.items() if values}


def _sequence_logps_float64(model, batch):
    """Summed completion log-probs per row from full logits in float64 (independent of the chunked path)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].double()
    return (logps * mask).sum(-1), mask.sum(-1), logps, logits


def _word_level_tokenizer(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
    words = sorted({w for text in texts for w in pre_tokenizers.Whitespace().pre_tokenize_str(text)
                    for w in [w[0]]})
    vocab = {token: i for i, token in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="[UNK]", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return tok


# ----------------------------------------------------------------------------- correctness


def test_policy_equal_to_reference_gives_log2_and_zero_rewards(tiny_model_dir, tmp_path):
    trainer = DPOTrainer(model=tiny_model_dir, args=_config(tmp_path), train_dataset=_preferences(8))
    assert trainer.reference.kind == "frozen_copy"
    loss = trainer.compute_loss(trainer.model, _batch(trainer))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    metrics = _last_metrics(trainer)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name] == pytest.approx(0.0, abs=1e-6), name


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(rpo_alpha=0.5),
        dict(loss_type=["sigmoid", "ipo"], loss_weights=[0.7, 0.3]),
        dict(loss_type=["hinge"], beta=0.5),
        dict(ld_alpha=0.5),
        dict(ld_alpha=0.5, rpo_alpha=0.5),
        dict(ld_alpha=0.5, loss_type=["sigmoid", "sft"]),
        dict(use_weighting=True),
    ],
    ids=["sigmoid", "rpo", "sigmoid+ipo", "hinge", "ld_alpha", "ld_alpha+rpo", "ld_alpha+sft", "wpo"],
)
def test_loss_equals_hand_computation_from_two_models(perturb, tiny_model_dir, tmp_path, options):
    policy = perturb(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=_config(tmp_path, **options),
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
                         train_dataset=_uneven_preferences(8) if "ld_alpha" in options else _preferences(8))
    batch = _batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch).item()

    sums, counts, token_logps, logits = _sequence_logps_float64(policy, batch)
    ref_sums, _, ref_token_logps, _ = _sequence_logps_float64(reference, batch)
    mask = batch["completion_mask"][:, 1:].double()
    plain_sums = sums  # a likelihood (sft, RPO) counts every token once, also under LD-DPO
    if "ld_alpha" in options:  # tokens past the shorter completion weigh ld_alpha
        position = torch.cumsum(mask, -1)
        shared = torch.minimum(counts[:4], counts[4:]).repeat(2)[:, None]
        weight = torch.where(position <= shared, 1.0, options["ld_alpha"]) * mask
        sums, ref_sums = (token_logps * weight).sum(-1), (ref_token_logps * weight).sum(-1)
    beta = options.get("beta", 0.1)
    chosen_ratio, rejected_ratio = sums[:4] - ref_sums[:4], sums[4:] - ref_sums[4:]
    delta = chosen_ratio - rejected_ratio
    sigmoid = -torch.nn.functional.logsigmoid(beta * delta)
    if options.get("use_weighting"):
        log_probs = torch.log_softmax(logits[:, :-1], -1)
        log_sum_sq = torch.logsumexp(2 * log_probs, -1)
        weights = torch.exp(((token_logps - log_sum_sq) * mask).sum(-1) / mask.sum(-1))
        sigmoid = sigmoid * weights[:4] * weights[4:]
    expected = sigmoid.mean()
    if options.get("loss_type") == ["hinge"]:
        expected = torch.relu(1 - beta * delta).mean()
    if "loss_weights" in options:
        ipo = ((chosen_ratio / counts[:4] - rejected_ratio / counts[4:]) - 1 / (2 * beta)) ** 2
        expected = 0.7 * sigmoid.mean() + 0.3 * ipo.mean()
    chosen_nll = -plain_sums[:4].sum() / counts[:4].sum()
    if "rpo_alpha" in options:
        expected = expected + 0.5 * chosen_nll
    if options.get("loss_type") == ["sigmoid", "sft"]:
        expected = sigmoid.mean() + chosen_nll
    assert loss == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    if "rpo_alpha" in options:  # the training path: the NLL normalised by the accumulated chosen tokens
        items = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
        accumulated = trainer.compute_loss(trainer.model, batch, num_items_in_batch=items).item()
        assert accumulated == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)

    metrics = _last_metrics(trainer)
    if "ld_alpha" not in options:
        assert metrics["logps/chosen"] == pytest.approx(sums[:4].mean().item(), rel=1e-5)
        assert metrics["logps/rejected"] == pytest.approx(sums[4:].mean().item(), rel=1e-5)
    assert metrics["rewards/chosen"] == pytest.approx((beta * chosen_ratio).mean().item(), rel=1e-4, abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx((beta * delta).mean().item(), rel=1e-4, abs=1e-6)
    assert metrics["rewards/accuracies"] == pytest.approx((delta > 0).double().mean().item())
    if "loss_weights" in options:
        assert metrics["loss/ipo"] == pytest.approx(ipo.mean().item(), rel=1e-4)


def _rendered_pair_side(tokenizer, prompt, completion):
    """(prompt ids, completion ids) from the rendered strings: the completion is everything the template
    renders for prompt + completion after the prompt with its generation prompt."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    assert whole.startswith(prompt_text)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(prompt_text), encode(whole[len(prompt_text):])


def _completion_logp_float64(model, prompt_ids, completion_ids):
    """Summed log-prob of the completion after the prompt: one unpadded row, full logits in float64."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    token_logps = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return token_logps[len(prompt_ids) - 1 :].sum()


@pytest.mark.parametrize("loss_type", [["sppo_hard"], ["apo_down"], ["sigmoid", "sft"]], ids="+".join)
def test_conversational_loss_matches_an_independent_computation(tiny_model_dir, tmp_path, loss_type):
    """Token boundaries as TRL takes them (the whole rendered turn, ChatML's newline after <|im_end|>
    included), with a reference that differs from the policy so the chosen and rejected log-ratios do
    not cancel."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    reference = AutoModelForCausalLM.from_config(policy.config)  # the same architecture, another seed
    data = _preferences(4)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=_config(tmp_path, loss_type=loss_type),
                         processing_class=tokenizer, train_dataset=data)
    loss = trainer.compute_loss(trainer.model, _batch(trainer)).item()

    beta = 0.1
    sums = {"policy": {"chosen": [], "rejected": []}, "ref": {"chosen": [], "rejected": []}}
    chosen_tokens = 0
    for row in data:
        for side in ("chosen", "rejected"):
            prompt_ids, completion_ids = _rendered_pair_side(tokenizer, row["prompt"], row[side])
            assert tokenizer.decode(completion_ids).endswith("<|im_end|>\n")
            chosen_tokens += len(completion_ids) if side == "chosen" else 0
            for name, model in (("policy", policy), ("ref", reference)):
                sums[name][side].append(_completion_logp_float64(model, prompt_ids, completion_ids))
    policy_chosen, policy_rejected = torch.stack(sums["policy"]["chosen"]), torch.stack(sums["policy"]["rejected"])
    chosen = policy_chosen - torch.stack(sums["ref"]["chosen"])
    rejected = policy_rejected - torch.stack(sums["ref"]["rejected"])
    if loss_type == ["sppo_hard"]:
        expected = ((chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2).mean()
    elif loss_type == ["apo_down"]:
        expected = (torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * (chosen - rejected))).mean()
    else:
        nll = -policy_chosen.sum() / chosen_tokens
        expected = -torch.nn.functional.logsigmoid(beta * (chosen - rejected)).mean() + nll
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_gradient_accumulation_matches_one_large_batch(perturb, tiny_model_dir, tmp_path):
    data = _preferences(4)
    params = {}
    for name, batch_size, accumulation in (("large", 4, 1), ("accumulated", 1, 4)):
        args = _config(tmp_path / name, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                       max_steps=1, optim="sgd", learning_rate=1.0, weight_decay=0.0, max_grad_norm=0.0,
                       lr_scheduler_type="constant", loss_type=["sigmoid", "ipo"], rpo_alpha=1.0)
        trainer = DPOTrainer(model=perturb(AutoModelForCausalLM.from_pretrained(tiny_model_dir)),
                             ref_model=tiny_model_dir, args=args, train_dataset=data)
        start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        params[name] = {n: p.detach() - start[n] for n, p in trainer.model.named_parameters()}
    total = sum(update.abs().sum() for update in params["large"].values())
    assert total > 0
    for name, update in params["large"].items():
        torch.testing.assert_close(params["accumulated"][name], update, rtol=1e-4, atol=1e-6)


def test_padding_free_gives_the_padded_loss(perturb, tiny_model_dir, tmp_path):
    policy = perturb(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    losses = {}
    for padding_free in (False, True):
        trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=tiny_model_dir,
                             args=_config(tmp_path, padding_free=padding_free, rpo_alpha=1.0), train_dataset=_preferences(8))
        batch = _batch(trainer)
        assert ("attention_mask" in batch) != padding_free
        # packed rows: the policy and the reference attend per sequence (no (tokens x tokens) mask)
        expected = "posttrain_packed_sdpa" if padding_free else "sdpa"
        assert [m.config._attn_implementation for m in (trainer.model, trainer.ref_model)] == [expected] * 2
        losses[padding_free] = trainer.compute_loss(trainer.model, batch).item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


# ----------------------------------------------------------------------------- reference strategies


def test_ref_model_path_is_loaded_frozen(tiny_model_dir, tmp_path):
    trainer = DPOTrainer(model=tiny_model_dir, ref_model=tiny_model_dir, args=_config(tmp_path),
                         train_dataset=_preferences(4))
    assert trainer.reference.kind == "model"
    assert trainer.reference.model is not trainer.model
    assert not any(p.requires_grad for p in trainer.reference.model.parameters())


def test_same_object_as_model_and_reference_is_refused(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match="ref_model"):
        DPOTrainer(model=model, ref_model=model, args=_config(tmp_path),
                   processing_class=AutoTokenizer.from_pretrained(tiny_model_dir), train_dataset=_preferences(2))


def test_new_lora_adapter_uses_base_model_as_reference(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    original = copy.deepcopy(base)
    trainer = DPOTrainer(model=base, args=_config(tmp_path, max_steps=2, learning_rate=1e-2),
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir), train_dataset=_preferences(8),
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert trainer.reference.kind == "adapters_disabled" and trainer.reference.model is None
    batch = _batch(trainer)
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(math.log(2), abs=1e-6)
    trainer.train()
    reference = trainer.reference.token_logps(trainer.model, batch["input_ids"], batch["completion_mask"],
                                              batch["attention_mask"])
    expected, _, _, _ = _sequence_logps_float64(original, batch)
    torch.testing.assert_close(reference.sequence_sums().double(), expected, rtol=1e-5, atol=1e-5)
    policy_now = trainer.compute_loss(trainer.model, batch).item()
    assert policy_now != pytest.approx(math.log(2), abs=1e-4)  # the adapter moved, the reference did not


def test_existing_adapter_keeps_a_frozen_copy_of_itself_as_reference(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # an adapter that already changed the model (e.g. after SFT)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    trainer = DPOTrainer(model=model, args=_config(tmp_path), train_dataset=_preferences(8),
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    assert trainer.reference.kind == "reference_adapter"
    assert trainer.compute_loss(trainer.model, _batch(trainer)).item() == pytest.approx(math.log(2), abs=1e-6)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)


@pytest.mark.parametrize("explicit_reference", [False, True])
def test_precomputed_reference_log_probs(perturb, tiny_model_dir, tmp_path, explicit_reference):
    policy = perturb(AutoModelForCausalLM.from_pretrained(tiny_model_dir)) if explicit_reference else tiny_model_dir
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    snapshot = copy.deepcopy(reference)
    trainer = DPOTrainer(model=policy, ref_model=reference if explicit_reference else None,
                         args=_config(tmp_path, precompute_ref_log_probs=True, precompute_ref_batch_size=3),
                         train_dataset=_preferences(8), eval_dataset=_preferences(4),
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    assert trainer.reference.model is None  # nothing kept in memory for the reference
    for dataset in (trainer.train_dataset, trainer.eval_dataset):
        batch = trainer.data_collator([dataset[i] for i in range(4)])
        expected, _, _, _ = _sequence_logps_float64(snapshot, batch)
        torch.testing.assert_close(batch["ref_chosen_logps"].double(), expected[:4], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(batch["ref_rejected_logps"].double(), expected[4:], rtol=1e-5, atol=1e-4)
    if not explicit_reference:
        assert trainer.compute_loss(trainer.model, _batch(trainer)).item() == pytest.approx(math.log(2), abs=1e-6)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and "eval_rewards/accuracies" in metrics
    if explicit_reference:  # released after the pass: new data cannot be scored
        with pytest.raises(ConfigError, match="precompute"):
            trainer.evaluate(_preferences(4, conversational=False))
    else:  # the policy is still its own reference before its first update
        assert trainer.evaluate(_preferences(4, conversational=False))["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_tr_dpo_sync_mixes_policy_into_reference(tiny_model_dir, tmp_path):
    policy = torch.nn.Linear(2, 1, bias=False)
    reference = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        policy.weight.copy_(torch.tensor([[1.0, 2.0]]))
        reference.weight.copy_(torch.tensor([[3.0, -1.0]]))
    mix_into_reference(policy, reference, alpha=0.25)
    torch.testing.assert_close(reference.weight, torch.tensor([[2.5, -0.25]]))  # 0.25 * p + 0.75 * ref

    args = dict(sync_ref_model=True, ref_model_mixup_alpha=1.0, ref_model_sync_steps=1, max_steps=1,
                loss_type=["sigmoid", "bco_pair"], save_strategy="steps", save_steps=1)
    trainer = DPOTrainer(model=tiny_model_dir, args=_config(tmp_path, **args), train_dataset=_preferences(4))
    assert any(isinstance(cb, ReferenceSyncCallback) for cb in trainer.callback_handler.callbacks)
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()  # the hard update after step 1 copies the policy into the reference
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), initial))
    for (name, p), r in zip(trainer.model.named_parameters(), trainer.reference.model.parameters()):
        torch.testing.assert_close(p.detach(), r, msg=name)

    # a resumed run gets back the moved reference and the bco_pair reward shift
    resumed = DPOTrainer(model=tiny_model_dir, args=_config(tmp_path, **args), train_dataset=_preferences(4))
    resumed._load_rng_state(str(tmp_path / "out" / "checkpoint-1"))
    assert resumed.bco_running_mean.state_dict() == trainer.bco_running_mean.state_dict()
    assert resumed.bco_running_mean.count == 1
    for r, q in zip(trainer.reference.model.parameters(), resumed.reference.model.parameters()):
        torch.testing.assert_close(r, q)


def test_sync_needs_a_separate_reference(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    with pytest.raises(ConfigError, match="sync_ref_model"):
        DPOTrainer(model=tiny_model_dir, args=_config(tmp_path, sync_ref_model=True), train_dataset=_preferences(4),
                   peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    with pytest.raises(ConfigError, match="sync_ref_model"):
        _config(tmp_path, sync_ref_model=True, precompute_ref_log_probs=True)


# ----------------------------------------------------------------------------- the calls users write


def test_issue_example_with_word_level_tokenizer_and_json_file(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {b} ?"}],
             "chosen": [{"role": "assistant", "content": str(a + b)}],
             "rejected": [{"role": "assistant", "content": str(a + b + 1)}]} for a in range(3) for b in range(3)]
    with open("preferences.json", "w") as handle:
        json.dump(rows, handle)
    texts = [m["content"] for r in rows for k in ("prompt", "chosen", "rejected") for m in r[k]] + ["user assistant"]
    tok = _word_level_tokenizer(texts)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=64, pad_token_id=tok.pad_token_id))
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(output_dir=str(tmp_path / "dpo"), beta=0.1, per_device_train_batch_size=4, num_train_epochs=1,
                       learning_rate=5e-7, max_prompt_length=512, max_length=1024, logging_steps=10, disable_tqdm=True,
                       save_strategy="no"),
        train_dataset=load_dataset("json", data_files="preferences.json", split="train"),
        processing_class=tok,
    )
    row = trainer.train_dataset[0]
    assert tok.decode(row["chosen_input_ids"]).split() == ["0", "<|im_end|>"]
    assert tok.unk_token_id not in row["prompt_input_ids"] + row["chosen_input_ids"]
    result = trainer.train()
    assert trainer.state.global_step == 3 and math.isfinite(result.training_loss)


@pytest.mark.parametrize(
    "values",
    [dict(beta=0.5), dict(beta=0.01), dict(per_device_train_batch_size=1, max_length=512, gradient_accumulation_steps=8),
     dict(loss_type=["sigmoid", "ipo"], loss_weights=[0.7, 0.3]), dict(max_completion_length=64, rpo_alpha=1.0)],
)
def test_configs_from_the_issue(values):
    config = DPOConfig(**values)
    assert config.bf16 is False or torch.cuda.is_available()
    for name, value in values.items():
        assert getattr(config, name) == value


def test_config_errors():
    with pytest.raises(ConfigError, match="loss_type"):
        DPOConfig(loss_type=["sigmoidd"])
    with pytest.raises(ConfigError, match="loss_weights"):
        DPOConfig(loss_type=["sigmoid", "ipo"], loss_weights=[1.0])
    with pytest.raises(ConfigError, match="truncation_mode"):
        DPOConfig(truncation_mode="middle")
    assert DPOConfig(loss_type="sigmoid,aot_pair").loss_type == ["sigmoid", "aot_unpaired"]


def test_model_path_without_args(tiny_model_dir):
    trainer = DPOTrainer(model=tiny_model_dir, train_dataset=_preferences(4))
    assert trainer.args.output_dir.endswith("-DPO")
    assert trainer.args.bf16 is False or torch.cuda.is_available()
    assert trainer.processing_class is not None


def test_bad_rows_raise_data_errors(tiny_model_dir, tmp_path):
    with pytest.raises(DataError, match="rejected"):
        DPOTrainer(model=tiny_model_dir, args=_config(tmp_path),
                   train_dataset=Dataset.from_list([{"prompt": "1+1=", "chosen": " 2"}]))
    with pytest.raises(DataError, match="row 1"):
        DPOTrainer(model=tiny_model_dir, args=_config(tmp_path), train_dataset=Dataset.from_list(
            [{"prompt": "1+1=", "chosen": " 2", "rejected": " 3"}, {"prompt": "2+2=", "chosen": " 4", "rejected": None}]))


def test_training_logs_metrics_and_evaluates(tiny_model_dir, tmp_path):
    trainer = DPOTrainer(model=tiny_model_dir,
                         args=_config(tmp_path, loss_type=["sigmoid", "bco_pair"], loss_weights=[1.0, 0.5], max_steps=2,
                                      eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4),
                         train_dataset=_preferences(8), eval_dataset=_preferences(4, conversational=False))
    trainer.train()
    logged = trainer.state.log_history[0]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "loss/sigmoid", "loss/bco_pair", "num_tokens"):
        assert key in logged, key
    assert logged["loss"] == pytest.approx(logged["loss/sigmoid"] + 0.5 * logged["loss/bco_pair"], rel=1e-4)
    evaluated = next(h for h in trainer.state.log_history if "eval_loss" in h)
    assert "eval_rewards/accuracies" in evaluated and "eval_loss/bco_pair" in evaluated
    assert trainer.bco_running_mean.count == 2  # evaluation did not move the bco_pair reward shift


@pytest.mark.slow
def test_a_few_dozen_steps_learn_the_arithmetic_preferences(tiny_model_dir, tmp_path):
    data = _preferences(32)
    trainer = DPOTrainer(model=tiny_model_dir, args=_config(tmp_path, max_steps=40, learning_rate=1e-3, logging_steps=10,
                                                           lr_scheduler_type="constant", per_device_train_batch_size=8),
                         train_dataset=data, eval_dataset=data)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert after["eval_loss"] < before["eval_loss"] - 0.1
    assert after["eval_rewards/accuracies"] >= 0.75 and after["eval_rewards/margins"] > 0.2


# ----------------------------------------------------------------------------- two processes


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _GatherOverProcesses:
    """The one accelerator call the token count makes, over the real gloo group."""

    @staticmethod
    def gather(tensor):
        import torch.distributed as dist

        parts = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)


# bco_pair rewards of two steps; process 0 holds the first 1 and 2 values of them, process 1 the rest
_BCO_REWARDS = [([0.5, -1.0, 2.0, 4.5], 1), ([1.0, 3.0, -2.0, 0.0, 6.0, 1.5], 2)]


def _two_process_worker(rank, port, out):
    import os
    from types import SimpleNamespace

    import torch.distributed as dist

    from posttrain.losses.preference import RunningMean

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # RPO: 2 pairs per process; the chosen rows hold 3 + 2 target tokens on process 0, 4 + 4 on process 1
    chosen_targets = [[3, 2], [4, 4]][rank]
    mask = torch.zeros(4, 8, dtype=torch.long)
    for row, n in enumerate(chosen_targets + [1, 1]):
        mask[row, 1 : 1 + n] = 1
    batch = {"input_ids": torch.ones(4, 8, dtype=torch.long), "completion_mask": mask}
    counts = {}
    for across in (False, True):
        trainer = DPOTrainer.__new__(DPOTrainer)
        trainer.args = SimpleNamespace(rpo_alpha=1.0, average_tokens_across_devices=across, world_size=2)
        trainer.accelerator = _GatherOverProcesses()
        trainer._get_num_items_in_batch([batch], torch.device("cpu"))
        counts[across] = trainer._accumulated_chosen_tokens.item()
    # bco_pair's running mean
    running = RunningMean()
    for rewards, split in _BCO_REWARDS:
        running.update(torch.tensor(rewards[:split] if rank == 0 else rewards[split:]))
    torch.save({"counts": counts, "running": running.state_dict()}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow  # two processes importing transformers: 20 s to a minute on a busy machine
def test_statistics_over_two_processes(tmp_path):
    """RPO's chosen-token count is global only with average_tokens_across_devices (otherwise each process
    averages its own NLL and DDP averages the processes, as for the pair loss: a global count there made
    the term world_size times too small); bco_pair's running mean is that of one process holding it all."""
    import torch.multiprocessing as mp

    from posttrain.losses.preference import RunningMean

    out = str(tmp_path / "stats")
    mp.spawn(_two_process_worker, args=(_free_port(), out), nprocs=2, join=True)
    first, second = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert (first["counts"][False], second["counts"][False]) == (5, 8)
    assert first["counts"][True] == second["counts"][True] == 13

    single = RunningMean()
    for rewards, _ in _BCO_REWARDS:
        single.update(torch.tensor(rewards))
    assert single.mean == pytest.approx(sum(sum(r) / len(r) for r, _ in _BCO_REWARDS) / 2, abs=1e-12)
    for state in (first["running"], second["running"]):
        assert state["count"] == single.count == 2
        assert state["total"] == pytest.approx(single.total, abs=1e-12)
