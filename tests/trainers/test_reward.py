"""RewardTrainer on the tiny model: the Bradley-Terry loss against hand computations, the length
policy, data shapes, metrics, and a saved model that transformers' pipeline loads."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from posttrain import ConfigError, DataError, RewardConfig, RewardTrainer


def _preferences(n=8, conversational=True):
    from posttrain.tasks import get_task

    return get_task("arithmetic").as_preference(n, conversational=conversational)


def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=1,
                  learning_rate=1e-3, logging_steps=1, save_strategy="no", disable_tqdm=True)
    values.update(overrides)
    return RewardConfig(**values)


def _row_rewards(model, rows):
    """Score every chosen and rejected sequence alone (no padding), in float64."""
    chosen, rejected = [], []
    with torch.no_grad():
        for row in rows:
            for side, out in (("chosen_input_ids", chosen), ("rejected_input_ids", rejected)):
                ids = torch.tensor([row["prompt_input_ids"] + row[side]])
                out.append(model(input_ids=ids).logits[0, 0].double())
    return torch.stack(chosen), torch.stack(rejected)


def _last_metrics(trainer):
    bucket = trainer._metrics["train"] if any(trainer._metrics["train"].values()) else trainer._metrics["eval"]
    return {name: values[-1] for name, values in bucket.items() if values}


def test_model_path_gets_one_score_and_the_pad_token(tiny_model_dir):
    trainer = RewardTrainer(model=tiny_model_dir, train_dataset=_preferences(4))
    assert trainer.args.output_dir.endswith("-Reward")
    assert trainer.model.config.num_labels == 1
    assert trainer.model.config.pad_token_id == trainer.processing_class.pad_token_id is not None


def test_model_with_several_labels_is_refused(tiny_model_dir, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    with pytest.raises(ConfigError, match="num_labels=1"):
        RewardTrainer(model=model, args=_config(tmp_path), processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
                      train_dataset=_preferences(2))


@pytest.mark.parametrize("center", [None, 0.01])
def test_loss_equals_bradley_terry_by_hand(tiny_model_dir, tmp_path, center):
    data = _preferences(4).add_column("margin", [0.0, 0.5, -1.0, 2.0])
    trainer = RewardTrainer(model=tiny_model_dir, args=_config(tmp_path, center_rewards_coefficient=center),
                            train_dataset=data)
    rows = [trainer.train_dataset[i] for i in range(4)]
    with torch.no_grad():  # a score head away from zero, so the rewards differ visibly
        trainer.model.score.weight.normal_(0, 1.0)
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows)).item()

    chosen, rejected = _row_rewards(trainer.model, rows)
    margin = torch.tensor([0.0, 0.5, -1.0, 2.0], dtype=torch.float64)
    expected = -torch.nn.functional.logsigmoid(chosen - rejected - margin).mean()
    if center:
        expected = expected + center * ((chosen + rejected) ** 2).mean()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    metrics = _last_metrics(trainer)
    assert metrics["accuracy"] == pytest.approx((chosen > rejected).double().mean().item())
    assert metrics["margin"] == pytest.approx((chosen - rejected).mean().item(), rel=1e-5, abs=1e-6)
    everything = torch.cat([chosen, rejected])
    assert metrics["mean_reward"] == pytest.approx(everything.mean().item(), rel=1e-5, abs=1e-6)
    assert metrics["std_reward"] == pytest.approx(everything.std(unbiased=False).item(), rel=1e-4)


def test_overlong_policies(tiny_model_dir, tmp_path):
    long_text = " ".join(["seven"] * 60)
    data = Dataset.from_list([
        {"prompt": "1+1=", "chosen": " 2", "rejected": " 3"},
        {"prompt": "Question: " + long_text, "chosen": " yes", "rejected": " no"},
        {"prompt": "2+2=", "chosen": " 4", "rejected": " 5"},
    ])
    dropped = RewardTrainer(model=tiny_model_dir, args=_config(tmp_path, max_length=20), train_dataset=data)
    assert len(dropped.train_dataset) == 2
    with pytest.raises(DataError, match="row 1") as error:
        RewardTrainer(model=tiny_model_dir, args=_config(tmp_path, max_length=20, overlong_policy="error"),
                      train_dataset=data)
    assert "max_length" in str(error.value)
    cut = RewardTrainer(model=tiny_model_dir, args=_config(tmp_path, max_length=20, overlong_policy="truncate"),
                        train_dataset=data)
    assert len(cut.train_dataset) == 3
    for row in cut.train_dataset:
        assert len(row["prompt_input_ids"]) + max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"])) <= 20
    with pytest.raises(DataError, match="every pair"):
        RewardTrainer(model=tiny_model_dir, args=_config(tmp_path, max_length=3), train_dataset=data)
    with pytest.raises(ConfigError, match="overlong_policy"):
        _config(tmp_path, overlong_policy="shorten")


def test_implicit_prompt_conversations(tiny_model_dir, tmp_path):
    explicit = _preferences(4)
    implicit = Dataset.from_list([{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                                  for r in explicit])
    a = RewardTrainer(model=tiny_model_dir, args=_config(tmp_path), train_dataset=explicit)
    b = RewardTrainer(model=tiny_model_dir, args=_config(tmp_path), train_dataset=implicit)
    for i in range(4):
        assert a.train_dataset[i] == b.train_dataset[i]
    tok = a.processing_class
    row = b.train_dataset[0]
    assert tok.decode(row["prompt_input_ids"]).endswith("<|im_start|>assistant\n")
    # the whole rendered turn, the template's newline included: the score is read where TRL reads it
    assert tok.decode(row["chosen_input_ids"]) == explicit[0]["chosen"][0]["content"] + "<|im_end|>\n"


def test_missing_column_is_a_data_error(tiny_model_dir, tmp_path):
    with pytest.raises(DataError, match="rejected"):
        RewardTrainer(model=tiny_model_dir, args=_config(tmp_path),
                      train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b"}]))


def test_train_evaluate_save_and_score_with_pipeline(tiny_model_dir, tmp_path):
    from transformers import pipeline

    trainer = RewardTrainer(model=tiny_model_dir, args=_config(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2),
                            train_dataset=_preferences(8, conversational=False),
                            eval_dataset=_preferences(4, conversational=False))
    trainer.train()
    logged = trainer.state.log_history[0]
    for key in ("loss", "accuracy", "margin", "mean_reward", "std_reward", "num_tokens"):
        assert key in logged, key
    evaluated = next(h for h in trainer.state.log_history if "eval_loss" in h)
    chosen, rejected = _row_rewards(trainer.model, [trainer.eval_dataset[i] for i in range(4)])
    assert evaluated["eval_accuracy"] == pytest.approx((chosen > rejected).double().mean().item())
    assert evaluated["eval_margin"] == pytest.approx((chosen - rejected).mean().item(), rel=1e-4, abs=1e-6)

    trainer.save_model(str(tmp_path / "rm"))
    scorer = pipeline("text-classification", model=str(tmp_path / "rm"))
    text = "Question: What is 2 + 3?\nAnswer: 5"
    raw = scorer(text, function_to_apply="none")[0]["score"]
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "rm"))
    with torch.no_grad():
        direct = trainer.model(**tok(text, return_tensors="pt")).logits[0, 0].item()
    assert raw == pytest.approx(direct, rel=1e-5)
    assert scorer(text)[0]["score"] == pytest.approx(1 / (1 + math.exp(-direct)), rel=1e-5)


def test_lora_trains_the_score_head(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    trainer = RewardTrainer(model=tiny_model_dir, args=_config(tmp_path), train_dataset=_preferences(4),
                            peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)


def test_tokenizer_keyword_and_pretokenized_rows(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("a b c")["input_ids"]
    data = Dataset.from_list([{"chosen_input_ids": ids + [tok.eos_token_id], "rejected_input_ids": ids}] * 4)
    trainer = RewardTrainer(model=tiny_model_dir, args=_config(tmp_path), train_dataset=data, tokenizer=tok)
    assert trainer.train_dataset[0]["prompt_input_ids"] == []
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert math.isfinite(trainer.compute_loss(trainer.model, batch).item())


def test_word_level_tokenizer_model_instance_and_conversations(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForSequenceClassification

    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + 1 ?"}],
             "chosen": [{"role": "assistant", "content": str(a + 1)}],
             "rejected": [{"role": "assistant", "content": str(a + 2)}]} for a in range(4)]
    words = ["user", "assistant", "What", "is", "+", "?"] + [str(i) for i in range(7)]
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"] + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="[UNK]", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    model = Qwen2ForSequenceClassification(Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, num_key_value_heads=1,
                                                       intermediate_size=64, num_labels=1))
    trainer = RewardTrainer(model=model, args=_config(tmp_path), train_dataset=Dataset.from_list(rows),
                            processing_class=tok)
    assert trainer.model.config.pad_token_id == tok.pad_token_id
    row = trainer.train_dataset[0]
    assert tok.unk_token_id not in row["prompt_input_ids"] + row["chosen_input_ids"]
    assert tok.convert_ids_to_tokens(row["chosen_input_ids"]) == ["1", "<|im_end|>"]
    rows_tokenized = [trainer.train_dataset[i] for i in range(4)]
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows_tokenized)).item()
    chosen, rejected = _row_rewards(trainer.model, rows_tokenized)
    assert loss == pytest.approx(-torch.nn.functional.logsigmoid(chosen - rejected).mean().item(), rel=1e-5)
