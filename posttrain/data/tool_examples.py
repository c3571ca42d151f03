"""A few tool-calling rows in TRL's layout (``messages`` or ``prompt``/``chosen``/``rejected``, plus
``tools``), for tests and documentation examples. Not a task to learn: see ``posttrain.tasks``.
"""

from __future__ import annotations

import copy
import json
from typing import Any

TOOL_SCHEMAS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}},
    {"type": "function", "function": {
        "name": "lookup", "description": "Read the value stored under a key.",
        "parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}}},
]


def tool_call(name: str, **arguments: Any) -> dict[str, Any]:
    """An assistant message that calls ``name`` with ``arguments`` and says nothing else."""
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


def tool_conversations(tools_as_json: bool = False) -> list[dict[str, Any]]:
    """Three SFT rows: two that call a tool and use its result, one answered without a tool.

    Args:
        tools_as_json: store ``tools`` as a JSON string (as files often do) instead of a list.
    """
    tools = json.dumps(TOOL_SCHEMAS) if tools_as_json else copy.deepcopy(TOOL_SCHEMAS)
    conversations = [
        [{"role": "user", "content": "What is 12 plus 30?"}, tool_call("add", a=12, b=30),
         {"role": "tool", "name": "add", "content": "42"}, {"role": "assistant", "content": "12 plus 30 is 42."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour is the sky?"},
         tool_call("lookup", key="sky"), {"role": "tool", "name": "lookup", "content": "blue"},
         {"role": "assistant", "content": "Blue."}],
        [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}],
    ]
    return [{"messages": messages, "tools": copy.deepcopy(tools)} for messages in conversations]


def tool_preferences() -> list[dict[str, Any]]:
    """Two preference rows whose chosen completion calls a tool and whose rejected one guesses."""
    rows = [
        ("What is 17 plus 25?", tool_call("add", a=17, b=25), "It is 41."),
        ("What is stored under 'door'?", tool_call("lookup", key="door"), "Nothing, I think."),
    ]
    return [{"prompt": [{"role": "user", "content": question}], "chosen": [call],
             "rejected": [{"role": "assistant", "content": guess}], "tools": copy.deepcopy(TOOL_SCHEMAS)}
            for question, call, guess in rows]
