from __future__ import annotations

from fractions import Fraction

import pytest

from posttrain.errors import ConfigError, DataError
from posttrain.rewards import (
    BUILTIN_REWARDS,
    accuracy,
    describe_builtins,
    format_reward,
    incremental_format,
    last_number,
    length_penalty,
    parse_number,
)


def as_messages(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize(
    "text, value",
    [
        ("1,000", Fraction(1000)),
        ("1000", Fraction(1000)),
        ("3.0", Fraction(3)),
        ("+5", Fraction(5)),
        ("-0.25", Fraction(-1, 4)),
        (".5", Fraction(1, 2)),
        ("1/2", Fraction(1, 2)),
        ("$1,234.", Fraction(1234)),
        ("12,34", None),
        ("five", None),
        ("", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_last_number_takes_the_last_and_keeps_signs_and_separators():
    assert last_number("first 3, then 1,000 apples") == 1000
    assert last_number("12 - 5 = -7") == -7
    assert last_number("items 1,2,3") == 3
    assert last_number("no digits here") is None


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("So the total is 1,000.", "1000", 1.0),
        ("So the total is 1000", "1,000", 1.0),
        ("<answer>3.0</answer>", "3", 1.0),
        ("<answer>+5</answer>", "5", 1.0),
        ("<answer>5</answer> and later 9", "5", 1.0),  # the answer tag wins over the last number
        ("<answer>1</answer> ... <answer>2</answer>", "2", 1.0),  # the last tag
        ("I think 4 then 7", "4", 0.0),  # the last number counts
        ("the answer is \\boxed{\\frac{1}{2}} or 0.5", "0.5", 0.0),  # the boxed content wins; its last number is 2
        ("\\boxed{12}", "12", 1.0),
        ("reasoning #### whatever", "reasoning #### 42", 0.0),
        ("it is 42", "some working #### 42", 1.0),  # GSM8K-style reference
        ("<answer> Paris. </answer>", "paris", 1.0),  # text answers: case and final period ignored
        ("<answer>Lyon</answer>", "Paris", 0.0),
        ("no number", "7", 0.0),
    ],
)
def test_accuracy_cases(completion, answer, expected):
    assert accuracy(["q"], [completion], answer=[answer]) == [expected]
    assert accuracy(["q"], [as_messages(completion)], answer=[answer]) == [expected]


def test_accuracy_none_for_rows_without_answer_and_error_without_column():
    assert accuracy(["a", "b", "c"], ["1", "2", "3"], answer=[None, "", 3]) == [None, None, 1.0]
    with pytest.raises(DataError) as info:
        accuracy(["a"], ["1"])
    assert info.value.column == "answer" and "Fix:" in str(info.value)


def test_accuracy_accepts_unused_kwargs():
    assert accuracy(prompts=["q"], completions=["7"], answer=["7"], completion_ids=[[1]], trainer_state=None, level=[3]) == [1.0]


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>a\nb</think>\n<answer>4</answer>", 1.0),
        ("  <think>x</think><answer>4</answer>\n", 1.0),  # surrounding whitespace is ignored
        ("<think>x</think> <answer>4</answer> extra", 0.0),
        ("hi <think>x</think><answer>4</answer>", 0.0),
        ("<answer>4</answer>", 0.0),
        ("<think>x</think>", 0.0),
    ],
)
def test_format_default(completion, expected):
    assert BUILTIN_REWARDS["format"](["p"], [completion]) == [expected]
    assert BUILTIN_REWARDS["format"](["p"], [as_messages(completion)]) == [expected]


def test_format_factory_with_own_pattern_and_bad_pattern():
    only_answer = format_reward(r"^<answer>\d+</answer>$", name="answer_only")
    assert only_answer.__name__ == "answer_only"
    assert only_answer(["p", "p"], ["<answer>12</answer>", "<answer>x</answer>"]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match="not a valid regex"):
        format_reward("(unclosed")


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>a</think><answer>4</answer>", 1.0),
        ("<think>a</think><answer>4</answer>xyz", 1.0 - 0.003),
        ("<think>a</think><answer>4</answer>" + "z" * 1000, 0.75),  # penalty capped at 0.25
        ("</think><answer>4</answer>", 0.75),
        ("<think>a</think><answer>4", 0.75),
        ("<think>a<think></think><answer>4</answer>", 0.75),  # <think> twice: no credit for it
        ("say <think>a</think><answer>4</answer>", 0.75),  # <think> must open the completion
        ("<answer>4</answer><think>", 0.5 - 0.007),  # </answer> then 7 characters of trailing text
        ("plain text", 0.0),
    ],
)
def test_incremental_format(completion, expected):
    assert incremental_format(["p"], [completion]) == [pytest.approx(expected)]


def test_length_penalty_uses_tokens_when_given_else_characters():
    penalty = length_penalty(target=4, scale=2.0)
    assert penalty.__name__ == "length_penalty"
    ids = [[1] * 3, [1] * 4, [1] * 6, [1] * 12]
    assert penalty(["p"] * 4, ["x"] * 4, completion_ids=ids) == [0.0, 0.0, -1.0, -4.0]
    assert penalty(["p"], ["abcdef"]) == [-1.0]
    assert BUILTIN_REWARDS["length_penalty"](["p"], ["x"], completion_ids=[[0] * 512]) == [-1.0]
    with pytest.raises(ConfigError):
        length_penalty(target=0)


def test_describe_builtins_lists_every_builtin():
    text = describe_builtins()
    for name in BUILTIN_REWARDS:
        assert any(line.startswith(name + " ") for line in text.splitlines())
    assert "length_penalty(target=256, scale=1.0)" in text
