"""SFT tokenization: special tokens, loss masks, truncation."""

from __future__ import annotations

import copy

import pytest
from datasets import Dataset

from posttrain.data.load import mark_source
from posttrain.data.tokenize import tokenize_sft
from posttrain.errors import ConfigError, DataError

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "world"},
    {"role": "user", "content": "the cat"},
    {"role": "assistant", "content": "sat on the mat"},
]


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def masked_text(tokenizer, row):
    return tokenizer.decode([t for t, m in zip(row["input_ids"], row["completion_mask"]) if m])


# ----------------------------------------------------------------------------- language modeling


def test_text_without_bos_gets_eos_once(chatml_tokenizer):
    eos = chatml_tokenizer.eos_token_id
    data = Dataset.from_list([{"text": "hello world"}, {"text": "the cat<|im_end|>"}])
    out = tokenize_sft(data, chatml_tokenizer)
    assert out.column_names == ["input_ids", "completion_mask"]
    assert out[0]["input_ids"] == encode(chatml_tokenizer, "hello world") + [eos]
    assert out[1]["input_ids"] == encode(chatml_tokenizer, "the cat") + [eos]  # not doubled
    assert out[0]["completion_mask"] == [1] * len(out[0]["input_ids"])


def test_text_with_bos_tokenizer(bos_tokenizer):
    bos, eos = bos_tokenizer.bos_token_id, bos_tokenizer.eos_token_id
    data = Dataset.from_list([{"text": "hello world"}, {"text": "<s>hello world"}])
    out = tokenize_sft(data, bos_tokenizer)
    expected = [bos] + encode(bos_tokenizer, "hello world") + [eos]
    assert out[0]["input_ids"] == expected
    assert out[1]["input_ids"] == expected  # a BOS already in the text is not doubled


# ----------------------------------------------------------------------------- prompt-completion


def test_prompt_completion_masks_the_completion(chatml_tokenizer):
    eos = chatml_tokenizer.eos_token_id
    data = Dataset.from_list([{"prompt": "What is 2 + 2?", "completion": " The answer is 4."}])
    row = tokenize_sft(data, chatml_tokenizer)[0]
    prompt_ids = encode(chatml_tokenizer, "What is 2 + 2?")
    completion_ids = encode(chatml_tokenizer, " The answer is 4.") + [eos]
    assert row["input_ids"] == prompt_ids + completion_ids
    assert row["completion_mask"] == [0] * len(prompt_ids) + [1] * len(completion_ids)
    everything = tokenize_sft(data, chatml_tokenizer, completion_only_loss=False)[0]
    assert everything["completion_mask"] == [1] * len(row["input_ids"])


def test_prompt_completion_bos_on_prompt_only(bos_tokenizer):
    data = Dataset.from_list([{"prompt": "What is 2 + 2?", "completion": " 4"}])
    ids = tokenize_sft(data, bos_tokenizer)[0]["input_ids"]
    assert ids.count(bos_tokenizer.bos_token_id) == 1 and ids[0] == bos_tokenizer.bos_token_id
    assert ids.count(bos_tokenizer.eos_token_id) == 1 and ids[-1] == bos_tokenizer.eos_token_id


def test_conversational_prompt_completion(chatml_tokenizer):
    data = Dataset.from_list([{"prompt": CONVERSATION[:2], "completion": [CONVERSATION[2]]}])
    row = tokenize_sft(data, chatml_tokenizer)[0]
    whole = chatml_tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False)
    # the whole rendered assistant turn, the template's newline after <|im_end|> included (as TRL)
    assert chatml_tokenizer.decode(row["input_ids"]) == whole
    assert masked_text(chatml_tokenizer, row) == "world<|im_end|>\n"
    assert row["input_ids"].count(chatml_tokenizer.eos_token_id) == 3  # one per turn, none added


# ----------------------------------------------------------------------------- conversations


def test_messages_train_on_everything_by_default(chatml_tokenizer):
    row = tokenize_sft(Dataset.from_list([{"messages": CONVERSATION}]), chatml_tokenizer)[0]
    text = chatml_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert row["input_ids"] == encode(chatml_tokenizer, text)  # the rendering as it is, no EOS added
    assert chatml_tokenizer.decode(row["input_ids"][-2:]) == "<|im_end|>\n"
    assert row["completion_mask"] == [1] * len(row["input_ids"])


