"""ShareGPT rows, read as posttrain's conversations (as TRL reads them)."""

from __future__ import annotations

from typing import Any

from posttrain.data.streaming import column_names_of, streamed_sample

# ShareGPT spells a message {"from": ..., "value": ...} with its own role names
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant",
                  "tool": "tool"}
_CONVERSATION_COLUMNS = ("conversations", "messages", "prompt", "completion", "chosen", "rejected")


def _is_sharegpt_conversation(value: Any) -> bool:
    return isinstance(value, list) and any(isinstance(m, dict) and "from" in m and "value" in m for m in value)


def _holds_sharegpt_messages(dataset, column: str) -> bool:
    features = getattr(dataset, "features", None)
    inner = getattr(features.get(column), "feature", None) if features else None
    if isinstance(inner, dict):  # a list of structs: the message keys are in the schema
        return "from" in inner and "value" in inner
    sample = streamed_sample(dataset, 1)  # otherwise the first row tells (a Dataset is its own sample)
    return len(sample) > 0 and _is_sharegpt_conversation(sample[0][column])


def _sharegpt_message(message: Any) -> Any:
    if not isinstance(message, dict) or "from" not in message:
        return message
    role = message.get("from")
    return {"role": SHAREGPT_ROLES.get(role, role), "content": message.get("value")}


def convert_sharegpt(dataset):
    """ShareGPT rows as posttrain's conversations, or ``dataset`` itself when it holds none.

    A ``conversations`` column becomes ``messages`` (unless there is one already), and every message
    ``{"from", "value"}`` of a conversation column becomes ``{"role", "content"}`` with the roles
    ``human`` -> ``user`` and ``gpt`` -> ``assistant`` (``system`` stays); other roles are kept, and
    validation names any it does not know. Works on map-style and streaming datasets.
    """
    names = column_names_of(dataset)
    columns = [c for c in _CONVERSATION_COLUMNS if c in names and _holds_sharegpt_messages(dataset, c)]
    rename = "conversations" in names and "messages" not in names
    if not columns and not rename:
        return dataset
    if columns:
        dataset = dataset.map(
            lambda batch: {c: [[_sharegpt_message(m) for m in row] if isinstance(row, list) else row
                               for row in batch[c]] for c in columns},
            batched=True,
        )
    return dataset.rename_column("conversations", "messages") if rename else dataset
