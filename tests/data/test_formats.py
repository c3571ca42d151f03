from __future__ import annotations

import re

import pytest
from datasets import Dataset

from posttrain.data.formats import DataFormat, detect_format, extract_prompt, resolve_format, validate_dataset
from posttrain.data.load import load_data
from posttrain.errors import DataError

ALL = list(DataFormat)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "rows, expected, conversational, explicit, columns",
    [
        ([{"text": "a b"}], DataFormat.LANGUAGE_MODELING, False, False, ["text"]),
        ([{"prompt": "a", "completion": "b"}], DataFormat.PROMPT_COMPLETION, False, True, ["prompt", "completion"]),
        (
            [{"prompt": [user("a")], "completion": [assistant("b")]}],
            DataFormat.PROMPT_COMPLETION, True, True, ["prompt", "completion"],
        ),
        ([{"messages": [user("a"), assistant("b")]}], DataFormat.CONVERSATIONAL, True, False, ["messages"]),
        (
            [{"prompt": "p", "chosen": "a", "rejected": "b"}],
            DataFormat.PREFERENCE, False, True, ["prompt", "chosen", "rejected"],
        ),
        ([{"chosen": "p a", "rejected": "p b"}], DataFormat.PREFERENCE, False, False, ["chosen", "rejected"]),
        (
            [{"chosen": [user("p"), assistant("a")], "rejected": [user("p"), assistant("b")]}],
            DataFormat.PREFERENCE, True, False, ["chosen", "rejected"],
        ),
        (
            [{"prompt": "p", "completion": "a", "label": True}],
            DataFormat.UNPAIRED_PREFERENCE, False, True, ["prompt", "completion", "label"],
        ),
        ([{"prompt": "p", "answer": "4"}], DataFormat.PROMPT_ONLY, False, True, ["prompt"]),
        ([{"prompt": [user("p")], "answer": "4"}], DataFormat.PROMPT_ONLY, True, True, ["prompt"]),
    ],
)
def test_detect_each_format(rows, expected, conversational, explicit, columns):
    info = detect_format(Dataset.from_list(rows))
    assert info.format is expected
    assert info.conversational is conversational
    assert info.explicit_prompt is explicit
    assert info.columns == columns


def test_detect_custom_text_field():
    info = detect_format(Dataset.from_list([{"body": "x"}]), text_field="body")
    assert info.format is DataFormat.LANGUAGE_MODELING and info.columns == ["body"]


def test_detect_unknown_columns_names_them():
    with pytest.raises(DataError) as caught:
        detect_format(Dataset.from_list([{"question": "q", "reply": "r"}]), source="x.jsonl")
    message = str(caught.value)
    assert "x.jsonl" in message and "'question'" in message and "'reply'" in message
    assert "prompt-completion" in message and "Fix:" in message


def test_sharegpt_columns_get_a_rename_hint():
    rows = [{"conversations": [{"from": "human", "value": "hi"}]}]
    with pytest.raises(DataError, match="rename it to 'messages'"):
        detect_format(Dataset.from_list(rows))


def test_accepted_format_chosen_when_several_fit():
    data = Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert resolve_format(data, [DataFormat.PREFERENCE]).format is DataFormat.PREFERENCE
    # an online method reads the same rows as prompts
    assert resolve_format(data, [DataFormat.PROMPT_ONLY]).format is DataFormat.PROMPT_ONLY
    # but SFT must not train on both completions of labelled data
    labelled = Dataset.from_list([{"prompt": "p", "completion": "a", "label": False}])
    with pytest.raises(DataError, match="match no format accepted"):
        resolve_format(labelled, [DataFormat.PROMPT_COMPLETION])


