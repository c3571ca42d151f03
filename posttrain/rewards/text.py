"""Text helpers shared by the reward functions: completion text, answer extraction, number parsing."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

# An optional sign, then digits with optional thousands separators ("1,000", "12,345,678") or plain
# digits, then an optional decimal part; or a bare decimal (".5"); then an optional "/denominator".
NUMBER_PATTERN = re.compile(
    r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?![\d])|(?<![\w.])[-+]?\.\d+"
)
ANSWER_TAG_PATTERN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def completion_text(completion: Any) -> str:
    """The text of a completion: a string as is; for a message list, the assistant contents joined.

    Accepted message contents: a string, or a list of ``{"type": "text", "text": ...}`` parts.
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts = []
    for message in completion:
        if not isinstance(message, dict):
            parts.append(str(message))
            continue
        if message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
        parts.append("" if content is None else str(content))
    return "".join(parts)


def parse_number(text: str) -> Fraction | None:
    """The exact value of a number written as text, or None.

    ``"1,000"``, ``"+5"``, ``"3.0"``, ``"-0.5"``, ``".5"`` and ``"1/2"`` are numbers; a trailing
    period, a ``$`` in front or a ``%`` behind are tolerated (``"$1,000."`` is 1000).
    """
    cleaned = text.strip().rstrip(".").strip()
    cleaned = cleaned.removeprefix("$").removesuffix("%").strip()
    if not cleaned or NUMBER_PATTERN.fullmatch(cleaned) is None:
        return None
    try:
        return Fraction(cleaned.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> Fraction | None:
    """The value of the last number that appears in ``text``, or None."""
    for match in reversed(NUMBER_PATTERN.findall(text)):
        value = parse_number(match)
        if value is not None:
            return value
    return None


def boxed_content(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` in ``text`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, index = 0, start + len("\\boxed{") - 1
    for index in range(index, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{") : index]
    return None


def extract_answer(text: str) -> str:
    r"""The part of a completion that holds its final answer.

    The content of the last ``<answer>...</answer>``, else of the last ``\boxed{...}``, else the whole text.
    """
    tagged = ANSWER_TAG_PATTERN.findall(text)
    if tagged:
        return tagged[-1]
    boxed = boxed_content(text)
    return boxed if boxed is not None else text


def reference_answer(value: Any) -> str | None:
    """A dataset's reference answer as text, or None when the row has none.

    GSM8K-style references (``"...reasoning... #### 72"``) keep only what follows ``####``.
    """
    if value is None:
        return None
    text = str(value).strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
    return text or None


def normalize_text_answer(text: str) -> str:
    """Case-folded, with runs of whitespace collapsed and the ends stripped (also of a final period)."""
    return " ".join(text.split()).rstrip(".").strip().casefold()
