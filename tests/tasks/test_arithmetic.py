from __future__ import annotations

import random
import re

import pytest

from posttrain.errors import ConfigError, DataError
from posttrain.tasks import TASKS, ArithmeticTask, extract_final_number, get_task


def _solve(question: str) -> int:
    a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", question).groups()
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def _key(problem: dict) -> str:
    return problem["question"]


# ----------------------------------------------------------------------------- problems


def test_problems_are_correct_deterministic_and_in_range():
    task = ArithmeticTask(max_operand=20)
    problems = task.make_problems(300, seed=5)
    assert problems == ArithmeticTask(max_operand=20).make_problems(300, seed=5)
    assert problems != task.make_problems(300, seed=6)
    for p in problems:
        assert p["answer"] == _solve(p["question"])
        a, _, b = re.findall(r"\d+|[-+*]", p["question"])
        assert 0 <= int(a) <= 20 and 0 <= int(b) <= 20
        assert p["answer"] >= 0  # no negative answers unless asked for
    assert {q["question"].split()[3] for q in problems} == {"+", "-"}


def test_problem_space_and_negative_answers():
    assert ArithmeticTask(max_operand=20).problem_space_size() == 21 * 21 + 21 * 22 // 2
    assert ArithmeticTask(max_operand=4, ops=("-",), allow_negative=True).problem_space_size() == 25
    task = ArithmeticTask(max_operand=9, ops=("-",), allow_negative=True)
    answers = [p["answer"] for p in task.make_problems(100, split="train")]
    assert min(answers) < 0


def test_train_and_test_splits_are_disjoint_and_cover_the_space():
    task = ArithmeticTask(max_operand=20, seed=0)
    train = {_key(p) for p in task.make_problems(2000, split="train")}
    test = {_key(p) for p in task.make_problems(2000, split="test")}
    assert train.isdisjoint(test)
    assert len(train) + len(test) == task.problem_space_size()
    assert 0.1 < len(test) / task.problem_space_size() < 0.3  # test_fraction 0.2
    # a different task seed moves problems between splits
    other = {_key(p) for p in ArithmeticTask(max_operand=20, seed=1).make_problems(2000, split="test")}
    assert other != test


def test_first_pass_over_a_split_has_no_repeats():
    task = ArithmeticTask(max_operand=10)
    size = len({_key(p) for p in task.make_problems(10_000, split="test")})
    first = [_key(p) for p in task.make_problems(size, split="test")]
    assert len(set(first)) == size


def test_large_spaces_are_sampled_and_stay_split_consistent():
    task = ArithmeticTask(max_operand=999, seed=2)
    train = task.make_problems(400, split="train")
    test = task.make_problems(400, split="test")
    assert {_key(p) for p in train}.isdisjoint({_key(p) for p in test})
    assert all(p["answer"] == _solve(p["question"]) for p in train + test)
    assert max(p["answer"] for p in train) > 100


@pytest.mark.parametrize(
    "kwargs",
    [dict(ops=("/",)), dict(ops=()), dict(max_operand=-1), dict(min_operand=5, max_operand=4),
     dict(test_fraction=0.0), dict(answer_format="json")],
)
def test_bad_task_options_raise_config_errors(kwargs):
    with pytest.raises(ConfigError):
        ArithmeticTask(**kwargs)


def test_bad_split_and_count():
    task = ArithmeticTask()
    with pytest.raises(ConfigError, match="split"):
        task.make_problems(3, split="validation")
    with pytest.raises(ConfigError):
        task.make_problems(-1)


# ----------------------------------------------------------------------------- checking


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("19", 19, True),
        ("  19  \n", 19, True),
        ("19.", 19, True),
        ("19!", 19, True),
        ("+19", 19, True),
        ("The answer is 19.", 19, True),
        ("7 + 12 = 19", 19, True),
        ("19.0", 19, True),
        ("19.5", 19, False),
        ("18", 19, False),
        ("191", 19, False),
        ("1 9", 19, False),
        ("19 or maybe 20", 19, False),
        ("-3", -3, True),
        ("= -3", -3, True),
        ("\u22123", -3, True),
        ("3", -3, False),
        ("12-5", 5, True),  # a hyphen after a digit is not a sign
        ("<answer>19</answer>", 19, True),
        ("<answer> 19 </answer> but 20 later", 19, True),
        ("I think 20 <answer>19</answer>", 19, True),
        ("<answer>first 3</answer> then <answer>19</answer>", 19, True),
        ("<answer>no number</answer> 19", 19, False),
        ("1,234", 1234, True),
        ("", 0, False),
        (None, 0, False),
        ("no digits here", 0, False),
        ("0", 0, True),
        ("19", "19", True),
        ("19", " 19 ", True),
        ("19", "twenty", False),
    ],
)
def test_check(completion, answer, expected):
    assert ArithmeticTask().check(completion, answer) is expected


def test_extract_final_number():
    assert extract_final_number("a 1 b 2.5 c") == 2.5
    assert extract_final_number("x19") == 19
    assert extract_final_number("...") is None


def test_wrong_answers_are_wrong_plausible_and_non_negative():
    task = ArithmeticTask()
    rng = random.Random(0)
    for problem in task.make_problems(500):
        wrong = task.wrong_answer(problem, rng)
        assert wrong != problem["answer"]
        assert wrong >= 0
        assert abs(wrong - problem["answer"]) <= 90
        assert not task.check(str(wrong), problem["answer"])


