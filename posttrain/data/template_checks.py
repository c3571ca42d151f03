"""Checks that a chat template renders multi-turn (tool-calling) conversations consistently.

Multi-turn training assumes that rendering a conversation turn by turn never changes the tokens
of earlier turns: an online trainer generates a turn, appends the tool's result and renders again,
and a loss mask built from one rendering is applied to another. A template that drops a separator
at a turn boundary, or renders a reasoning block only on the last assistant turn (as Qwen3's does),
silently breaks that; these checks say so before training starts.
"""

from __future__ import annotations

from typing import Any

from posttrain.data.templates import Messages, apply_chat_template_text
from posttrain.errors import ConfigError, DataError

_FIX = ("use a chat template that renders a conversation as the concatenation of its turns (pass one with "
        "chat_template_path), or train on whole texts without multi-turn masks")


def probe_tool_conversation(tools: list[Any] | None = None) -> Messages:
    """user -> assistant calling a tool -> tool result -> assistant answer.

    The call names the first of ``tools`` (a schema or a Python function; or ``add``). Assistant turns
    carry a ``reasoning_content``, so that a template rendering reasoning on some turns only is caught.
    """
    name = "add"
    if tools and isinstance(tools[0], dict):
        first = tools[0].get("function", tools[0])
        name = first.get("name", name) if isinstance(first, dict) else name
    elif tools and callable(tools[0]):
        name = getattr(tools[0], "__name__", name)
    return [
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "", "reasoning_content": "The tool can add.",
         "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {}}}]},
        {"role": "tool", "name": name, "content": "5"},
        {"role": "assistant", "content": "It is 5.", "reasoning_content": "The tool said 5."},
    ]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _first_difference(before: list, after: list) -> int:
    return next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))


