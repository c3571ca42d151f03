"""The token-continuity check for chat templates (re-rendering a conversation never changes earlier
tokens) and the check that a loss mask lines up with the assistant turns."""

import logging

import pytest
from datasets import Dataset

from posttrain.data.template_checks import (
    check_loss_mask,
    check_prefix_preserving,
    message_token_owners,
    probe_tool_conversation,
)
from posttrain.data.tokenize import tokenize_sft
from posttrain.data.tool_examples import TOOL_SCHEMAS, tool_conversations
from posttrain.errors import ConfigError
from posttrain.models.tiny import CHATML_TEMPLATE, build_tokenizer

# the newline closing an assistant turn is written only when no tool message follows: the tool's turn
# then starts right after <|im_end|>, so the rendering through the call is not the start of the next one
_TURN_CLOSE = "{%- endgeneration %}{{- '\\n' }}"
SEPARATOR_DROPPED_TEMPLATE = CHATML_TEMPLATE.replace(
    _TURN_CLOSE,
    "{%- endgeneration %}{%- if not (loop.nextitem is defined and loop.nextitem['role'] == 'tool') %}"
    "{{- '\\n' }}{%- endif %}",
)
# reasoning is rendered on the last assistant turn only (as Qwen3's template drops it from earlier ones)
_CONTENT = "{%- generation %}{{- content }}"
REASONING_ON_LAST_TURN_TEMPLATE = CHATML_TEMPLATE.replace(
    _CONTENT,
    "{%- generation %}{%- if loop.last and message['reasoning_content'] is defined %}"
    "{{- '<think>\\n' ~ message['reasoning_content'] ~ '\\n</think>\\n\\n' }}{%- endif %}{{- content }}",
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _with_template(template):
    assert template != CHATML_TEMPLATE  # the replacement above found its text
    tokenizer = build_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor.
        b: the second factor.
    """
    return a * b


@pytest.mark.parametrize("tools", [None, TOOL_SCHEMAS, [multiply]], ids=["probe_tool", "schemas", "function"])
def test_the_tiny_template_is_prefix_preserving(tokenizer, tools):
    check_prefix_preserving(tokenizer, tools=tools)


@pytest.mark.parametrize(("tools", "name"), [(TOOL_SCHEMAS[1:], "lookup"), ([multiply], "multiply")],
                         ids=["schema", "function"])
def test_the_probe_calls_the_first_tool_by_its_name(tools, name):
    assert probe_tool_conversation(tools)[1]["tool_calls"][0]["function"]["name"] == name


def test_a_dropped_separator_fails_at_the_tool_boundary():
    with pytest.raises(ConfigError) as caught:
        check_prefix_preserving(_with_template(SEPARATOR_DROPPED_TEMPLATE), tools=TOOL_SCHEMAS)
    message = str(caught.value)
    assert "not prefix-preserving" in message and "chat_template_path" in message
    assert "rendering through the tool result with the generation prompt changes the tokens rendered through " \
           "the assistant's tool call" in message
    assert "<|im_end|>\\n" in message and "<|im_end|><|im_start|>tool" in message  # the two texts, shown


def test_reasoning_on_the_last_turn_only_fails_at_the_tool_boundary():
    with pytest.raises(ConfigError) as caught:
        check_prefix_preserving(_with_template(REASONING_ON_LAST_TURN_TEMPLATE))
    message = str(caught.value)
    assert "changes the tokens rendered through the assistant's tool call" in message
    assert "<think>" in message


def test_message_owners_follow_the_turns(tokenizer):
    messages = tool_conversations()[1]["messages"]  # system, user, call, tool, answer
    ids, owners = message_token_owners(tokenizer, messages, tools=TOOL_SCHEMAS)
    assert len(ids) == len(owners) and owners == sorted(owners) and set(owners) == set(range(len(messages)))
    owned = {index: tokenizer.decode([t for t, o in zip(ids, owners) if o == index]) for index in set(owners)}
    assert owned[0].startswith("<|im_start|>system\nBe brief.") and "</tools>" in owned[0]
    assert owned[3] == "<|im_start|>tool\nblue<|im_end|>\n"
    assert owned[4] == "<|im_start|>assistant\nBlue.<|im_end|>\n"


@pytest.mark.parametrize("row_index", [0, 1])
def test_sft_assistant_masks_line_up_with_the_assistant_turns(tokenizer, row_index):
    row = tool_conversations()[row_index]
    tokenized = tokenize_sft(Dataset.from_list([row]), tokenizer, assistant_only_loss=True)[0]
    counts = check_loss_mask(tokenizer, row["messages"], tokenized["input_ids"], tokenized["completion_mask"],
                             tools=row["tools"])
    assistant_indices = [i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"]
    assert sorted(counts) == assistant_indices and all(counts.values())
    assert sum(counts.values()) == sum(tokenized["completion_mask"])


def test_masks_outside_the_assistant_turns_are_caught(tokenizer):
    row = tool_conversations()[0]
    tokenized = tokenize_sft(Dataset.from_list([row]), tokenizer)[0]  # every token a target
    with pytest.raises(ConfigError, match=r"belongs to message 0 \(user\)"):
        check_loss_mask(tokenizer, row["messages"], tokenized["input_ids"], tokenized["completion_mask"],
                        tools=row["tools"])
    ids, owners = message_token_owners(tokenizer, row["messages"], tools=row["tools"])
    tool_only = [int(owner == 2) for owner in owners]
    with pytest.raises(ConfigError, match=r"belongs to message 2 \(tool\)"):
        check_loss_mask(tokenizer, row["messages"], ids, tool_only, tools=row["tools"])
    header_too = [int(owner == 3) for owner in owners]  # the answer's '<|im_start|>assistant\n' included
    with pytest.raises(ConfigError, match="header of assistant message 3"):
        check_loss_mask(tokenizer, row["messages"], ids, header_too, tools=row["tools"])


def test_sft_checks_continuity_on_tool_rows(caplog):
    data = Dataset.from_list(tool_conversations())
    broken = _with_template(SEPARATOR_DROPPED_TEMPLATE)
    with pytest.raises(ConfigError, match="not prefix-preserving"):
        tokenize_sft(data, broken, assistant_only_loss=True)  # its masks would be wrong
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        tokenize_sft(data, broken)  # every token trained: the rows are what the template renders
    assert sum("not prefix-preserving" in record.getMessage() for record in caplog.records) == 1
