"""Preference, unpaired-preference and prompt tokenization, and their truncation rules."""

from __future__ import annotations

import pytest
from datasets import Dataset

from posttrain.data.tokenize import (
    tokenize_preference,
    tokenize_prompts,
    tokenize_unpaired_preference,
    truncate_pair,
    truncate_prompt,
)
from posttrain.errors import ConfigError, DataError


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ----------------------------------------------------------------------------- truncation rules


def test_truncate_prompt_modes():
    assert truncate_prompt([1, 2, 3, 4, 5], 3, "keep_end") == [3, 4, 5]
    assert truncate_prompt([1, 2, 3, 4, 5], 3, "keep_start") == [1, 2, 3]
    assert truncate_prompt([1, 2], 3, "keep_end") == [1, 2]
    assert truncate_prompt([1, 2, 3], None) == [1, 2, 3]


def test_truncate_pair_prompt_and_completion_limits():
    prompt, (chosen, rejected) = truncate_pair(
        [1, 2, 3, 4, 5], [[10, 11, 12, 13], [20, 21]], max_length=None, max_prompt_length=2,
        max_completion_length=3, truncation_mode="keep_end",
    )
    assert prompt == [4, 5] and chosen == [10, 11, 12] and rejected == [20, 21]


def test_truncate_pair_cuts_completions_before_the_prompt():
    # prompt 4 + longest 5 = 9 > 7: completions are cut to 7 - 4 = 3, the prompt is kept whole
    prompt, (chosen, rejected) = truncate_pair([1, 2, 3, 4], [[10, 11, 12, 13, 14], [20, 21]], max_length=7)
    assert prompt == [1, 2, 3, 4] and chosen == [10, 11, 12] and rejected == [20, 21]


@pytest.mark.parametrize("mode, kept_prompt", [("keep_end", [7, 8, 9, 10]), ("keep_start", [1, 2, 3, 4])])
def test_truncate_pair_prompt_alone_too_long(mode, kept_prompt):
    # a 10-token prompt fills max_length 8: it is cut to 8 - min(6, 8 // 2) = 4 tokens, leaving 4
    prompt, (chosen, rejected) = truncate_pair(
        list(range(1, 11)), [[20, 21, 22, 23, 24, 25], [30, 31]], max_length=8, truncation_mode=mode
    )
    assert prompt == kept_prompt and chosen == [20, 21, 22, 23] and rejected == [30, 31]


def test_unknown_truncation_mode(chatml_tokenizer):
    data = Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(ConfigError) as caught:
        tokenize_preference(data, chatml_tokenizer, truncation_mode="middle")
    assert str(caught.value).startswith("--truncation_mode:")


# ----------------------------------------------------------------------------- preference


def test_standard_explicit_preference(chatml_tokenizer):
    eos = chatml_tokenizer.eos_token_id
    data = Dataset.from_list([{"prompt": "What is 2 + 2?", "chosen": " 4", "rejected": " 5", "margin": 2.0}])
    out = tokenize_preference(data, chatml_tokenizer)
    assert sorted(out.column_names) == ["chosen_input_ids", "margin", "prompt_input_ids", "rejected_input_ids"]
    row = out[0]
    assert row["prompt_input_ids"] == encode(chatml_tokenizer, "What is 2 + 2?")
    assert row["chosen_input_ids"] == encode(chatml_tokenizer, " 4") + [eos]
    assert row["rejected_input_ids"] == encode(chatml_tokenizer, " 5") + [eos]
    assert row["margin"] == 2.0


def test_bos_goes_on_the_prompt_only(bos_tokenizer):
    data = Dataset.from_list([{"prompt": "What is 2 + 2?", "chosen": " 4", "rejected": " 5"}])
    row = tokenize_preference(data, bos_tokenizer)[0]
    assert row["prompt_input_ids"][0] == bos_tokenizer.bos_token_id
    assert row["prompt_input_ids"].count(bos_tokenizer.bos_token_id) == 1
    for side in ("chosen_input_ids", "rejected_input_ids"):
        assert bos_tokenizer.bos_token_id not in row[side]
        assert row[side][-1] == bos_tokenizer.eos_token_id and row[side].count(bos_tokenizer.eos_token_id) == 1


