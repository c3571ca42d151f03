from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from posttrain.errors import ConfigError, DataError
from posttrain.tasks.tool_use import (
    INVENTORY,
    KINDS,
    TOOLS,
    ToolFaults,
    ToolUseEnv,
    ToolUseTask,
    completion_calls,
    make_tools,
    tool_answer_reward,
    tool_call_reward,
    tool_format_reward,
    tool_schemas,
    turn_rewards,
)


def _oracle_completion(task: ToolUseTask, problem: dict) -> list[dict]:
    return task.oracle_messages(problem)[1:]


def _solve_independently(question: str) -> int:
    """The answer worked out from the question text alone, without the task's tools."""
    words = question.rstrip("?").split()
    if question.startswith("What is"):
        a, op, b = int(words[2]), words[3], int(words[4])
        return a + b if op == "+" else a * b
    if question.startswith("How much does one"):
        return INVENTORY[words[4]]
    if " and one " in question:
        return INVENTORY[words[4]] + INVENTORY[words[7]]
    return int(words[3]) * INVENTORY[words[4][:-1]]


# ----------------------------------------------------------------------------- problems


def test_generation_is_seeded_and_splits_are_disjoint():
    task = ToolUseTask()
    problems = task.make_problems(200, seed=3)
    assert problems == ToolUseTask().make_problems(200, seed=3)
    assert problems != task.make_problems(200, seed=4)
    assert {p["kind"] for p in problems} == set(KINDS)
    test = task.make_problems(200, seed=3, split="test")
    assert not {p["question"] for p in problems} & {p["question"] for p in test}
    assert ToolUseTask(seed=1).make_problems(50, split="test") != test[:50]  # the task seed moves the split


def test_oracle_calls_solve_every_problem_through_the_environment():
    task = ToolUseTask(max_operand=99)
    env = task.environment()
    for problem in task.make_problems(150, split="train") + task.make_problems(50, split="test"):
        env.reset(**problem)
        calls = json.loads(problem["oracle_calls"])
        results = [json.loads(env.call(call["name"], call["arguments"])) for call in calls]
        assert results[-1] == problem["answer"] == _solve_independently(problem["question"])
        assert env.get_turn_rewards() == [1.0] * len(results) and env.get_reward() == 1.0


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError):
        ToolUseTask(kinds=("divide",))
    with pytest.raises(ConfigError):
        ToolUseTask(max_operand=5, min_operand=10)
    with pytest.raises(ConfigError):
        ToolUseTask().make_problems(3, split="dev")
    with pytest.raises(DataError):
        ToolUseTask().as_prompt_only(3, conversational=False)


# ----------------------------------------------------------------------------- rewards


def test_rewards_score_oracle_completions_one_and_wrong_ones_zero():
    task = ToolUseTask()
    problems = task.make_problems(30, seed=1)
    oracle = [_oracle_completion(task, p) for p in problems]
    answers = [p["answer"] for p in problems]
    calls = [p["oracle_calls"] for p in problems]
    assert tool_answer_reward(oracle, answers) == [1.0] * 30
    assert tool_format_reward(oracle) == [1.0] * 30
    assert tool_call_reward(oracle, calls) == [1.0] * 30
    assert all(task.check(c, a) for c, a in zip(oracle, answers))

    wrong_answer = [c[:-1] + [{"role": "assistant", "content": str(a + 1)}] for c, a in zip(oracle, answers)]
    assert tool_answer_reward(wrong_answer, answers) == [0.0] * 30
    no_tools = [[{"role": "assistant", "content": str(a)}] for a in answers]  # right number, no call
    assert tool_format_reward(no_tools) == [0.0] * 30
    assert tool_call_reward(no_tools, calls) == [0.0] * 30
    # a call with a wrong argument, written as text as a model would, and left unanswered
    text = '\n<tool_call>\n{"name": "lookup", "arguments": {"item": "nothing"}}\n</tool_call>'
    assert tool_call_reward([text], ['[{"name": "lookup", "arguments": {"item": "lamp"}}]']) == [0.0]
    assert tool_answer_reward([text], [66]) == [0.0]
    broken = '<tool_call>\n{"name": "lookup", "arguments": \n</tool_call>\n66'
    assert completion_calls(broken) == [None] and tool_format_reward([broken]) == [0.0]


