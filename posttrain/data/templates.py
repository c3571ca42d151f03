"""Render conversations to text with the tokenizer's chat template.

The tokenizer's template owns every special token of a conversation (BOS, turn markers,
end-of-turn), so rendered text is later tokenized with ``add_special_tokens=False``.
"""

from __future__ import annotations

import os
from typing import Any

from posttrain.errors import ConfigError, DataError

Messages = list[dict[str, Any]]


def has_chat_template(tokenizer: Any) -> bool:
    """True when ``tokenizer`` can render conversations (it has a non-empty ``chat_template``)."""
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer: Any, *, source: str | None = None, column: str | None = None) -> None:
    """Raise a :class:`DataError` if conversational data meets a tokenizer with no chat template."""
    if not has_chat_template(tokenizer):
        raise DataError(
            "the data is conversational but the tokenizer has no chat template",
            source=source,
            column=column,
            expected="a tokenizer with a chat_template",
            found=f"{type(tokenizer).__name__} without one",
            fix="use the tokenizer of a chat/instruct model, set tokenizer.chat_template (e.g. a ChatML "
            "template), or turn the rows into plain text ('prompt'/'completion' strings)",
        )


def without_nulls(value: Any) -> Any:
    """``value`` with every mapping key whose value is None dropped, at any depth."""
    if isinstance(value, dict):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    return value


def clean_messages(messages: Messages) -> Messages:
    """Drop keys whose value is None (inside ``tool_calls`` too).

    Arrow stores a dataset's messages with one shared set of keys, so a message that had no
    ``tool_calls`` comes back with ``tool_calls=None``; a template testing ``is defined`` would
    then render an empty tool call. Likewise a call's ``arguments`` come back with every other
    call's argument names set to None, which a template would render as ``"key": null``.
    """
    cleaned = []
    for message in messages:
        message = {key: value for key, value in message.items() if value is not None}
        if "tool_calls" in message:
            message["tool_calls"] = without_nulls(message["tool_calls"])
        cleaned.append(message)
    return cleaned


def apply_chat_template_text(
    tokenizer: Any,
    messages: Messages,
    *,
    add_generation_prompt: bool = False,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The text the chat template renders for ``messages``.

    Args:
        add_generation_prompt: append the header of an assistant turn (for prompts to complete).
        tools: tool (function) schemas, for templates that render them.
        template_kwargs: extra variables for the template (a row's ``chat_template_kwargs``, e.g.
            ``{"enable_thinking": False}``); keys whose value is None are left out (see :func:`clean_messages`).

    Raises:
        DataError: no chat template, or the template rejected the conversation (e.g. it requires
            alternating user/assistant roles); the caller adds the row.
    """
    require_chat_template(tokenizer)
    try:
        text = tokenizer.apply_chat_template(
            clean_messages(messages),
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **{key: value for key, value in (template_kwargs or {}).items() if value is not None},
        )
    except Exception as error:  # noqa: BLE001 - templates raise jinja2 errors of many kinds
        raise DataError(
            f"the chat template failed on this conversation ({type(error).__name__}: {error})",
            found=f"roles {[m.get('role') for m in messages]}",
            fix="make the conversation fit the model's template (many require user/assistant turns to "
            "alternate and a system message to come first)",
        ) from error
    if not isinstance(text, str):  # some tokenizers return a list for a batch of one
        text = text[0]
    return text


def render_prompt_completion(
    tokenizer: Any,
    prompt: Messages,
    completion: Messages,
    *,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> tuple[str, str]:
    """Render a conversational prompt and its completion as two pieces of text.

    ``prompt_text`` is the prompt with the assistant header (``add_generation_prompt=True``);
    ``completion_text`` is the rest of the rendering of ``prompt + completion``. Their
    concatenation is exactly the rendering of the whole conversation.

    Raises:
        DataError: the template does not render the prompt as the beginning of the whole
            conversation (so no prompt/completion boundary exists in the text).
    """
    prompt_text = apply_chat_template_text(
        tokenizer, prompt, add_generation_prompt=True, tools=tools, template_kwargs=template_kwargs
    )
    full_text = apply_chat_template_text(
        tokenizer, list(prompt) + list(completion), tools=tools, template_kwargs=template_kwargs
    )
    if not full_text.startswith(prompt_text):
        diverge = next(
            (i for i, (a, b) in enumerate(zip(prompt_text, full_text)) if a != b), min(len(prompt_text), len(full_text))
        )
        raise DataError(
            "the chat template does not render the prompt as the beginning of the whole conversation",
            expected=f"the conversation to start with {prompt_text[max(0, diverge - 20):diverge + 20]!r}",
            found=repr(full_text[max(0, diverge - 20) : diverge + 20]),
            fix="use a template that renders conversations turn by turn (the generation prompt must "
            "match the start of the assistant turn), or give the prompt and completion as plain text",
        )
    return prompt_text, full_text[len(prompt_text) :]


def turn_suffix_text(tokenizer: Any) -> str:
    """What the chat template writes after the EOS that closes an assistant turn (ChatML: ``"\\n"``).

    Generation stops at that EOS, while a rendered training row keeps the whole turn; a sampled
    completion gets this text appended wherever it must look like a training row (a reward model
    reads its score at a row's last token). Empty without a chat template, without an EOS token, or
    when the template writes nothing after it.
    """
    eos = getattr(tokenizer, "eos_token", None)
    if not has_chat_template(tokenizer) or not eos:
        return ""
    marker = "posttrain-turn-probe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # a template that needs other roles or arguments: append nothing
        return ""
    after_answer = text[text.rfind(marker) + len(marker):] if marker in text else ""
    return after_answer[after_answer.find(eos) + len(eos):] if eos in after_answer else ""


def load_chat_template(path: str, *, trust_remote_code: bool = False) -> str:
    """The chat template at ``path``: a Jinja file's text, or the template of the tokenizer saved in a
    directory (or named by a hub id).

    Raises:
        ConfigError: the file or tokenizer cannot be read, or the tokenizer has no template.
    """
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            template = handle.read()
    else:
        from transformers import AutoTokenizer

        try:
            template = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code).chat_template
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"could not read a chat template from {path!r}: {str(error).splitlines()[0]}",
                field="chat_template_path", fix="pass a Jinja template file or a tokenizer directory",
            ) from None
    if not template or not str(template).strip():
        raise ConfigError(f"{path!r} holds no chat template", field="chat_template_path",
                          fix="pass a Jinja template file or the directory of a tokenizer that has a template")
    return template