def test_wrong_answer_rejects_foreign_questions():
    with pytest.raises(DataError, match="question"):
        ArithmeticTask().wrong_answer({"question": "Who?", "answer": 1}, random.Random(0))


# ----------------------------------------------------------------------------- dataset builders


def test_text_and_prompt_completion_builders():
    task = ArithmeticTask()
    problems = [{"question": "What is 7 + 12?", "answer": 19}, {"question": "What is 9 - 4?", "answer": 5}]
    text = task.as_text(problems)
    assert text.column_names == ["text"]
    assert text[0]["text"] == "Question: What is 7 + 12?\nAnswer: 19"

    plain = task.as_prompt_completion(problems, conversational=False)
    assert plain.column_names == ["prompt", "completion"]
    assert plain[1] == {"prompt": "Question: What is 9 - 4?\nAnswer:", "completion": " 5"}

    chat = task.as_prompt_completion(problems, system_prompt="Answer with a number.")
    assert chat[0]["prompt"] == [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "What is 7 + 12?"},
    ]
    assert chat[0]["completion"] == [{"role": "assistant", "content": "19"}]


def test_messages_builder():
    task = ArithmeticTask()
    data = task.as_messages(4, seed=1)
    assert data.column_names == ["messages"]
    assert len(data) == 4
    for row in data:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert int(assistant["content"]) == _solve(user["content"])
    with_system = task.as_messages(1, system_prompt="S")
    assert [m["role"] for m in with_system[0]["messages"]] == ["system", "user", "assistant"]


@pytest.mark.parametrize("conversational", [True, False])
def test_preference_builders(conversational):
    task = ArithmeticTask()
    paired = task.as_preference(50, conversational=conversational)
    assert paired.column_names == ["prompt", "chosen", "rejected"]
    unpaired = task.as_unpaired_preference(50, conversational=conversational)
    assert unpaired.column_names == ["prompt", "completion", "label"]
    assert len(unpaired) == 100
    assert unpaired["label"] == [True, False] * 50

    def content(value):
        return value[0]["content"] if conversational else value

    def question(prompt):
        return prompt[-1]["content"] if conversational else prompt.split("\n")[0].removeprefix("Question: ")

    for row in paired:
        answer = _solve(question(row["prompt"]))
        assert task.check(content(row["chosen"]), answer)
        assert not task.check(content(row["rejected"]), answer)
    for row in unpaired:
        assert task.check(content(row["completion"]), _solve(question(row["prompt"]))) is row["label"]
    assert paired["rejected"] == task.as_preference(50, conversational=conversational)["rejected"]


def test_prompt_only_builder_and_tagged_answers():
    task = ArithmeticTask(answer_format="tagged")
    data = task.as_prompt_only(10, split="test")
    assert data.column_names == ["prompt", "answer"]
    assert all(row["answer"] == _solve(row["prompt"][-1]["content"]) for row in data)
    text = task.as_prompt_only(3, conversational=False)
    assert isinstance(text[0]["prompt"], str) and text[0]["prompt"].startswith("Question: ")
    chat = task.as_prompt_completion([{"question": "What is 1 + 1?", "answer": 2}])
    assert chat[0]["completion"][0]["content"] == "<answer>2</answer>"
    assert task.check("<answer>2</answer>", 2)


def test_builders_follow_the_split():
    task = ArithmeticTask()
    test_questions = {_key(p) for p in task.make_problems(1000, split="test")}
    train_prompts = task.as_prompt_only(300, split="train")["prompt"]
    assert not {p[-1]["content"] for p in train_prompts} & test_questions


def test_builders_reject_malformed_problems():
    with pytest.raises(DataError, match="row 1"):
        ArithmeticTask().as_text([{"question": "What is 1 + 1?", "answer": 2}, {"q": "x"}])


# ----------------------------------------------------------------------------- registry


def test_registry():
    assert "arithmetic" in TASKS
    task = get_task("arithmetic", max_operand=9, ops=("+",))
    assert isinstance(task, ArithmeticTask) and task.max_operand == 9 and task.ops == ("+",)
    with pytest.raises(ConfigError, match="unknown task"):
        get_task("chess")
    with pytest.raises(ConfigError, match="does not accept"):
        get_task("arithmetic", difficulty=3)


def test_preference_pairs_can_reject_other_problems_answers():
    task = get_task("arithmetic", max_operand=9, ops=("+",))
    problems = task.make_problems(50, split="train", seed=3)
    data = task.as_preference(problems, seed=3, rejected="other_answer")
    answers = {str(p["answer"]) for p in problems}
    for row, problem in zip(data, problems):
        chosen, rejected = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
        assert chosen == str(problem["answer"])
        assert rejected != chosen and rejected in answers
    assert data.to_list() == task.as_preference(problems, seed=3, rejected="other_answer").to_list()
    with pytest.raises(DataError, match="rejected"):
        task.as_preference(problems, rejected="random")
    same = [problems[0]] * 3
    with pytest.raises(DataError, match="two different answers"):
        task.as_preference(same, rejected="other_answer")