def test_turn_rewards_mark_each_call_against_the_oracle():
    oracle = [{"name": "lookup", "arguments": {"item": "lamp"}}, {"name": "multiply", "arguments": {"a": 66, "b": 3}}]
    right_then_wrong = [{"name": "lookup", "arguments": {"item": "Lamp"}},
                        {"name": "multiply", "arguments": {"a": 66, "b": 4}}]
    assert turn_rewards(right_then_wrong, oracle) == [1.0, 0.0]
    assert turn_rewards(oracle[:1], oracle) == [1.0, 0.0]  # a missing call scores 0
    assert turn_rewards(oracle + oracle[:1], oracle) == [1.0, 1.0, 0.0]  # so does an extra one
    env = ToolUseEnv()
    env.reset(oracle_calls=json.dumps(oracle))
    assert env.call("lookup", {"item": "lamp"}) == "66"
    assert env.call("multiply", {"a": 66, "b": 2}) == "132"
    assert env.get_turn_rewards() == [1.0, 0.0] and env.get_reward() == 0.5


def test_tool_errors_come_back_as_text():
    env = ToolUseEnv()
    env.reset()
    assert env.call("divide", {"a": 1, "b": 2}).startswith("error: unknown tool")
    assert env.call("lookup", {"item": "unicorn"}).startswith("error: KeyError")
    assert env.call("add", {"a": 1}).startswith("error: TypeError")


# ----------------------------------------------------------------------------- schemas and templates


def test_schemas_come_from_the_functions_and_the_environment_alike():
    from transformers.utils import get_json_schema

    schemas = tool_schemas()
    assert [s["function"]["name"] for s in schemas] == list(TOOLS)
    assert schemas[0]["function"]["parameters"]["properties"]["a"]["type"] == "integer"
    env = ToolUseEnv()
    assert [get_json_schema(getattr(env, name)) for name in TOOLS] == schemas
    assert [get_json_schema(tool) for tool in make_tools(ToolFaults(delay_seconds=0.1))] == schemas