def test_format_not_accepted_lists_accepted_formats():
    data = Dataset.from_list([{"chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError) as caught:
        validate_dataset(data, [DataFormat.PROMPT_COMPLETION, DataFormat.CONVERSATIONAL], source="pairs.jsonl")
    message = str(caught.value)
    assert "pairs.jsonl" in message and "['chosen', 'rejected']" in message
    assert "'prompt', 'completion'" in message and "'messages'" in message
    assert "preference" not in message.split("expected")[1].split("found")[0]


# ----------------------------------------------------------------------------- validation errors


def _error_for(rows, accepted=ALL, **kwargs) -> DataError:
    with pytest.raises(DataError) as caught:
        validate_dataset(Dataset.from_list(rows) if isinstance(rows, list) else rows, accepted, **kwargs)
    return caught.value


def test_valid_datasets_pass():
    rows = [{"messages": [{"role": "system", "content": ""}, user("a"), assistant("b")]}] * 3
    assert validate_dataset(Dataset.from_list(rows), ALL).format is DataFormat.CONVERSATIONAL
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 0.5}] * 2
    assert validate_dataset(Dataset.from_list(rows), ALL).format is DataFormat.PREFERENCE


def test_empty_dataset():
    error = _error_for(Dataset.from_dict({"prompt": [], "completion": []}))
    assert "empty" in error.problem


def test_missing_value_names_row_and_column():
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}, {"prompt": "e", "completion": None}]
    error = _error_for(rows, source="train.jsonl")
    assert (error.row, error.column, error.found) == (2, "completion", "None")
    assert str(error).startswith("train.jsonl, row 2, column 'completion': missing value")


def test_int_where_string_needed(write_jsonl):
    # JSON with mixed types: the column is stored as JSON and checked value by value
    path = write_jsonl("mixed.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": 7, "completion": "d"}])
    error = _error_for(load_data(path))
    assert (error.row, error.column) == (1, "prompt")
    assert error.source == path
    assert error.expected == "a string" and "int 7" in str(error.found)


def test_whole_column_of_ints():
    error = _error_for([{"text": 1}, {"text": 2}], [DataFormat.LANGUAGE_MODELING])
    assert (error.row, error.column, error.problem) == (0, "text", "wrong type")


def test_empty_string():
    error = _error_for([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "  \n"}])
    assert (error.row, error.column, error.problem) == (1, "completion", "empty text")


def test_first_bad_row_across_columns():
    ok = {"prompt": "a", "completion": "b"}
    rows = [ok, {"prompt": "a", "completion": None}, ok, {"prompt": "", "completion": "b"}]
    error = _error_for(rows)  # 'prompt' is checked first, but its bad row comes later
    assert (error.row, error.column) == (1, "completion")


def test_message_missing_content():
    rows = [
        {"messages": [user("a"), assistant("b")]},
        {"messages": [user("a"), {"role": "assistant"}]},
    ]
    error = _error_for(rows)
    assert (error.row, error.column) == (1, "messages")
    assert "message 1" in error.problem and "no 'content'" in error.problem


def test_message_missing_role(write_jsonl):
    path = write_jsonl("chat.jsonl", [
        {"messages": [user("a"), assistant("b")]},
        {"messages": [user("a"), assistant("b")]},
        {"messages": [{"content": "a"}, assistant("b")]},
    ])
    error = _error_for(load_data(path))
    assert (error.source, error.row, error.column) == (path, 2, "messages")
    assert "message 0 has no 'role'" in error.problem


def test_unknown_role():
    rows = [{"messages": [user("a"), assistant("b")]}, {"messages": [{"role": "human", "content": "a"}, assistant("b")]}]
    error = _error_for(rows)
    assert (error.row, error.found) == (1, "'human'")
    assert "unknown role" in error.problem and "'human' -> 'user'" in error.fix


def test_no_assistant_turn():
    rows = [{"messages": [user("a"), assistant("b")]}, {"messages": [user("a")]}]
    error = _error_for(rows)
    assert (error.row, error.column) == (1, "messages")
    assert "no assistant turn" in error.problem


def test_prompt_without_assistant_is_fine_but_completion_needs_one():
    rows = [{"prompt": [user("q")], "completion": [assistant("a")]}, {"prompt": [user("q")], "completion": [user("a")]}]
    error = _error_for(rows)
    assert (error.row, error.column) == (1, "completion")


def test_empty_message_content():
    rows = [{"messages": [user("a"), assistant("b")]}, {"messages": [user("a"), assistant(" ")]}]
    error = _error_for(rows)
    assert (error.row, error.column) == (1, "messages") and "is empty" in error.problem


def test_tool_call_message_may_have_no_content():
    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    rows = [{"messages": [user("a"), call, {"role": "tool", "content": "42"}, assistant("it is 42")]}]
    assert validate_dataset(Dataset.from_list(rows), ALL).format is DataFormat.CONVERSATIONAL


