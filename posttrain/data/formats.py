"""Dataset formats: detect which one a dataset is in, and check every row before training starts.

The formats (columns in brackets):

- language modeling: ``[text]`` (the column name is configurable);
- prompt-completion: ``[prompt, completion]``;
- conversational: ``[messages]``, a list of ``{"role", "content"}`` messages;
- preference: ``[prompt, chosen, rejected]`` (explicit prompt) or ``[chosen, rejected]`` (implicit:
  both hold the whole text or conversation and share the prompt as their beginning);
- unpaired preference: ``[prompt, completion, label]`` with a boolean label;
- prompt-only: ``[prompt]``, plus any other columns (e.g. ``answer``) for reward functions.

Every text column of a format may instead hold conversations (lists of messages); all of a
dataset's text columns must then hold conversations.

Validation reads whole columns through Arrow, so it costs milliseconds per 100k rows; a column
whose type Arrow cannot check directly (mixed types stored as JSON) is walked in Python batches.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from posttrain.data.load import describe_source
from posttrain.data.streaming import STREAM_SAMPLE_ROWS, is_streaming, streamed_sample
from posttrain.data.templates import clean_messages
from posttrain.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
# roles whose empty content is a mistake; an empty system prompt is common and harmless
_ROLES_NEEDING_CONTENT = ("user", "assistant")
_ROLE_RENAMES = "e.g. 'human' -> 'user', 'gpt'/'bot' -> 'assistant'"


class DataFormat(str, Enum):
    """The shapes of data posttrain reads. A trainer says which ones it accepts."""

    LANGUAGE_MODELING = "language_modeling"
    PROMPT_COMPLETION = "prompt_completion"
    CONVERSATIONAL = "conversational"
    PREFERENCE = "preference"
    UNPAIRED_PREFERENCE = "unpaired_preference"
    PROMPT_ONLY = "prompt_only"

    def describe(self, text_field: str = "text") -> str:
        """E.g. ``prompt-completion (columns 'prompt', 'completion')``."""
        columns = {
            DataFormat.LANGUAGE_MODELING: f"'{text_field}'",
            DataFormat.PROMPT_COMPLETION: "'prompt', 'completion'",
            DataFormat.CONVERSATIONAL: "'messages'",
            DataFormat.PREFERENCE: "'chosen', 'rejected' and optionally 'prompt'",
            DataFormat.UNPAIRED_PREFERENCE: "'prompt', 'completion', 'label'",
            DataFormat.PROMPT_ONLY: "'prompt'",
        }[self]
        return f"{self.value.replace('_', '-')} (columns {columns})"


@dataclass
class FormatInfo:
    """What :func:`detect_format` found.

    Attributes:
        format: the format.
        conversational: the text columns hold lists of messages rather than strings.
        explicit_prompt: the prompt is its own column (prompt-completion, unpaired preference,
            prompt-only, and preference with a ``prompt`` column).
        columns: the columns the format reads, e.g. ``["prompt", "chosen", "rejected"]``.
    """

    format: DataFormat
    conversational: bool
    explicit_prompt: bool
    columns: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- detection


def _format_columns(fmt: DataFormat, column_names: Iterable[str], text_field: str) -> list[str] | None:
    """The columns ``fmt`` would read from a dataset with ``column_names``; ``None`` if some are missing."""
    names = set(column_names)
    required = {
        DataFormat.LANGUAGE_MODELING: [text_field],
        DataFormat.PROMPT_COMPLETION: ["prompt", "completion"],
        DataFormat.CONVERSATIONAL: ["messages"],
        DataFormat.PREFERENCE: ["chosen", "rejected"],
        DataFormat.UNPAIRED_PREFERENCE: ["prompt", "completion", "label"],
        DataFormat.PROMPT_ONLY: ["prompt"],
    }[fmt]
    if not names.issuperset(required):
        return None
    if fmt is DataFormat.PREFERENCE and "prompt" in names:
        return ["prompt", *required]
    return required


# most specific first: a dataset is read in the first format whose columns it has
_PRECEDENCE = (
    DataFormat.PREFERENCE,
    DataFormat.UNPAIRED_PREFERENCE,
    DataFormat.PROMPT_COMPLETION,
    DataFormat.CONVERSATIONAL,
    DataFormat.PROMPT_ONLY,
    DataFormat.LANGUAGE_MODELING,
)


def _readable_formats(column_names: list[str], text_field: str) -> list[DataFormat]:
    found = [f for f in _PRECEDENCE if _format_columns(f, column_names, text_field) is not None]
    if DataFormat.UNPAIRED_PREFERENCE in found:
        # training on every completion of a labelled dataset would learn the bad ones too
        found.remove(DataFormat.PROMPT_COMPLETION)
    return found


def _feature_is_conversation(feature: Any) -> bool | None:
    """From the schema: True for a list of structs (messages), False for a string, None if unsure."""
    if isinstance(feature, list):  # the older spelling of a list feature
        inner = feature[0] if feature else None
    else:
        inner = getattr(feature, "feature", None) if type(feature).__name__ in ("List", "LargeList", "Sequence") else None
    if inner is not None:
        if isinstance(inner, dict):
            return True  # even without 'role': validation then says which key is missing
        return None if type(inner).__name__ == "Json" else False
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        return False
    return None


def _value_is_conversation(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def _column_is_conversation(dataset, column: str) -> bool:
    from_schema = _feature_is_conversation(dataset.features[column])
    if from_schema is not None:
        return from_schema
    return len(dataset) > 0 and _value_is_conversation(dataset[0][column])


def _info_for(dataset, fmt: DataFormat, text_field: str) -> FormatInfo:
    columns = _format_columns(fmt, dataset.column_names, text_field) or []
    conversational = fmt is DataFormat.CONVERSATIONAL or (
        fmt is not DataFormat.LANGUAGE_MODELING and _column_is_conversation(dataset, columns[0])
    )
    explicit_prompt = "prompt" in columns
    return FormatInfo(fmt, conversational, explicit_prompt, columns)


def _no_format_error(dataset, text_field: str, source: str, accepted: Iterable[DataFormat] | None = None) -> DataError:
    formats = list(accepted) if accepted is not None else list(DataFormat)
    found = sorted(dataset.column_names)
    hint = ""
    if "conversations" in found:
        hint = " (a ShareGPT-style 'conversations' column: rename it to 'messages' and its " \
               "'from'/'value' keys to 'role'/'content')"
    return DataError(
        "the dataset's columns match no format accepted here" + hint,
        source=source,
        expected="one of: " + "; ".join(f.describe(text_field) for f in formats),
        found=f"columns {found}",
        fix="rename or add columns to match one of these formats (see docs/data-formats.md)",
    )


def detect_format(dataset, *, text_field: str = "text", source: str | None = None) -> FormatInfo:
    """Find the format of ``dataset`` from its column names and the type of its first row.

    Raises:
        DataError: no format matches; names the columns found and the formats there are.
    """
    source = source or describe_source(dataset)
    dataset = dataset.with_format(None)
    readable = _readable_formats(dataset.column_names, text_field)
    if not readable:
        raise _no_format_error(dataset, text_field, source)
    return _info_for(dataset, readable[0], text_field)


# ----------------------------------------------------------------------------- row checks
#
# Each check looks at one value and returns None, or (problem, expected, found, fix). The fast
# Arrow scans below only locate the first suspicious row; these checks word the error, so both
# paths report exactly the same thing.

Problem = tuple[str, str, str, str]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_value(value: Any) -> str:
    if isinstance(value, list):
        return f"a list ({_short(value)})"
    return f"{type(value).__name__} {_short(value)}"


def _text_problem(value: Any) -> Problem | None:
    if value is None:
        return ("missing value", "a string", "None", "fill the value in, or drop the row")
    if not isinstance(value, str):
        fix = "make every value of this column a string"
        if _value_is_conversation(value):
            fix = "use conversations (lists of messages) in all text columns, or strings in all of them"
        return ("wrong type", "a string", _describe_value(value), fix)
    if not value.strip():
        return ("empty text", "non-empty text", repr(value), "fill the text in, or drop the row")
    return None


def _messages_problem(value: Any, need_assistant: bool, turn_order: str | None = None) -> Problem | None:
    """``turn_order``: ``"user_first"`` for a whole conversation (a user turn must come before the
    first assistant turn), ``"has_user"`` for a prompt (it must hold a user turn), None: no check."""
    expected_list = "a list of {'role', 'content'} messages"
    if value is None:
        return ("missing value", expected_list, "None", "fill the conversation in, or drop the row")
    if not isinstance(value, list):
        return (
            "wrong type",
            expected_list,
            _describe_value(value),
            "use conversations (lists of messages) in all text columns, or strings in all of them",
        )
    if not value:
        return ("empty conversation", "at least one message", "[]", "drop the row or add its messages")
    has_assistant = has_user = False
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            return (f"message {index} is not an object", "{'role': ..., 'content': ...}", _describe_value(message),
                    "make every message a mapping with 'role' and 'content'")
        role = message.get("role")
        if role is None:
            return (f"message {index} has no 'role'", f"a role, one of {list(ROLES)}", _short(message),
                    "add a 'role' to every message")
        if role not in ROLES:
            return (f"message {index} has an unknown role", f"one of {list(ROLES)}", repr(role),
                    f"rename the role ({_ROLE_RENAMES})")
        if role == "assistant" and turn_order == "user_first" and not has_user:
            return (f"message {index} (assistant) comes before any user turn",
                    "a user message before the first assistant message", f"roles {[m.get('role') for m in value]}",
                    "start the conversation with the user's message (drop the leading assistant turn, or "
                    "move a greeting into the system prompt)")
        has_assistant |= role == "assistant"
        has_user |= role == "user"
        content = message.get("content")
        calls_tools = bool(message.get("tool_calls"))
        if content is None and not calls_tools:
            return (f"message {index} ({role}) has no 'content'", "a string", _short(message),
                    "add 'content' to every message")
        if content is not None and not isinstance(content, str):
            return (f"message {index} ({role}) has content of the wrong type", "a string",
                    _describe_value(content), "make message contents plain strings")
        if role in _ROLES_NEEDING_CONTENT and not calls_tools and not (content or "").strip():
            return (f"message {index} ({role}) is empty", "non-empty content", repr(content),
                    "fill the message in, or drop the row")
    if turn_order == "has_user" and not has_user:
        return ("the prompt has no user turn", "at least one message with role 'user'",
                f"roles {[m.get('role') for m in value]}", "add the user's message to the prompt")
    if need_assistant and not has_assistant:
        return ("the conversation has no assistant turn", "at least one message with role 'assistant'",
                f"roles {[m.get('role') for m in value]}",
                "add the assistant's reply: it is what the model learns to produce")
    return None


def _label_problem(value: Any) -> Problem | None:
    if value is None:
        return ("missing label", "true or false", "None", "fill the label in, or drop the row")
    if isinstance(value, bool) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return None
    return ("wrong label type", "true or false (or 1/0)", _describe_value(value),
            "use true for a desirable completion and false for an undesirable one")


def _number_problem(value: Any) -> Problem | None:
    if value is None:
        return ("missing value", "a number", "None", "fill the value in, or drop the row")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return ("wrong type", "a number", _describe_value(value), "make every value of this column a number")
    return None


# ----------------------------------------------------------------------------- fast Arrow scans


def _first_true(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def _is_string_type(arrow_type: pa.DataType) -> bool:
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(arrow_type)
    )


def _blank(strings: pa.Array) -> np.ndarray:
    """True where a string is empty or whitespace only (False where null)."""
    lengths = pc.utf8_length(pc.utf8_trim_whitespace(strings))
    return np.asarray(pc.fill_null(pc.equal(lengths, 0), False), dtype=bool)


_UNSURE = -1  # the Arrow type is not one the fast scan understands: walk the rows in Python


def _scan_text(array: pa.Array) -> int | None:
    if not _is_string_type(array.type):
        return _UNSURE
    bad = np.asarray(array.is_null(), dtype=bool) | _blank(array)
    return _first_true(bad)


def _scan_messages(array: pa.Array, need_assistant: bool, turn_order: str | None = None) -> int | None:
    list_type = array.type
    if not (pa.types.is_list(list_type) or pa.types.is_large_list(list_type)):
        return _UNSURE
    struct_type = list_type.value_type
    if not pa.types.is_struct(struct_type):
        return _UNSURE
    names = [struct_type.field(i).name for i in range(struct_type.num_fields)]
    if "role" not in names or "content" not in names:
        return _UNSURE
    if not _is_string_type(struct_type.field("role").type) or not _is_string_type(struct_type.field("content").type):
        return _UNSURE

    num_rows = len(array)
    lengths = np.asarray(pc.fill_null(pc.list_value_length(array), 0))
    row_bad = np.asarray(array.is_null(), dtype=bool) | (lengths == 0)
    flat = pc.list_flatten(array)
    parents = np.asarray(pc.list_parent_indices(array))
    children = dict(zip(names, flat.flatten()))
    role, content = children["role"], children["content"]

    if "tool_calls" in children:
        calls = children["tool_calls"]
        calls_tools = np.asarray(calls.is_valid(), dtype=bool)
        if pa.types.is_list(calls.type) or pa.types.is_large_list(calls.type):
            calls_tools &= np.asarray(pc.fill_null(pc.list_value_length(calls), 0)) > 0
    else:
        calls_tools = np.zeros(len(flat), dtype=bool)

    known_role = np.asarray(pc.fill_null(pc.is_in(role, value_set=pa.array(ROLES)), False), dtype=bool)
    needs_content = np.asarray(pc.fill_null(pc.is_in(role, value_set=pa.array(_ROLES_NEEDING_CONTENT)), False), dtype=bool)
    message_bad = ~known_role
    message_bad |= np.asarray(content.is_null(), dtype=bool) & ~calls_tools
    message_bad |= _blank(content) & needs_content & ~calls_tools
    if message_bad.any():
        row_bad[parents[message_bad]] = True
    is_assistant = np.asarray(pc.fill_null(pc.equal(role, "assistant"), False), dtype=bool)
    is_user = np.asarray(pc.fill_null(pc.equal(role, "user"), False), dtype=bool)
    if need_assistant:
        row_bad |= np.bincount(parents[is_assistant], minlength=num_rows)[:num_rows] == 0
    if turn_order == "has_user":
        row_bad |= np.bincount(parents[is_user], minlength=num_rows)[:num_rows] == 0
    elif turn_order == "user_first":
        # flat positions of each row's first user and first assistant message (past the end: none)
        first_user = np.full(num_rows, len(flat), dtype=np.int64)
        first_assistant = np.full(num_rows, len(flat), dtype=np.int64)
        positions = np.arange(len(flat), dtype=np.int64)
        np.minimum.at(first_user, parents[is_user], positions[is_user])
        np.minimum.at(first_assistant, parents[is_assistant], positions[is_assistant])
        row_bad |= first_assistant < first_user
    return _first_true(row_bad)


def _scan_label(array: pa.Array) -> int | None:
    if pa.types.is_boolean(array.type):
        return _first_true(np.asarray(array.is_null(), dtype=bool))
    if pa.types.is_integer(array.type):
        valid = pc.fill_null(pc.is_in(array, value_set=pa.array([0, 1], type=array.type)), False)
        return _first_true(~np.asarray(valid, dtype=bool))
    return _UNSURE


def _scan_number(array: pa.Array) -> int | None:
    if pa.types.is_integer(array.type) or pa.types.is_floating(array.type):
        return _first_true(np.asarray(array.is_null(), dtype=bool))
    return _UNSURE


# ----------------------------------------------------------------------------- validation


@dataclass
class _ColumnRule:
    column: str
    kind: str  # "text", "messages", "label" or "number"
    need_assistant: bool = False
    turn_order: str | None = None  # see _messages_problem

    def problem(self, value: Any) -> Problem | None:
        if self.kind == "text":
            return _text_problem(value)
        if self.kind == "messages":
            return _messages_problem(value, self.need_assistant, self.turn_order)
        if self.kind == "label":
            return _label_problem(value)
        return _number_problem(value)

    def scan(self, array: pa.Array) -> int | None:
        if self.kind == "text":
            return _scan_text(array)
        if self.kind == "messages":
            return _scan_messages(array, self.need_assistant, self.turn_order)
        if self.kind == "label":
            return _scan_label(array)
        return _scan_number(array)


def _rules_for(info: FormatInfo, column_names: list[str]) -> list[_ColumnRule]:
    text_kind = "messages" if info.conversational else "text"
    rules = []
    for column in info.columns:
        if column == "label":
            rules.append(_ColumnRule(column, "label"))
        elif info.format is DataFormat.LANGUAGE_MODELING:
            rules.append(_ColumnRule(column, "text"))
        else:
            # what the model learns to say must contain an assistant turn; a prompt need not, but a
            # conversation (whole, or prompt then completion) must give the user's turn first
            is_target = column in ("messages", "completion", "chosen", "rejected")
            whole_conversation = is_target and not info.explicit_prompt
            turn_order = "has_user" if column == "prompt" else "user_first" if whole_conversation else None
            rules.append(_ColumnRule(column, text_kind, need_assistant=is_target, turn_order=turn_order))
    if info.format is DataFormat.PREFERENCE and "margin" in column_names:
        rules.append(_ColumnRule("margin", "number"))
    return rules


def _is_json_type(arrow_type: pa.DataType) -> bool:
    """The type datasets gives a column whose values differ in type or keys (JSON text)."""
    return getattr(arrow_type, "extension_name", None) == "arrow.json"


def _json_messages_as_structs(array: pa.Array) -> pa.Array | None:
    """A list<json> column (messages whose keys differ from row to row, e.g. some with
    ``tool_calls``) re-typed as list<struct>, so the vectorised scan can check it; ``None`` if the
    messages do not fit one struct type (then the Python walk checks them)."""
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)) or not _is_json_type(array.type.value_type):
        return None
    texts = pc.list_flatten(array).storage.to_pylist()
    try:
        structs = pa.array([json.loads(t) if t is not None else None for t in texts])
        lengths = np.asarray(pc.fill_null(pc.list_value_length(array), 0), dtype=np.int64)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        return pa.ListArray.from_arrays(offsets, structs, mask=array.is_null())
    except (pa.ArrowException, ValueError, TypeError):
        return None


def _scan_chunk(rule: _ColumnRule, chunk: pa.Array) -> int | None:
    if rule.kind == "messages":
        chunk = _json_messages_as_structs(chunk) or chunk
    return rule.scan(chunk)


def _first_problem_python(dataset, rule: _ColumnRule, start: int, stop: int) -> tuple[int, Problem] | None:
    values = dataset.select_columns([rule.column])[start:stop][rule.column]
    for offset, value in enumerate(values):
        problem = rule.problem(value)
        if problem is not None:
            return start + offset, problem
    return None


def column_array(dataset, column: str) -> pa.Array:
    """One column as a single Arrow array, without copying when it is stored in one chunk
    (row order follows any ``select``/``shuffle`` applied to the dataset)."""
    array = dataset.with_format("arrow")[column]
    if isinstance(array, pa.ChunkedArray):
        array = array.chunk(0) if array.num_chunks == 1 else array.combine_chunks()
    return array


def _first_problem(dataset, rule: _ColumnRule) -> tuple[int, Problem] | None:
    """The first bad row of one column: Arrow scans chunk by chunk (no copy of the column); rows
    of a chunk the scan cannot read are walked in Python."""
    chunked = dataset.with_format("arrow")[rule.column]
    chunks = chunked.chunks if isinstance(chunked, pa.ChunkedArray) else [chunked]
    start = 0
    for chunk in chunks:
        stop = start + len(chunk)
        row = _scan_chunk(rule, chunk) if len(chunk) else None
        if row is not None:
            if row != _UNSURE:
                problem = rule.problem(dataset[start + row][rule.column])
                if problem is not None:
                    return start + row, problem
            found = _first_problem_python(dataset, rule, start, stop)
            if found is not None:
                return found
        start = stop
    return None


def resolve_format(
    dataset, accepted: Iterable[DataFormat], *, text_field: str = "text", source: str | None = None
) -> FormatInfo:
    """The format ``dataset`` is read in when only ``accepted`` formats will do (no row checks).

    A dataset readable in several formats is read in the first accepted one, most specific first.

    Raises:
        DataError: its columns fit no accepted format.
    """
    accepted = [DataFormat(f) for f in accepted]
    readable = [f for f in _readable_formats(dataset.column_names, text_field) if f in accepted]
    if not readable:
        raise _no_format_error(dataset, text_field, source or describe_source(dataset), accepted)
    return _info_for(dataset.with_format(None), readable[0], text_field)


def validate_dataset(
    dataset,
    accepted: Iterable[DataFormat],
    *,
    text_field: str = "text",
    source: str | None = None,
) -> FormatInfo:
    """Detect the format of ``dataset``, check that it is one of ``accepted``, and check every row.

    A dataset readable in several formats is read in the first accepted one (e.g. a preference
    dataset with a ``prompt`` column is prompt-only data for an online method).

    Returns:
        the :class:`FormatInfo` it will be read as.

    Raises:
        DataError: the dataset is empty, its columns fit no accepted format, or a row is bad
            (missing or None value, wrong type, empty text, a message without role or content,
            an unknown role, a conversation with no assistant turn). The error names the source,
            the 0-based row, the column, what was expected and found, and the fix.
    """
    accepted = [DataFormat(f) for f in accepted]
    source = source or describe_source(dataset)
    if is_streaming(dataset):  # its first rows; later ones are checked as they are tokenized
        source = f"{source} (first {STREAM_SAMPLE_ROWS} rows of the stream)"
        dataset = streamed_sample(dataset)
    dataset = dataset.with_format(None)  # plain Python values, whatever format the caller set
    if len(dataset) == 0:
        raise DataError("the dataset is empty", source=source, expected="at least one row",
                        fix="check the file, split and any filtering")
    info = resolve_format(dataset, accepted, text_field=text_field, source=source)

    first: tuple[int, _ColumnRule, Problem] | None = None
    for rule in _rules_for(info, dataset.column_names):
        found = _first_problem(dataset, rule)
        if found is not None and (first is None or found[0] < first[0]):
            first = (found[0], rule, found[1])
    if first is not None:
        row, rule, (problem, expected, found_value, fix) = first
        raise DataError(problem, source=source, row=row, column=rule.column, expected=expected,
                        found=found_value, fix=fix)
    return info


# ----------------------------------------------------------------------------- implicit prompts


def _text_split_point(chosen: str, rejected: str) -> int:
    """Where to cut two strings into a shared prompt and two completions.

    The cut is made just before the whitespace that precedes the last word the two share only
    partly (or before the whitespace where they part), so that both completions start at a word
    boundary, with their leading space, as a tokenizer would have split the whole text.
    """
    common = 0
    limit = min(len(chosen), len(rejected))
    while common < limit and chosen[common] == rejected[common]:
        common += 1
    cut = 0
    for i in range(1, common + 1):
        at_boundary = i < common or (
            i < limit and chosen[i].isspace() and rejected[i].isspace()
        )
        if at_boundary and chosen[i].isspace() and not chosen[i - 1].isspace():
            cut = i
    return cut


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Split an implicit-prompt preference pair into ``(prompt, chosen_completion, rejected_completion)``.

    Conversations: the prompt is the leading messages both share; each completion is the rest
    (at least one message each). Strings: the prompt is the longest common prefix, cut at a word
    boundary (see ``_text_split_point``); the completions keep their leading whitespace.
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        shared = 0
        limit = min(len(chosen), len(rejected)) - 1  # leave each side at least one message
        # compared without None values: Arrow gives a column's messages its other messages' keys (tool_calls=None)
        while shared < limit and clean_messages(chosen[shared:shared + 1]) == clean_messages(rejected[shared:shared + 1]):
            shared += 1
        return chosen[:shared], chosen[shared:], rejected[shared:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        cut = _text_split_point(chosen, rejected)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    raise DataError(
        "chosen and rejected hold different kinds of value",
        expected="two strings or two conversations",
        found=f"{type(chosen).__name__} and {type(rejected).__name__}",
        fix="store both as text or both as lists of messages",
    )