def test_sft_rows_render_through_the_tiny_template_with_tool_schemas(tiny_tokenizer):
    task = ToolUseTask()
    problems = [p for p in task.make_problems(40) if p["kind"] == "price_times"][:2]
    rows = task.as_tool_messages(problems)
    assert rows[0]["tools"] == tool_schemas()
    # JSON columns keep each call's own argument names (no null-filled union of every tool's arguments)
    calls = json.loads(problems[0]["oracle_calls"])
    assert rows[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == calls[0]["arguments"]
    text = tiny_tokenizer.apply_chat_template(rows[0]["messages"], tools=rows[0]["tools"], tokenize=False)
    assert '<tools>\n{"type": "function", "function": {"name": "add"' in text
    answer = problems[0]["answer"]
    assert f'<tool_call>\n{json.dumps(calls[1])}\n</tool_call><|im_end|>\n<|im_start|>tool\n{answer}' in text

    turns = task.as_turn_completions(problems, tiny_tokenizer)
    assert len(turns) == 3 * len(problems)  # two calls and an answer each
    for row in turns.select(range(3)):  # each turn's prompt and completion are a prefix of the whole conversation
        assert text.startswith(row["prompt"] + row["completion"])
    assert [row["completion"] for row in turns.select(range(3))] == [
        f"\n<tool_call>\n{json.dumps(calls[0])}\n</tool_call><|im_end|>\n",
        f"\n<tool_call>\n{json.dumps(calls[1])}\n</tool_call><|im_end|>\n",
        f"{problems[0]['answer']}<|im_end|>\n"]
    assert all("<|im_start|>tool" not in row["completion"] for row in turns)  # no loss on tool results


def test_a_task_offers_only_the_tools_its_kinds_call(tiny_tokenizer):
    assert ToolUseTask().tool_names() == tuple(TOOLS)
    assert ToolUseTask(kinds=("add",)).tool_names() == ("add",)
    assert ToolUseTask(kinds=("price_times", "price")).tool_names() == ("multiply", "lookup")
    task = ToolUseTask(kinds=("add",))
    assert [get_name(s) for s in tool_schemas(task.tool_names())] == ["add"]
    assert [tool.__name__ for tool in make_tools(names=("lookup",))] == ["lookup"]
    rows = task.as_tool_messages(task.make_problems(2))
    assert [get_name(s) for s in rows[0]["tools"]] == ["add"]
    prompt = task.as_turn_completions(task.make_problems(1), tiny_tokenizer)[0]["prompt"]
    assert '"name": "add"' in prompt and '"name": "lookup"' not in prompt and '"name": "multiply"' not in prompt


def get_name(schema: dict) -> str:
    return schema["function"]["name"]


# ----------------------------------------------------------------------------- slow and hanging tools


def test_slow_tools_take_their_delay():
    slow_multiply = make_tools(ToolFaults(delay_seconds=0.2))[1]
    started = time.perf_counter()
    assert slow_multiply(a=12, b=11) == 132
    assert time.perf_counter() - started >= 0.2


def test_hanging_calls_are_seeded_and_return_once_released():
    faults = ToolFaults(hang_rate=0.5, seed=7)
    pattern = [faults.hangs(i) for i in range(40)]
    assert pattern == [ToolFaults(hang_rate=0.5, seed=7).hangs(i) for i in range(40)]
    assert pattern != [ToolFaults(hang_rate=0.5, seed=8).hangs(i) for i in range(40)]
    assert 5 < sum(pattern) < 35

    env = ToolUseEnv(ToolFaults(hang_rate=1.0, hang_seconds=30))
    env.reset()
    results: list[str] = []
    worker = threading.Thread(target=lambda: results.append(env.call("add", {"a": 2, "b": 3})), daemon=True)
    worker.start()
    worker.join(timeout=0.3)
    assert worker.is_alive() and results == []  # hangs: a caller's timeout must fire
    env.faults.release()
    worker.join(timeout=5)
    assert results == ["5"]
    capped = make_tools(ToolFaults(hang_rate=1.0, hang_seconds=0.1))[0]
    assert capped(a=1, b=1) == 2  # a hang never outlives hang_seconds


# ----------------------------------------------------------------------------- the evaluation loop


class _OracleModel(torch.nn.Module):
    """Writes the oracle's next turn for whatever question the prompt holds (a scripted policy)."""

    def __init__(self, tokenizer, task, problems):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.task = tokenizer, task
        self.turns = {p["question"]: [m for m in task.oracle_messages(p) if m["role"] == "assistant"] for p in problems}

    def generate(self, input_ids, attention_mask, generation_config):
        rows = []
        for ids in input_ids:
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            question = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
            turn = self.turns[question][text.count("<|im_start|>assistant") - 1]
            calls = "".join(f"\n<tool_call>\n{json.dumps(call['function'])}\n</tool_call>"
                            for call in turn.get("tool_calls", []))
            rows.append(ids.tolist() + self.tokenizer(turn["content"] + calls + "<|im_end|>")["input_ids"])
        width = max(map(len, rows))
        return torch.tensor([row + [self.tokenizer.pad_token_id] * (width - len(row)) for row in rows])


def test_evaluation_runs_tools_and_scores_the_oracle_policy(tiny_tokenizer):
    from posttrain.eval.tool_use import evaluate_with_tools

    task = ToolUseTask()
    problems = task.make_problems(6, split="test")
    oracle = _OracleModel(tiny_tokenizer, task, problems)
    result = evaluate_with_tools(oracle, tiny_tokenizer, task, problems, batch_size=4)
    assert result["accuracy"] == 1.0 and result["call_accuracy"] == 1.0
    assert result["samples"][0]["messages"] == _oracle_completion(task, problems[0])
    # two iterations allowed: the three-call problems end on a call, without an answer
    capped = evaluate_with_tools(oracle, tiny_tokenizer, task, problems, max_iterations=2)
    assert capped["accuracy"] == sum(len(json.loads(p["oracle_calls"])) <= 2 for p in problems) / len(problems)
    # without tools the calls are not run, so no episode reaches its answer
    assert evaluate_with_tools(oracle, tiny_tokenizer, task, problems, use_tools=False)["accuracy"] == 0.0


def test_evaluation_prompts_offer_only_the_tools_the_task_calls(tiny_tokenizer):
    from posttrain.eval.tool_use import evaluate_with_tools

    class Recording(_OracleModel):
        def generate(self, input_ids, attention_mask, generation_config):
            self.prompts = [self.tokenizer.decode(ids) for ids in input_ids]
            return super().generate(input_ids, attention_mask, generation_config)

    task = ToolUseTask(kinds=("add",))
    problems = task.make_problems(2, split="test")
    model = Recording(tiny_tokenizer, task, problems)
    assert evaluate_with_tools(model, tiny_tokenizer, task, problems)["accuracy"] == 1.0
    assert all('"name": "add"' in p and '"name": "lookup"' not in p for p in model.prompts)


def test_evaluation_runs_on_a_tiny_model(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from posttrain.eval.tool_use import evaluate_with_tools

    task = ToolUseTask()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    result = evaluate_with_tools(model, tiny_tokenizer, task, task.make_problems(2, split="test"), max_new_tokens=8)
    assert result["n"] == 2 and 0.0 <= result["accuracy"] <= 1.0 and result["turns"] >= 1