def test_standard_implicit_preference(chatml_tokenizer):
    data = Dataset.from_list([{"chosen": "Question: name a colour. Answer: blue", "rejected": "Question: name a colour. Answer: red"}])
    row = tokenize_preference(data, chatml_tokenizer)[0]
    assert chatml_tokenizer.decode(row["prompt_input_ids"]) == "Question: name a colour. Answer:"
    assert chatml_tokenizer.decode(row["chosen_input_ids"]) == " blue<|im_end|>"
    assert chatml_tokenizer.decode(row["rejected_input_ids"]) == " red<|im_end|>"


def test_conversational_explicit_preference(chatml_tokenizer):
    prompt = [user("hello")]
    data = Dataset.from_list([{"prompt": prompt, "chosen": [assistant("world")], "rejected": [assistant("the cat")]}])
    row = tokenize_preference(data, chatml_tokenizer)[0]
    assert chatml_tokenizer.decode(row["prompt_input_ids"]) == chatml_tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True
    )
    # the whole rendered assistant turn, the template's newline after <|im_end|> included (as TRL)
    assert chatml_tokenizer.decode(row["chosen_input_ids"]) == "world<|im_end|>\n"
    assert chatml_tokenizer.decode(row["rejected_input_ids"]) == "the cat<|im_end|>\n"
    whole = chatml_tokenizer.apply_chat_template(prompt + [assistant("world")], tokenize=False)
    assert row["prompt_input_ids"] + row["chosen_input_ids"] == encode(chatml_tokenizer, whole)


def test_conversational_implicit_preference_with_non_eos_turn_end(bos_tokenizer):
    data = Dataset.from_list([{
        "chosen": [user("hello"), assistant("world")],
        "rejected": [user("hello"), assistant("the cat")],
    }])
    row = tokenize_preference(data, bos_tokenizer)[0]
    assert bos_tokenizer.decode(row["prompt_input_ids"]) == "<s>[user]: hello<|eot|>[assistant]: "
    assert bos_tokenizer.decode(row["chosen_input_ids"]) == "world<|eot|></s>"
    assert bos_tokenizer.decode(row["rejected_input_ids"]) == "the cat<|eot|></s>"


def test_conversational_completion_is_the_rendering_after_the_generation_prompt(chatml_tokenizer):
    """The same boundaries as TRL: rendered(prompt + completion) minus rendered(prompt, generation prompt),
    here a completion of two turns."""
    prompt = [user("hello")]
    chosen = [assistant("world"), user("the cat"), assistant("sat on the mat")]
    data = Dataset.from_list([{"prompt": prompt, "chosen": chosen, "rejected": [assistant("blue")]}])
    row = tokenize_preference(data, chatml_tokenizer)[0]
    before = chatml_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    whole = chatml_tokenizer.apply_chat_template(prompt + chosen, tokenize=False)
    assert row["prompt_input_ids"] == encode(chatml_tokenizer, before)
    assert row["chosen_input_ids"] == encode(chatml_tokenizer, whole[len(before):])
    assert chatml_tokenizer.decode(row["chosen_input_ids"]).endswith("mat<|im_end|>\n")


def test_template_whose_turn_ends_without_a_newline(chatml_tokenizer):
    import copy

    tight = copy.deepcopy(chatml_tokenizer)
    tight.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    data = Dataset.from_list([{"prompt": [user("hello")], "chosen": [assistant("world")], "rejected": [assistant("blue")]}])
    row = tokenize_preference(data, tight)[0]
    assert tight.decode(row["prompt_input_ids"]) == "<|im_start|>user\nhello<|im_end|><|im_start|>assistant\n"
    # the turn ends with EOS itself: nothing added, nothing dropped
    assert row["chosen_input_ids"] == encode(tight, "world<|im_end|>")
    assert row["rejected_input_ids"] == encode(tight, "blue<|im_end|>")


