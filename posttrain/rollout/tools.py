"""Tools a policy may call while it samples: their schemas, the calls it writes, and running them safely.

* :func:`tool_schema` turns a Python callable (type hints + a Google-style docstring) into the JSON
  schema a chat template renders (``transformers.utils.get_json_schema``, the field's own reader).
* :func:`parse_tool_calls` finds Hermes-style ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks in a completion; a block that is not valid JSON becomes a call carrying an error message,
  which goes back to the model like any tool error.
* :class:`ToolExecutor` runs a batch of calls concurrently, each with a timeout: a tool that raises,
  hangs or does not exist yields an ``"error: ..."`` message for the model and counts as a failure;
  the run never stops or blocks on it.

Each call runs in its own daemon thread, not in a ``concurrent.futures`` pool: a pool's workers are
joined when the interpreter exits, so one hung tool would keep a finished run (or a test session)
alive forever; a daemon thread is abandoned instead. Async tools run on an event loop inside their
thread under ``asyncio.wait_for`` with the same timeout.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from posttrain.errors import ConfigError

TOOL_CALL_PATTERN = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
DEFAULT_TOOL_TIMEOUT = 30.0


def tool_schema(tool: Callable) -> dict[str, Any]:
    """The JSON schema of ``tool`` (``{"type": "function", "function": {name, description, parameters}}``).

    Read from the name, the docstring's first paragraph, its ``Args:`` section and the type hints, as
    ``transformers`` does for ``apply_chat_template(tools=[...])``. A callable the reader cannot
    describe (no docstring, an argument without a hint or description) is a ConfigError naming it.
    """
    from transformers.utils import get_json_schema

    name = getattr(tool, "__name__", type(tool).__name__)
    try:
        return get_json_schema(tool)
    except Exception as error:  # transformers raises its own TypeError subclasses; say which tool and why
        raise ConfigError(
            f"cannot build a JSON schema for tool {name!r}: {error}", field="tools",
            fix="give the function a docstring with a summary line and an 'Args:' entry per argument, "
            "and a type hint on every argument",
        ) from None


def tool_name(tool: Callable) -> str:
    return getattr(tool, "__name__", type(tool).__name__)


@dataclass
class ToolCall:
    """One call the model wrote: ``name`` and ``arguments``, or ``error`` when the block could not be read."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def as_message(self) -> dict[str, Any]:
        """The call as a chat message's ``tool_calls`` entry."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>...</tool_call>`` block of ``text``, in order.

    The block holds JSON ``{"name": str, "arguments": object}`` (``arguments`` may also be a JSON
    string, as some models write it). A block that is not such an object gives a :class:`ToolCall`
    whose ``error`` says what was wrong; it is answered with that message instead of a tool result.
    """
    calls = []
    for match in TOOL_CALL_PATTERN.finditer(text):
        body = match.group(1).strip()
        try:
            payload = json.loads(body)
        except json.JSONDecodeError as error:
            calls.append(ToolCall(name="unknown", error=f"error: the tool call is not valid JSON ({error.msg} at "
                                                        f"character {error.pos}): {body[:200]}"))
            continue
        name = payload.get("name") if isinstance(payload, dict) else None
        arguments = payload.get("arguments", {}) if isinstance(payload, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(name, str) or not name or not isinstance(arguments, dict):
            calls.append(ToolCall(name=name if isinstance(name, str) and name else "unknown",
                                  error='error: a tool call must be {"name": "<tool>", "arguments": {...}}, got '
                                        f"{body[:200]}"))
            continue
        calls.append(ToolCall(name=name, arguments=arguments))
    return calls


@dataclass
class ToolResult:
    """What one call returned, as the text the model reads, and how it went."""

    name: str
    arguments: dict[str, Any]
    content: str
    failed: bool = False
    timed_out: bool = False
    seconds: float = 0.0

    def as_message(self) -> dict[str, Any]:
        return {"role": "tool", "name": self.name, "content": self.content}


def result_text(value: Any) -> str:
    """A tool's return value as the text of a tool message: strings as they are, anything else as JSON
    when it can be written so (``str`` otherwise)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


class _Running:
    """One call under way in its own daemon thread."""

    def __init__(self, tool: Callable, arguments: dict[str, Any], timeout: float) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.async_timed_out = False
        self.started = time.perf_counter()
        self.thread = threading.Thread(target=self._run, args=(tool, arguments, timeout), daemon=True,
                                       name=f"tool-{tool_name(tool)}")
        self.thread.start()

    def _run(self, tool: Callable, arguments: dict[str, Any], timeout: float) -> None:
        try:
            if inspect.iscoroutinefunction(tool):
                self.value = asyncio.run(asyncio.wait_for(tool(**arguments), timeout))
            else:
                self.value = tool(**arguments)
                if inspect.isawaitable(self.value):
                    self.value = asyncio.run(asyncio.wait_for(self.value, timeout))
        except (asyncio.TimeoutError, TimeoutError) as error:
            self.async_timed_out = True
            self.error = error
        except BaseException as error:  # noqa: BLE001 - a tool's failure is a message to the model
            self.error = error


class ToolExecutor:
    """Runs the tool calls of a batch of episodes concurrently, each with a timeout.

    Args:
        timeout: seconds one call may take (``tool_timeout``); past it the model reads
            ``"error: tool NAME timed out after N s"`` and the call counts as failed.
    """

    def __init__(self, timeout: float = DEFAULT_TOOL_TIMEOUT) -> None:
        if timeout is None or not timeout > 0:
            raise ConfigError(f"tool_timeout must be > 0 seconds, got {timeout!r}", field="tool_timeout",
                              fix="give the most seconds a tool call may take, e.g. 30")
        self.timeout = float(timeout)

    def run(self, calls: Sequence[ToolCall], tools: Mapping[str, Callable]) -> list[ToolResult]:
        """One :class:`ToolResult` per call (same order), all calls started at once."""
        return self.run_batch([(call, tools) for call in calls])

    def run_batch(self, jobs: Sequence[tuple[ToolCall, Mapping[str, Callable]]]) -> list[ToolResult]:
        """Each job is a call and the tools of its episode; every call starts before any is waited for."""
        started: list[_Running | ToolResult] = []
        for call, tools in jobs:
            if call.error is not None:
                started.append(ToolResult(call.name, call.arguments, call.error, failed=True))
            elif call.name not in tools:
                known = ", ".join(sorted(tools)) or "none"
                started.append(ToolResult(call.name, call.arguments,
                                          f"error: no tool named {call.name!r}; the tools are: {known}", failed=True))
            else:
                started.append(_Running(tools[call.name], call.arguments, self.timeout))
        results = []
        for (call, _), running in zip(jobs, started):
            results.append(running if isinstance(running, ToolResult) else self._collect(call, running))
        return results

    def _collect(self, call: ToolCall, running: _Running) -> ToolResult:
        remaining = self.timeout - (time.perf_counter() - running.started)
        running.thread.join(max(remaining, 0.0))
        seconds = time.perf_counter() - running.started
        if running.thread.is_alive() or running.async_timed_out:
            message = f"error: tool {call.name} timed out after {self.timeout:g} s"
            return ToolResult(call.name, call.arguments, message, failed=True, timed_out=True, seconds=seconds)
        if running.error is not None:
            error = running.error
            text = f"error: tool {call.name} raised {type(error).__name__}: {error}"
            return ToolResult(call.name, call.arguments, text, failed=True, seconds=seconds)
        return ToolResult(call.name, call.arguments, result_text(running.value), seconds=seconds)


def tools_by_name(tools: Sequence[Callable]) -> dict[str, Callable]:
    """``{name: tool}``; two tools with one name are a ConfigError (the model could not tell them apart)."""
    named: dict[str, Callable] = {}
    for tool in tools:
        if not callable(tool):
            raise ConfigError(f"tools must be callables, got {type(tool).__name__}", field="tools",
                              fix="pass functions (sync or async) with type hints and a docstring")
        name = tool_name(tool)
        if name in named and named[name] != tool:  # bound methods are new objects on each lookup
            raise ConfigError(f"two tools are named {name!r}", field="tools", fix="give each tool its own name")
        named[name] = tool
    return named