def check_prefix_preserving(
    tokenizer: Any,
    *,
    tools: list[Any] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> None:
    """Check that re-rendering a tool conversation never changes the tokens of earlier turns.

    Renders :func:`probe_tool_conversation` four times: the user turn with the generation prompt,
    through the assistant's tool call, through the tool result with the generation prompt, through
    the final answer; each rendering's token ids must begin with the previous one's.

    Args:
        tools: the tools the run uses, as schemas or documented Python functions (transformers
            turns those into schemas); the probe calls the first one. None: a probe schema.
        template_kwargs: extra template variables (e.g. ``{"enable_thinking": False}``).

    Raises:
        ConfigError: a rendering changes earlier tokens; names the turn boundary and shows the
            text before and after.
    """
    tools = tools or [{"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
    messages = probe_tool_conversation(tools)
    stages = (
        ("the user's turn with the generation prompt", 1, True),
        ("the assistant's tool call", 2, False),
        ("the tool result with the generation prompt", 3, True),
        ("the assistant's answer", 4, False),
    )
    previous: tuple[str, str, list[int]] | None = None
    for name, count, generation_prompt in stages:
        try:
            text = apply_chat_template_text(tokenizer, messages[:count], add_generation_prompt=generation_prompt,
                                            tools=tools, template_kwargs=template_kwargs)
        except DataError as error:
            raise ConfigError(f"the chat template cannot render a tool conversation ({error.problem})",
                              field="chat_template_path", fix="use a chat template that renders tools, tool "
                              "calls and tool messages (pass one with chat_template_path)") from error
        ids = _ids(tokenizer, text)
        if previous is not None and ids[: len(previous[2])] != previous[2]:
            previous_name, previous_text, previous_ids = previous
            at = _first_difference(previous_ids, ids)
            window = slice(max(0, at - 6), at + 6)
            how = ("the text is a prefix but its tokens merge differently across the boundary"
                   if text.startswith(previous_text) else "the text changes")
            raise ConfigError(
                f"the chat template is not prefix-preserving: rendering through {name} changes the tokens "
                f"rendered through {previous_name} ({how}, from token {at}): "
                f"{tokenizer.decode(previous_ids[window])!r} became {tokenizer.decode(ids[window])!r}",
                field="chat_template_path", fix=_FIX,
            )
        previous = (name, text, ids)


def message_token_owners(
    tokenizer: Any,
    messages: Messages,
    *,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and, per token, the index of the message it belongs to.

    Message i owns the text that rendering ``messages[:i+1]`` adds to the rendering of
    ``messages[:i]`` (its header included; text the template writes before the first message, such
    as a tool list in the system turn, is message 0's). A token belongs to the message holding its
    first character.

    Raises:
        ConfigError: the template does not render the conversation turn by turn, or the tokenizer
            reports no character offsets.
    """
    ends, text = [], ""
    for count in range(1, len(messages) + 1):
        through = apply_chat_template_text(tokenizer, messages[:count], tools=tools, template_kwargs=template_kwargs)
        if not through.startswith(text):
            at = _first_difference(text, through)
            raise ConfigError(
                f"the chat template is not prefix-preserving: adding message {count - 1} "
                f"({messages[count - 1].get('role')}) changes the text before it: "
                f"{text[max(0, at - 20):at + 20]!r} became {through[max(0, at - 20):at + 20]!r}",
                field="chat_template_path", fix=_FIX,
            )
        text = through
        ends.append(len(text))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    owners, index = [], 0
    for start, _ in encoded["offset_mapping"]:
        while index < len(ends) - 1 and start >= ends[index]:
            index += 1
        owners.append(index)
    return list(encoded["input_ids"]), owners


def check_loss_mask(
    tokenizer: Any,
    messages: Messages,
    input_ids: list[int],
    completion_mask: list[int],
    *,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> dict[int, int]:
    """Check that a tokenized row's loss mask covers the assistant turns and nothing else.

    ``input_ids`` must be the start of the conversation's rendering (tokens past its end, e.g. an
    appended EOS, are not checked). Each assistant message must have target tokens (unless
    truncation cut it off), none of them in its header (the generation prompt); no token of
    another message (system, tool schemas, user, tool results) may be a target.

    Returns:
        the number of target tokens of each assistant message, by message index.

    Raises:
        ConfigError: the ids are not the rendering, or a target token lies outside an assistant
            turn, or an assistant turn has none.
    """
    rendered, owners = message_token_owners(tokenizer, messages, tools=tools, template_kwargs=template_kwargs)
    length = min(len(input_ids), len(rendered))
    if list(input_ids[:length]) != rendered[:length]:
        at = _first_difference(list(input_ids), rendered)
        raise ConfigError(f"the row's tokens are not the chat template's rendering from token {at}",
                          field="chat_template_path", fix="tokenize the row with the same tokenizer and template")
    counts: dict[int, int] = {}
    header_ends: dict[int, int] = {}
    for position in range(length):
        owner = owners[position]
        message = messages[owner]
        if message.get("role") != "assistant":
            if completion_mask[position]:
                raise ConfigError(
                    f"the loss mask counts token {position} ({tokenizer.decode(rendered[position:position + 1])!r}), "
                    f"which belongs to message {owner} ({message.get('role')})",
                    field="assistant_only_loss", fix=_FIX)
            continue
        if owner not in header_ends:
            header = apply_chat_template_text(tokenizer, messages[:owner], add_generation_prompt=True,
                                              tools=tools, template_kwargs=template_kwargs)
            header_ends[owner] = len(_ids(tokenizer, header))
        if position < header_ends[owner] and completion_mask[position]:
            raise ConfigError(f"the loss mask counts token {position}, part of the header of assistant message "
                              f"{owner} (the generation prompt)", field="assistant_only_loss", fix=_FIX)
        counts[owner] = counts.get(owner, 0) + int(completion_mask[position])
    for owner, count in counts.items():
        if count == 0 and owners[length - 1] != owner:  # a turn truncation cut into may have none left
            raise ConfigError(f"assistant message {owner} has no target token in the loss mask",
                              field="assistant_only_loss", fix=_FIX)
    return counts