def test_plain_text_rows_are_unchanged_by_the_chat_rules(chatml_tokenizer):
    # no template involved: text as given (a trailing newline kept), EOS appended once
    eos = chatml_tokenizer.eos_token_id
    data = Dataset.from_list([{"prompt": "What is 2 + 2?\n", "chosen": " 4\n", "rejected": " 5<|im_end|>"}])
    row = tokenize_preference(data, chatml_tokenizer)[0]
    assert row["prompt_input_ids"] == encode(chatml_tokenizer, "What is 2 + 2?\n")
    assert row["chosen_input_ids"] == encode(chatml_tokenizer, " 4\n") + [eos]
    assert row["rejected_input_ids"] == encode(chatml_tokenizer, " 5") + [eos]


def test_preference_truncation_applied_per_row(chatml_tokenizer):
    text = "the cat sat on the mat and the dog sat on the log."
    data = Dataset.from_list([{"prompt": text, "chosen": " " + text, "rejected": " blue"}])
    full = tokenize_preference(data, chatml_tokenizer, max_length=None)[0]
    for mode, expected_prompt in (("keep_end", full["prompt_input_ids"][-5:]), ("keep_start", full["prompt_input_ids"][:5])):
        row = tokenize_preference(
            data, chatml_tokenizer, max_length=9, max_prompt_length=5, truncation_mode=mode
        )[0]
        assert row["prompt_input_ids"] == expected_prompt
        assert row["chosen_input_ids"] == full["chosen_input_ids"][:4]
        assert row["rejected_input_ids"] == full["rejected_input_ids"]  # short enough already


def test_preference_template_error_names_row(chatml_tokenizer):
    import copy

    odd = copy.deepcopy(chatml_tokenizer)
    odd.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'bot: ' }}{% endif %}"
    )
    data = Dataset.from_list([{"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [assistant("b")]}] * 2)
    with pytest.raises(DataError) as caught:
        tokenize_preference(data, odd, source="prefs.jsonl")
    assert (caught.value.source, caught.value.row) == ("prefs.jsonl", 0)


# ----------------------------------------------------------------------------- unpaired


def test_unpaired_preference(chatml_tokenizer):
    eos = chatml_tokenizer.eos_token_id
    data = Dataset.from_list([
        {"prompt": "What is 2 + 2?", "completion": " 4", "label": True},
        {"prompt": "What is 2 + 2?", "completion": " 5", "label": False},
    ])
    out = tokenize_unpaired_preference(data, chatml_tokenizer)
    assert sorted(out.column_names) == ["completion_input_ids", "label", "prompt_input_ids"]
    assert out["label"] == [True, False]
    assert out[1]["completion_input_ids"] == encode(chatml_tokenizer, " 5") + [eos]


# ----------------------------------------------------------------------------- prompts


def test_prompts_keep_every_column(chatml_tokenizer):
    data = Dataset.from_list([{"prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": "the cat", "answer": "x"}])
    out = tokenize_prompts(data, chatml_tokenizer)
    assert out.column_names == ["prompt", "answer", "prompt_input_ids"]
    assert out["answer"] == ["4", "x"] and out["prompt"] == ["What is 2 + 2?", "the cat"]
    assert out[0]["prompt_input_ids"] == encode(chatml_tokenizer, "What is 2 + 2?")


def test_conversational_prompts_get_the_generation_header_and_keep_their_end(chatml_tokenizer):
    prompt = [user("the cat sat on the mat and the dog sat on the log.")]
    data = Dataset.from_list([{"prompt": prompt, "answer": "4"}])
    rendered = chatml_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenize_prompts(data, chatml_tokenizer)[0]["prompt_input_ids"]
    assert chatml_tokenizer.decode(full) == rendered
    cut = tokenize_prompts(data, chatml_tokenizer, max_prompt_length=6)[0]["prompt_input_ids"]
    assert cut == full[-6:]
    assert chatml_tokenizer.decode(cut).endswith("<|im_start|>assistant\n")
