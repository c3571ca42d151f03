from __future__ import annotations

import pytest
import torch
import transformers

from posttrain.errors import ConfigError
from posttrain.rewards import RewardComputer, RewardModelScorer


def reference_score(model, ids: list[int]) -> float:
    """One unpadded row at a time: the score at its last token, no pooling logic involved."""
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state
        return model.score(hidden[0, -1]).item()


def trained_layout(tokenizer, prompt, completion) -> list[int]:
    """The ids RewardTrainer trains on for a pair whose chosen side is ``completion``."""
    from datasets import Dataset

    from posttrain.data.tokenize import tokenize_preference

    row = tokenize_preference(Dataset.from_list([{"prompt": prompt, "chosen": completion, "rejected": completion}]),
                              tokenizer, max_length=None)[0]
    return row["prompt_input_ids"] + row["chosen_input_ids"]


@pytest.mark.parametrize("padding_free", [False, True])
def test_plain_rows_are_scored_at_the_token_reward_training_scores(reward_model_dir, padding_free, monkeypatch):
    from posttrain.models import packed_attention

    if padding_free:  # every padded batch counts as long: scored as one packed row, each row attending to itself
        monkeypatch.setattr(packed_attention, "PADDING_FREE_MIN_LENGTH", 1)
    layouts_taken = []
    original = packed_attention.padded_batch_as_packed_row
    monkeypatch.setattr("posttrain.models.reward_scoring.padded_batch_as_packed_row",
                        lambda *a, **k: layouts_taken.append(original(*a, **k)) or layouts_taken[-1])
    scorer = RewardModelScorer(reward_model_dir, batch_size=2)
    assert scorer.model.config._attn_implementation == packed_attention.PACKED_SDPA
    assert scorer.__name__ == "reward_model"
    prompts = ["what is two plus two?", "hello", "what is two plus two?"]
    completions = [" it is four.", " there, the answer is 4", [{"role": "assistant", "content": " four"}]]
    scores = scorer(prompts, completions, completion_ids=[[1], [2], [3]], answer=["4"] * 3)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    # the tokenizer as loaded from the directory (transformers may rebuild it differently from the fixture)
    saved_tokenizer = transformers.AutoTokenizer.from_pretrained(reward_model_dir)
    pairs = [("what is two plus two?", " it is four."), ("hello", " there, the answer is 4"),
             ("what is two plus two?", " four")]
    layouts = [trained_layout(saved_tokenizer, p, c) for p, c in pairs]
    assert all(ids[-1] == saved_tokenizer.eos_token_id for ids in layouts)
    expected = [reference_score(model, ids) for ids in layouts]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 4) for s in scores)) == 3
    # the batch of two rows of different lengths takes the packed row; the one-row batch has no padding
    assert [layout is not None for layout in layouts_taken] == [padding_free, False]


def test_conversational_rows_use_the_chat_template_and_long_inputs_keep_their_end(reward_model_dir, tokenizer):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(reward_model_dir)
    model.train()
    scorer = RewardModelScorer(model, tokenizer, max_length=8, name="rm")
    prompt = [{"role": "user", "content": "what is two plus two?"}]
    score = scorer([prompt], ["it is four."])[0]
    ids = trained_layout(tokenizer, prompt, [{"role": "assistant", "content": "it is four."}])
    # the template writes a newline after the turn's end token; training (and scoring) keep it, as TRL does
    text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "it is four."}], tokenize=False)
    assert text.endswith("<|im_end|>\n") and ids[-2] == tokenizer.eos_token_id
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 8
    model.eval()
    assert score == pytest.approx(reference_score(model, ids[-8:]), abs=1e-5)
    model.train()
    scorer([prompt], ["x"])
    assert model.training  # mode restored
    out = RewardComputer([scorer])([prompt], ["it is four."], [[1]], columns={})
    assert out.names == ["rm"]


def test_scorer_errors(tokenizer, reward_model_dir, tmp_path):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(reward_model_dir)
    # a loaded model without a tokenizer gets the one saved beside it, as TRL does
    assert RewardModelScorer(model).tokenizer.get_vocab() == tokenizer.get_vocab()
    model.config._name_or_path = ""  # built in memory: nowhere to load a tokenizer from
    with pytest.raises(ConfigError, match="needs its tokenizer"):
        RewardModelScorer(model)
    model.config.num_labels = 2
    with pytest.raises(ConfigError, match="num_labels=2"):
        RewardModelScorer(model, tokenizer)
    with pytest.raises(ConfigError, match="cannot load"):
        RewardModelScorer(str(tmp_path))


def test_pad_equal_to_eos_reads_the_eos_as_reward_training_does(tmp_path):
    """With pad == EOS, transformers' own pooling would read the token before each row's final EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["what", "is", "two", "plus", "?", "it", "four", "."]
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "<unk>"] + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  unk_token="<unk>")
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    prompts, completions = ["what is two plus two ?", "what is two ?"], ["it is four .", "two"]
    scores = RewardModelScorer(model, tok, batch_size=2)(prompts, completions)
    layouts = [trained_layout(tok, p, c) for p, c in zip(prompts, completions)]
    assert all(ids[-1] == tok.eos_token_id for ids in layouts)
    assert scores == pytest.approx([reference_score(model, ids) for ids in layouts], abs=1e-5)
    before_eos = [reference_score(model, ids[:-1]) for ids in layouts]
    assert all(abs(s - b) > 1e-3 for s, b in zip(scores, before_eos))