def test_assistant_only_loss_spans(chatml_tokenizer):
    data = Dataset.from_list([{"messages": CONVERSATION}])
    row = tokenize_sft(data, chatml_tokenizer, assistant_only_loss=True)[0]
    plain = tokenize_sft(data, chatml_tokenizer)[0]
    assert row["input_ids"] == plain["input_ids"]  # masking never changes the tokens
    # each turn through the template's newline after <|im_end|>: a preference completion's boundaries
    assert masked_text(chatml_tokenizer, row) == "world<|im_end|>\nsat on the mat<|im_end|>\n"
    # check each span's edges: the token before is the header's newline, the one after is not a target
    tokens = chatml_tokenizer.convert_ids_to_tokens(row["input_ids"])
    mask = row["completion_mask"]
    starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
    ends = [i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    assert len(starts) == 2 and len(ends) == 2
    for start, end in zip(starts, ends):
        header_start = max(i for i in range(start) if tokens[i] == "<|im_start|>")
        assert chatml_tokenizer.decode(row["input_ids"][header_start:start]) == "<|im_start|>assistant\n"
        assert tokens[end - 1] == "<|im_end|>" and chatml_tokenizer.decode(row["input_ids"][end]) == "\n"
    assert mask[ends[0] + 1] == 0 and tokens[ends[0] + 1] == "<|im_start|>"


def test_assistant_only_loss_with_non_eos_turn_end(bos_tokenizer):
    bos, eos = bos_tokenizer.bos_token_id, bos_tokenizer.eos_token_id
    row = tokenize_sft(Dataset.from_list([{"messages": CONVERSATION}]), bos_tokenizer, assistant_only_loss=True)[0]
    ids = row["input_ids"]
    assert ids[0] == bos and ids.count(bos) == 1  # the template's BOS only
    assert ids[-1] == eos and ids.count(eos) == 1  # <|eot|> ends the turn, EOS is appended once
    # the header ends with a space that byte-level BPE merges into the reply's first token ('Ġworld'):
    # that token is the reply's, so it is a target
    assert masked_text(bos_tokenizer, row) == " world<|eot|> sat on the mat<|eot|></s>"


def test_assistant_only_loss_needs_conversations(chatml_tokenizer):
    with pytest.raises(ConfigError) as caught:
        tokenize_sft(Dataset.from_list([{"text": "x"}]), chatml_tokenizer, assistant_only_loss=True)
    assert str(caught.value).startswith("--assistant_only_loss:")


def test_conversations_need_a_chat_template(chatml_tokenizer):
    bare = copy.deepcopy(chatml_tokenizer)
    bare.chat_template = None
    data = mark_source(Dataset.from_list([{"messages": CONVERSATION}]), "chat.jsonl")
    with pytest.raises(DataError) as caught:
        tokenize_sft(data, bare)
    assert str(caught.value).startswith("chat.jsonl, column 'messages': the data is conversational")


def test_template_failure_names_the_row(chatml_tokenizer):
    strict = copy.deepcopy(chatml_tokenizer)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    data = Dataset.from_list([{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION}])
    with pytest.raises(DataError) as caught:
        tokenize_sft(data, strict, source="chat.jsonl")
    assert (caught.value.source, caught.value.row, caught.value.column) == ("chat.jsonl", 2, "messages")


# ----------------------------------------------------------------------------- truncation


def test_truncation_keeps_the_first_tokens(chatml_tokenizer):
    data = Dataset.from_list([{"prompt": "What is 2 + 2?", "completion": " The answer is 4."}])
    full = tokenize_sft(data, chatml_tokenizer, max_length=None)[0]
    cut = tokenize_sft(data, chatml_tokenizer, max_length=9)[0]
    assert len(full["input_ids"]) > 9
    assert cut["input_ids"] == full["input_ids"][:9]
    assert cut["completion_mask"] == full["completion_mask"][:9]


def test_no_truncation_raises_with_row_and_length(chatml_tokenizer):
    rows = [{"text": "hi"}, {"text": "the cat sat on the mat and the dog sat on the log."}]
    length = len(encode(chatml_tokenizer, rows[1]["text"])) + 1
    with pytest.raises(DataError) as caught:
        tokenize_sft(Dataset.from_list(rows), chatml_tokenizer, max_length=8, truncation=False, source="lm.jsonl")
    error = caught.value
    assert (error.source, error.row, error.found) == ("lm.jsonl", 1, f"{length} tokens")
    assert "max_length" in error.fix and "truncation" in error.fix


def test_ids_are_compact_integers(chatml_tokenizer):
    out = tokenize_sft(Dataset.from_list([{"text": "hello"}]), chatml_tokenizer)
    assert str(out.features["input_ids"].feature.dtype) == "int32"
    assert str(out.features["completion_mask"].feature.dtype) == "int8"