def test_empty_conversation():
    rows = [{"messages": [user("a"), assistant("b")]}, {"messages": []}]
    error = _error_for(rows)
    assert (error.row, error.problem) == (1, "empty conversation")


def test_conversation_and_text_mixed_across_columns():
    rows = [{"prompt": [user("q")], "completion": "plain text"}]
    error = _error_for(rows)
    assert (error.row, error.column, error.problem) == (0, "completion", "wrong type")
    assert "conversations" in error.fix


def test_unpaired_label_type(write_jsonl):
    path = write_jsonl("kto.jsonl", [{"prompt": "p", "completion": "a", "label": True},
                                      {"prompt": "p", "completion": "a", "label": "yes"}])
    error = _error_for(load_data(path))
    assert (error.row, error.column, error.found) == (1, "label", "str 'yes'")
    assert validate_dataset(Dataset.from_dict({"prompt": ["p"] * 2, "completion": ["a"] * 2, "label": [1, 0]}), ALL)
    error = _error_for(Dataset.from_dict({"prompt": ["p"] * 2, "completion": ["a"] * 2, "label": [1, 2]}))
    assert (error.row, error.column) == (1, "label")


def test_margin_must_be_numeric():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.0}, {"prompt": "p", "chosen": "a", "rejected": "b", "margin": None}]
    error = _error_for(rows)
    assert (error.row, error.column) == (1, "margin")


def test_row_numbers_follow_select_and_shuffle():
    data = Dataset.from_list([{"text": "ok"}] * 5 + [{"text": ""}])
    subset = data.select([5, 0, 1])  # the bad row is now row 0
    error = _error_for(subset, [DataFormat.LANGUAGE_MODELING])
    assert error.row == 0
    assert validate_dataset(data.select([0, 1, 2]), [DataFormat.LANGUAGE_MODELING]).format is DataFormat.LANGUAGE_MODELING


def test_error_message_has_every_part(write_jsonl):
    path = write_jsonl("d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""}])
    message = str(_error_for(load_data(path)))
    assert re.fullmatch(
        re.escape(path) + r", row 1, column 'completion': empty text; expected non-empty text, found ''\. Fix: .+",
        message,
    )


# ----------------------------------------------------------------------------- implicit prompts


@pytest.mark.parametrize(
    "chosen, rejected, prompt",
    [
        ("Q: 2+2?\nA: 4", "Q: 2+2?\nA: 5", "Q: 2+2?\nA:"),
        ("The answer is 4", "The answer is 42", "The answer is"),  # shared "4" is not a word boundary
        ("Hello world.", "Hello world!", "Hello"),
        ("abc", "abd", ""),
        ("Human: hi Assistant: yes", "Human: hi Assistant: no way", "Human: hi Assistant:"),
    ],
)
def test_extract_prompt_strings(chosen, rejected, prompt):
    got_prompt, chosen_rest, rejected_rest = extract_prompt(chosen, rejected)
    assert got_prompt == prompt
    assert got_prompt + chosen_rest == chosen and got_prompt + rejected_rest == rejected
    assert chosen_rest and rejected_rest


def test_extract_prompt_conversations():
    system = {"role": "system", "content": "s"}
    chosen = [system, user("q"), assistant("good")]
    rejected = [system, user("q"), assistant("bad")]
    assert extract_prompt(chosen, rejected) == ([system, user("q")], [assistant("good")], [assistant("bad")])
    # identical conversations still leave each side one message
    assert extract_prompt(chosen, list(chosen)) == ([system, user("q")], [assistant("good")], [assistant("good")])


def test_extract_prompt_mixed_kinds():
    with pytest.raises(DataError, match="different kinds"):
        extract_prompt("text", [user("q")])


def test_messages_with_differing_keys_from_json(write_jsonl):
    # keys differ between messages, so datasets stores them as JSON text; they are still checked per row
    call = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}
    good = {"messages": [user("a"), call, {"role": "tool", "content": "42", "name": "f"}, assistant("42")]}
    path = write_jsonl("tools.jsonl", [good, {"messages": [user("a"), assistant("b")]}])
    assert validate_dataset(load_data(path), ALL).format is DataFormat.CONVERSATIONAL
    path = write_jsonl("tools_bad.jsonl", [good, good, {"messages": [{"role": "bot", "content": "a", "x": 1}]}])
    error = _error_for(load_data(path))
    assert (error.source, error.row, error.found) == (path, 2, "'bot'")
