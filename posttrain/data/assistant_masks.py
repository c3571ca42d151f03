"""Loss masks on assistant turns, built from character spans of the rendered conversation.

Used where only some turns of a conversation carry the loss: SFT's ``assistant_only_loss``, and a
completion that holds tool results (the tool's text is never a target).
"""

from __future__ import annotations

from typing import Any

from posttrain.data.templates import apply_chat_template_text
from posttrain.errors import ConfigError, DataError


def assistant_spans(
    tokenizer: Any, messages: list[dict], full_text: str, template_kwargs: dict | None = None, tools: list | None = None
) -> list[tuple[int, int]]:
    """Character spans of ``full_text`` holding each assistant turn (its end-of-turn token and what the
    template writes after it included: the same boundaries as a preference completion).

    Rendered progressively: the text before turn i is ``template(messages[:i], generation prompt)``
    and the text through it is ``template(messages[:i+1])``. Needs no ``{% generation %}`` markers,
    only a template that renders a conversation as the concatenation of its turns.
    """
    spans = []
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = apply_chat_template_text(
            tokenizer, messages[:index], add_generation_prompt=True, tools=tools, template_kwargs=template_kwargs
        )
        through = apply_chat_template_text(tokenizer, messages[: index + 1], tools=tools, template_kwargs=template_kwargs)
        if not (full_text.startswith(before) and full_text.startswith(through) and len(through) >= len(before)):
            raise DataError(
                f"assistant_only_loss: the chat template does not render message {index} as a continuation "
                "of the messages before it, so the assistant's tokens cannot be located",
                expected="a template that renders a conversation turn by turn",
                fix="use such a template, or train on all tokens (assistant_only_loss=False)",
            )
        spans.append((len(before), len(through)))
    return spans


def mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap a span.

    Overlap rather than containment: a byte-level BPE merges the space ending a header such as
    ``'[assistant]: '`` into the reply's first word (``'Ġworld'``), and that token is the reply's.
    """
    mask = []
    span_index = 0
    for start, end in offsets:
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        inside = span_index < len(spans) and end > spans[span_index][0]
        mask.append(1 if inside else 0)
    return mask


def ids_and_offsets(tokenizer: Any, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Token ids of each text and each token's character span (for masks built from text spans)."""
    try:
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError) as error:
        raise ConfigError(
            "masks on assistant turns (assistant_only_loss, or a completion holding tool results) need a tokenizer "
            f"that reports character offsets (a fast, `tokenizers`-backed one); {type(tokenizer).__name__} does not ({error})",
            field="assistant_only_loss",
            fix="load the tokenizer with use_fast=True, or train on all tokens",
        ) from error
    return encoded["input_ids"], encoded["offset_mapping"]
