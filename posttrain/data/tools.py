"""Tool-calling rows: the ``tools`` column (TRL's name) and checks that the chat template renders
what such rows hold.

A row's ``tools`` is a list of JSON schemas (``{"type": "function", "function": {"name", "description",
"parameters"}}``, or the bare ``{"name", ...}``), or a JSON string holding such a list; it is passed to
the chat template with the row's messages, as its ``chat_template_kwargs`` are.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from posttrain.data.template_checks import check_prefix_preserving
from posttrain.data.templates import Messages, apply_chat_template_text, without_nulls
from posttrain.errors import ConfigError, DataError

logger = logging.getLogger("posttrain")

TOOLS_COLUMN = "tools"
_EXPECTED = "a list of tool schemas ({'type': 'function', 'function': {'name': ..., 'parameters': ...}}) or a JSON string of one"
_TEMPLATE_FIX = ("use a chat template that renders tools and tool calls (the model's own tool-calling template, "
                 "passed with chat_template_path), or drop the 'tools' column and the tool calls")


def parse_tools(value: Any) -> list[dict[str, Any]] | None:
    """One row's tools as a list of schemas, or None when the row has none (None, ``[]``, blank).

    Keys whose value is None are dropped at any depth: Arrow stores every schema of a column with
    the union of their keys, so a schema read back holds its neighbours' parameter names as None
    (keep a null on purpose by storing the tools as a JSON string).

    Raises:
        DataError: not a list (or JSON of one), bad JSON, or an entry without a function name
            (without the row: the caller adds it).
    """
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(f"the tools are not valid JSON ({error.msg} at character {error.pos})",
                            expected=_EXPECTED, found=value,
                            fix="store the tools as a JSON list of schemas (json.dumps(tools))") from None
        if value is None:
            return None
    if not isinstance(value, (list, tuple)):
        raise DataError("the tools are not a list", expected=_EXPECTED, found=f"{type(value).__name__} {value!r}",
                        fix="wrap a single schema in a list: [schema]")
    tools = []
    for index, entry in enumerate(value):
        function = entry.get("function", entry) if isinstance(entry, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"tool {index} has no function name", expected=_EXPECTED, found=entry,
                            fix="give every tool schema a name: {'type': 'function', 'function': {'name': ..., "
                            "'description': ..., 'parameters': {...}}}")
        tools.append(without_nulls(entry))
    return tools or None


def row_tools(values: list[Any] | None, indices: list[int], *, source: str) -> list[list[dict[str, Any]] | None]:
    """:func:`parse_tools` of a batch's ``tools`` values (None: the dataset has no such column)."""
    if values is None:
        return [None] * len(indices)
    parsed = []
    for row, value in zip(indices, values):
        try:
            parsed.append(parse_tools(value))
        except DataError as error:
            raise DataError(error.problem, source=source, row=row, column=TOOLS_COLUMN, expected=error.expected,
                            found=error.found, fix=error.fix) from None
    return parsed


def calls_tools(messages: Any) -> bool:
    """True when a message of ``messages`` (a conversation) holds tool calls."""
    return isinstance(messages, list) and any(isinstance(m, dict) and m.get("tool_calls") for m in messages)


class ToolTemplateCheck:
    """Checks, on a dataset's first rows that use them, that the chat template renders tool schemas
    and tool calls (a template that ignores them trains the model on text without them).

    Args:
        continuity: also run :func:`check_prefix_preserving` on the first tool row: ``"error"``
            raises its ConfigError, ``"warn"`` logs it once, None skips it.
    """

    def __init__(self, tokenizer: Any, *, source: str, continuity: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.source = source
        self.continuity = continuity
        self.checked_tools = self.checked_calls = False

    def __call__(self, messages: Messages, tools: list[dict[str, Any]] | None, template_kwargs: dict | None) -> None:
        """Check one row (its whole conversation) if it is the first with tools or tool calls."""
        has_calls = calls_tools(messages)
        if (not tools or self.checked_tools) and (not has_calls or self.checked_calls):
            return
        render = lambda msgs, schemas: apply_chat_template_text(  # noqa: E731
            self.tokenizer, msgs, tools=schemas, template_kwargs=template_kwargs)
        text = render(messages, tools)
        if tools and not self.checked_tools:
            if render(messages, None) == text:
                raise ConfigError(
                    f"the chat template does not render tool schemas: {self.source} has a '{TOOLS_COLUMN}' column, "
                    "but a row renders to the same text with and without its tools", field="chat_template_path",
                    fix=_TEMPLATE_FIX)
            self.checked_tools = True
        if has_calls and not self.checked_calls:
            stripped = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
            if render(stripped, tools) == text:
                raise ConfigError(
                    f"the chat template drops tool calls: a conversation of {self.source} renders to the same text "
                    "with and without its assistant 'tool_calls'", field="chat_template_path", fix=_TEMPLATE_FIX)
            self.checked_calls = True
        if self.continuity is not None:
            self._check_continuity(tools, template_kwargs)

    def _check_continuity(self, tools: list[dict[str, Any]] | None, template_kwargs: dict | None) -> None:
        continuity, self.continuity = self.continuity, None  # once per dataset
        try:
            check_prefix_preserving(self.tokenizer, tools=tools, template_kwargs=template_kwargs)
        except ConfigError as error:
            if continuity == "error":
                raise
            logger.warning("%s: %s (the rows are trained as the template renders them whole)", self.source, error)


def require_conversational_for_tools(column_names: list[str], conversational: bool, *, source: str) -> None:
    """Tools reach the model only through a chat template: refuse a ``tools`` column beside plain text."""
    if TOOLS_COLUMN in column_names and not conversational:
        raise DataError(
            f"a '{TOOLS_COLUMN}' column needs conversational data (the chat template renders the tools), "
            "but the text columns hold plain strings", source=source, column=TOOLS_COLUMN,
            expected="conversations (lists of {'role', 'content'} messages)", found="text values",
            fix="store the rows as conversations, or write the tools into the text and drop the 'tools' column")
