"""Config fields of TRL 1.16 that a script passes, each implemented (or refused with a reason), never ignored.

Every test is the shape of a user's script: build the config with the field, build the trainer.
"""

import json
import logging

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

from posttrain import ConfigError, DataError, DPOConfig, DPOTrainer, RewardConfig, SFTConfig, SFTTrainer
from posttrain.trainers.rloo import RLOOConfig


def _messages(n=8):
    return Dataset.from_list([
        {"messages": [{"role": "user", "content": f"What is {i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
        for i in range(n)
    ])


def _texts(n=8):
    return Dataset.from_list([{"text": f"row {i} " + "one two three four five six seven " * (1 + i % 3)} for i in range(n)])


def _preferences(n=4):
    return Dataset.from_list([{"prompt": f"Q{i}: what is {i}+1?", "chosen": f" {i + 1}", "rejected": f" {i + 7}"}
                              for i in range(n)])


def _sft_args(tmp_path, **fields):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, logging_steps=1,
                  save_strategy="no", disable_tqdm=True)
    values.update(fields)
    return SFTConfig(**values)


def _dense_target_logps(model, batch):
    """log p of every target token from the model's own full logits (not the chunked path)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = (batch["completion_mask"][:, 1:] * batch["attention_mask"][:, 1:]).bool()
    return logps[mask]


# ----------------------------------------------------------------------------- SFT loss_type


def test_sft_loss_type_dft_matches_the_formula_on_the_models_logits(tiny_model_dir, tmp_path):
    trainer = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, loss_type="dft"), train_dataset=_messages())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    logps = _dense_target_logps(trainer.model, batch)
    expected = -(logps.exp() * logps).mean()
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch)
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)
    assert got.item() != pytest.approx(-logps.mean().item(), rel=1e-2)  # not the NLL


def test_sft_dft_micro_batches_add_up_to_the_whole_batch(tiny_model_dir, tmp_path):
    trainer = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, loss_type="dft"), train_dataset=_messages())
    rows = [trainer.train_dataset[i] for i in range(4)]
    whole = trainer.data_collator(rows)
    parts = [trainer.data_collator(rows[:2]), trainer.data_collator(rows[2:])]
    total = sum(trainer.count_loss_items(part) for part in parts)
    with torch.no_grad():
        accumulated = sum(trainer.compute_loss(trainer.model, part, num_items_in_batch=total) for part in parts)
        torch.testing.assert_close(accumulated, trainer.compute_loss(trainer.model, whole), rtol=1e-5, atol=1e-6)


def test_sft_loss_type_chunked_nll_is_the_nll(tiny_model_dir, tmp_path):
    trainer = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, loss_type="chunked_nll"), train_dataset=_messages())
    assert trainer.args.loss_type == "nll"
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch)
    assert got.item() == pytest.approx(-_dense_target_logps(trainer.model, batch).mean().item(), rel=1e-4)
    with pytest.raises(ConfigError, match="loss_type"):
        _sft_args(tmp_path, loss_type="focal")


# ----------------------------------------------------------------------------- SFT data fields


def test_sft_dataset_kwargs_skip_prepare_dataset(tiny_model_dir, tiny_tokenizer, tmp_path):
    ids = [tiny_tokenizer("hello there")["input_ids"] + [tiny_tokenizer.eos_token_id]] * 4
    tokenized = Dataset.from_dict({"input_ids": ids, "text": ["ignored"] * 4})
    for kwargs in ({"skip_prepare_dataset": True}, json.dumps({"skip_prepare_dataset": True})):
        args = _sft_args(tmp_path, dataset_kwargs=kwargs)
        assert args.skip_prepare_dataset is True
        trainer = SFTTrainer(model=tiny_model_dir, args=args, train_dataset=tokenized)
        assert trainer.train_dataset[0]["input_ids"] == ids[0]
    with pytest.raises(ConfigError, match="dataset_kwargs"):
        _sft_args(tmp_path, dataset_kwargs={"add_special_tokens": False})


def test_sft_eval_packing_packs_only_the_split_asked(tiny_model_dir, tmp_path):
    data = _texts(12)
    trainer = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, max_length=64, eval_packing=True),
                         train_dataset=data, eval_dataset=data)
    assert len(trainer.train_dataset) == 12 and len(trainer.eval_dataset) < 12
    trainer = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, max_length=64, packing=True, eval_packing=False),
                         train_dataset=data, eval_dataset=data)
    assert len(trainer.train_dataset) < 12 and len(trainer.eval_dataset) == 12
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))


def test_sft_truncation_mode_keep_end_keeps_the_last_tokens(tiny_model_dir, tiny_tokenizer, tmp_path):
    data = _texts(4)
    full = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, max_length=None), train_dataset=data)
    start = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, max_length=6), train_dataset=data)
    end = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, max_length=6, truncation_mode="keep_end"),
                     train_dataset=data)
    for i in range(4):
        ids = full.train_dataset[i]["input_ids"]
        assert start.train_dataset[i]["input_ids"] == ids[:6]
        assert end.train_dataset[i]["input_ids"] == ids[-6:]
    with pytest.raises(ConfigError, match="truncation_mode"):
        _sft_args(tmp_path, truncation_mode="middle")


def test_sft_shuffle_dataset_permutes_rows_with_the_seed(tiny_model_dir, tmp_path):
    data = _texts(16)
    plain = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path), train_dataset=data).train_dataset["input_ids"]
    shuffled = [SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, shuffle_dataset=True, seed=seed),
                           train_dataset=data).train_dataset["input_ids"] for seed in (3, 3, 4)]
    assert shuffled[0] != plain and sorted(map(tuple, shuffled[0])) == sorted(map(tuple, plain))
    assert shuffled[0] == shuffled[1] and shuffled[0] != shuffled[2]


def test_sft_padding_free_without_packing_needs_no_max_length(tmp_path):
    with pytest.raises(ConfigError, match="padding_free"):
        _sft_args(tmp_path, padding_free=True)
    assert _sft_args(tmp_path, padding_free=True, max_length=None).padding_free
    assert _sft_args(tmp_path, padding_free=True, packing=True).packing


@pytest.mark.parametrize("config_class", [SFTConfig, DPOConfig, RewardConfig])
def test_pad_to_multiple_of_accepts_trl_spellings(config_class, tmp_path):
    def make(value):
        return config_class(output_dir=str(tmp_path), pad_to_multiple_of=value).pad_to_multiple_of

    assert make("auto") is None and make("none") is None and make("8") == 8 and make(16) == 16
    with pytest.raises(ConfigError, match="pad_to_multiple_of"):
        make("eight")


def test_rloo_pad_to_multiple_of_pads_micro_batches_and_keeps_the_loss(tiny_model_dir, tmp_path):
    from posttrain import RLOOTrainer
    from posttrain.data.collate import pad_rollout_to_multiple
    from posttrain.rollout.sequences import RolloutSequences

    assert RLOOConfig(output_dir=str(tmp_path), pad_to_multiple_of="auto").pad_to_multiple_of is None
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}]} for i in range(4)])
    args = RLOOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=5, disable_tqdm=True, save_strategy="no", beta=0.1, pad_to_multiple_of=8)
    trainer = RLOOTrainer(tiny_model_dir, reward_funcs=lambda completions, **kw: [float(len(c[0]["content"])) for c in completions],
                          args=args, train_dataset=prompts)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    rows = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert rows.prompt_ids.shape[1] % 8 == 0 and rows.completion_ids.shape[1] % 8 == 0
    assert rows.old_logps.shape == rows.completion_mask.shape
    # the same rows widened further: masked positions change no loss
    wider = RolloutSequences.from_dict(pad_rollout_to_multiple(rows.as_dict(), 24, trainer.processing_class.pad_token_id))
    assert wider.completion_ids.shape[1] == 24
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(trainer.model, wider), trainer.compute_loss(trainer.model, rows))


# ----------------------------------------------------------------------------- tokenizer and loading fields


def test_pad_token_sets_the_tokenizers_pad_token(tiny_model_dir, tmp_path):
    trainer = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, pad_token="<|im_start|>"), train_dataset=_messages())
    assert trainer.processing_class.pad_token == "<|im_start|>"
    assert trainer.data_collator.pad_token_id == trainer.processing_class.convert_tokens_to_ids("<|im_start|>")
    with pytest.raises(ConfigError, match="pad_token"):
        SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, pad_token="<not-a-token>"), train_dataset=_messages())


def test_chat_template_path_from_a_jinja_file_and_a_tokenizer_dir(tiny_model_dir, tmp_path):
    template = ("{% for m in messages %}{{ m['role'] }}>> {{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}assistant>> {% endif %}")
    path = tmp_path / "template.jinja"
    path.write_text(template)
    trainer = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, chat_template_path=str(path)),
                         train_dataset=_messages())
    assert trainer.processing_class.chat_template == template
    assert "user>> What is 0+1?" in trainer.processing_class.decode(trainer.train_dataset[0]["input_ids"])

    tokenizer_dir = tmp_path / "tok"
    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    other.chat_template = template.replace(">>", "::")
    other.save_pretrained(tokenizer_dir)
    trainer = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, chat_template_path=str(tokenizer_dir)),
                         train_dataset=_messages())
    assert "user:: What is 0+1?" in trainer.processing_class.decode(trainer.train_dataset[0]["input_ids"])
    with pytest.raises(ConfigError, match="chat_template_path"):
        SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, chat_template_path=str(tmp_path / "missing")),
                   train_dataset=_messages())


def test_trust_remote_code_reaches_model_and_tokenizer_loading(tiny_model_dir, tmp_path, monkeypatch):
    seen = []
    for auto_class in (AutoModelForCausalLM, AutoTokenizer):
        original = auto_class.from_pretrained.__func__

        def recording(cls, *args, _original=original, _name=auto_class.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _original(cls, *args, **kwargs)

        monkeypatch.setattr(auto_class, "from_pretrained", classmethod(recording))
    SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, trust_remote_code=True), train_dataset=_messages())
    assert ("AutoModelForCausalLM", True) in seen and ("AutoTokenizer", True) in seen


def test_reward_eos_token_and_pad_token(tiny_model_dir, tmp_path):
    from posttrain import RewardTrainer

    config = RewardConfig(output_dir=str(tmp_path), eos_token="<|endoftext|>", pad_token="<|im_start|>")
    trainer = RewardTrainer(model=tiny_model_dir, args=config, train_dataset=_preferences())
    tokenizer = trainer.processing_class
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|im_start|>"
    assert trainer.train_dataset[0]["chosen_input_ids"][-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")


@pytest.mark.parametrize("config_class", [SFTConfig, DPOConfig, RewardConfig, RLOOConfig])
def test_activation_offloading_is_accepted_and_tile_sizes_checked(config_class, tmp_path):
    assert config_class(output_dir=str(tmp_path), activation_offloading=True).activation_offloading is True
    with pytest.raises(ConfigError, match="sequence_tile_size"):
        config_class(output_dir=str(tmp_path), tiled_mlp=True, sequence_tile_size=0)


# ----------------------------------------------------------------------------- router_aux_loss_coef (MoE)


def _tiny_moe(tiny_tokenizer):
    config = MixtralConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                           pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def test_sft_router_aux_loss_is_added_with_its_coefficient(tiny_tokenizer, tmp_path):
    model = _tiny_moe(tiny_tokenizer)
    losses = {}
    for coef in (0.0, 0.5):
        trainer = SFTTrainer(model=model, args=_sft_args(tmp_path, router_aux_loss_coef=coef),
                             processing_class=tiny_tokenizer, train_dataset=_messages())
        assert model.config.output_router_logits is (coef != 0)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        with torch.no_grad():
            losses[coef] = trainer.compute_loss(model, batch).item()
    with torch.no_grad():
        aux = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_router_logits=True).aux_loss.item()
    assert aux > 0
    assert losses[0.5] - losses[0.0] == pytest.approx(0.5 * aux, rel=1e-4)
    # unset: the model config's own coefficient, as TRL does
    default = SFTTrainer(model=model, args=_sft_args(tmp_path), processing_class=tiny_tokenizer, train_dataset=_messages())
    assert model.config.router_aux_loss_coef == 0.5 and default.aux_loss_enabled


def test_router_aux_loss_coef_on_a_dense_model_is_an_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="router_aux_loss_coef"):
        SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, router_aux_loss_coef=0.1), train_dataset=_messages())
    trainer = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path), train_dataset=_messages())
    assert not trainer.aux_loss_enabled


def test_dpo_router_aux_loss_is_added_for_the_policy(tiny_tokenizer, tmp_path):
    model = _tiny_moe(tiny_tokenizer)
    losses, batch = {}, None
    for coef in (0.0, 0.5):
        args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, router_aux_loss_coef=coef,
                         disable_tqdm=True, save_strategy="no")
        trainer = DPOTrainer(model=model, args=args, processing_class=tiny_tokenizer, train_dataset=_preferences())
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        with torch.no_grad():
            losses[coef] = trainer.compute_loss(model, batch).item()
    with torch.no_grad():
        aux = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_router_logits=True).aux_loss.item()
    assert losses[0.5] - losses[0.0] == pytest.approx(0.5 * aux, rel=1e-3)


# ----------------------------------------------------------------------------- DPO: completions truncated away


def test_dpo_drops_rows_with_an_empty_completion_and_says_how_many(tiny_model_dir, tiny_tokenizer, tmp_path, caplog):
    rows = {"prompt_input_ids": [[5, 6], [5, 7], [5, 8]], "chosen_input_ids": [[9], [], [10]],
            "rejected_input_ids": [[11], [12], [13]]}
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, disable_tqdm=True, save_strategy="no")
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        trainer = DPOTrainer(model=tiny_model_dir, args=args, processing_class=tiny_tokenizer,
                             train_dataset=Dataset.from_dict(rows))
    assert trainer.train_dataset["chosen_input_ids"] == [[9], [10]]
    assert sum("dropped 1 of 3 rows" in record.getMessage() for record in caplog.records) == 1
    with pytest.raises(DataError, match="empty"):
        DPOTrainer(model=tiny_model_dir, args=DPOConfig(output_dir=str(tmp_path), max_length=1),
                   processing_class=tiny_tokenizer, train_dataset=_preferences())


# ----------------------------------------------------------------------------- streaming (IterableDataset)


def test_sft_trains_on_a_streaming_dataset(tiny_model_dir, tmp_path):
    stream = _messages(12).to_iterable_dataset()
    trainer = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, max_steps=2), train_dataset=stream)
    first = next(iter(trainer.train_dataset))
    eager = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path), train_dataset=_messages(12)).train_dataset[0]
    assert first["input_ids"] == eager["input_ids"] and first["completion_mask"] == eager["completion_mask"]
    result = trainer.train()
    assert trainer.state.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


def test_sft_packs_a_streaming_dataset_on_the_fly(tiny_model_dir, tmp_path):
    data = _texts(12)
    eager = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, packing=True, max_length=64), train_dataset=data)
    stream = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, packing=True, max_length=64, max_steps=1),
                        train_dataset=data.to_iterable_dataset())
    # one buffer holds the whole stream here, so the packs are the eager ones
    assert [row["input_ids"] for row in stream.train_dataset] == eager.train_dataset["input_ids"]
    assert torch.isfinite(torch.tensor(stream.train().training_loss))


def test_sft_streaming_without_max_steps_is_a_config_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="max_steps"):
        SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, max_steps=-1),
                   train_dataset=_messages().to_iterable_dataset())


def test_sft_streaming_rows_are_checked_before_training(tiny_model_dir, tmp_path):
    def rows():
        yield {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
        yield {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "yo"}]}

    from datasets import IterableDataset

    with pytest.raises(DataError, match="row 1.*unknown role"):
        SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path), train_dataset=IterableDataset.from_generator(rows))


def test_sft_packing_strategy_bfd_split_and_its_older_name(tiny_model_dir, tmp_path):
    assert _sft_args(tmp_path, packing=True, packing_strategy="bfd-requeue").packing_strategy == "bfd_split"
    data = _texts(6)
    split = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, packing=True, max_length=8,
                                                            packing_strategy="bfd_split"), train_dataset=data)
    full = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path, max_length=None), train_dataset=data)
    assert sum(map(len, split.train_dataset["input_ids"])) == sum(map(len, full.train_dataset["input_ids"]))
