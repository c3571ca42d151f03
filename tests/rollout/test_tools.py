"""Tools: schemas from callables, parsing the calls a model writes, and running them with timeouts."""

import asyncio
import threading
import time

import pytest

from posttrain.errors import ConfigError
from posttrain.rollout.tools import ToolCall, ToolExecutor, parse_tool_calls, tool_schema, tools_by_name


def multiply(a: int, b: float = 2.0) -> float:
    """Multiply two numbers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


async def slow_echo(text: str) -> str:
    """Echo text after a pause.

    Args:
        text: what to echo
    """
    await asyncio.sleep(0.01)
    return text


def test_schema_reads_name_summary_argument_descriptions_and_types():
    schema = tool_schema(multiply)["function"]
    assert schema["name"] == "multiply" and schema["description"] == "Multiply two numbers."
    properties = schema["parameters"]["properties"]
    assert properties["a"] == {"type": "integer", "description": "the first factor"}
    assert properties["b"]["type"] == "number"
    assert schema["parameters"]["required"] == ["a"]


def test_schema_of_an_undocumented_tool_is_a_config_error_naming_it():
    def bare(x):
        return x

    with pytest.raises(ConfigError, match="bare"):
        tool_schema(bare)


def test_parse_reads_every_block_and_string_arguments():
    text = ('I will call.\n<tool_call>\n{"name": "multiply", "arguments": {"a": 3}}\n</tool_call>'
            '<tool_call>{"name": "slow_echo", "arguments": "{\\"text\\": \\"hi\\"}"}</tool_call>')
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments, c.error) for c in calls] == [("multiply", {"a": 3}, None), ("slow_echo", {"text": "hi"}, None)]
    assert parse_tool_calls("no calls here") == []


@pytest.mark.parametrize("body", ['{"name": "multiply", "arguments": {"a": 3}', '["multiply"]', '{"arguments": {}}',
                                  '{"name": "multiply", "arguments": 5}'])
def test_malformed_calls_become_error_messages(body):
    (call,) = parse_tool_calls(f"<tool_call>{body}</tool_call>")
    assert call.error is not None and call.error.startswith("error: ")
    (result,) = ToolExecutor(timeout=1).run([call], {"multiply": multiply})
    assert result.failed and result.content == call.error


def test_sync_and_async_tools_run_and_errors_become_messages():
    def broken(x: int) -> int:
        """Always fails.

        Args:
            x: ignored
        """
        raise ValueError("no luck")

    tools = tools_by_name([multiply, slow_echo, broken])
    calls = [ToolCall("multiply", {"a": 3, "b": 1.5}), ToolCall("slow_echo", {"text": "hi"}), ToolCall("broken", {"x": 1}),
             ToolCall("missing", {}), ToolCall("multiply", {"c": 1})]
    results = ToolExecutor(timeout=5).run(calls, tools)
    assert [r.content for r in results[:2]] == ["4.5", "hi"]
    assert [r.failed for r in results] == [False, False, True, True, True]
    assert results[2].content == "error: tool broken raised ValueError: no luck"
    assert "no tool named 'missing'" in results[3].content and "multiply" in results[3].content
    assert "TypeError" in results[4].content  # a wrong argument name is the model's mistake, not a crash


def test_a_hung_tool_times_out_without_blocking_the_others():
    release = threading.Event()

    def hang() -> str:
        """Never returns on its own."""
        release.wait()
        return "late"

    async def hang_async() -> str:
        """Never returns on its own."""
        await asyncio.sleep(3600)
        return "late"

    executor = ToolExecutor(timeout=0.2)
    started = time.perf_counter()
    results = executor.run([ToolCall("hang", {}), ToolCall("hang_async", {}), ToolCall("multiply", {"a": 2})],
                           {"hang": hang, "hang_async": hang_async, "multiply": multiply})
    elapsed = time.perf_counter() - started
    release.set()  # let the abandoned thread finish
    assert [r.timed_out for r in results] == [True, True, False]
    assert results[0].content == "error: tool hang timed out after 0.2 s"
    assert results[1].content == "error: tool hang_async timed out after 0.2 s"
    assert results[2].content == "4.0"
    assert elapsed < 2.0  # the calls ran concurrently: one timeout, not two


def test_tools_run_concurrently():
    def nap(seconds: float) -> str:
        """Sleep.

        Args:
            seconds: how long
        """
        time.sleep(seconds)
        return "ok"

    started = time.perf_counter()
    results = ToolExecutor(timeout=5).run([ToolCall("nap", {"seconds": 0.3})] * 4, {"nap": nap})
    assert [r.content for r in results] == ["ok"] * 4
    assert time.perf_counter() - started < 1.0  # 4 x 0.3 s in sequence would take 1.2 s


def test_two_tools_with_one_name_and_a_bad_timeout_are_config_errors():
    def multiply_again(a: int) -> int:
        """x.

        Args:
            a: x
        """
        return a

    multiply_again.__name__ = "multiply"
    with pytest.raises(ConfigError, match="two tools"):
        tools_by_name([multiply, multiply_again])
    with pytest.raises(ConfigError, match="tool_timeout"):
        ToolExecutor(timeout=0)
