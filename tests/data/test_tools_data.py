"""Tool-calling rows (a ``tools`` column, assistant ``tool_calls``, ``tool`` messages) in SFT, reward and
DPO data: what the template renders, which tokens carry the loss, and the errors for bad tools or templates."""

import json

import pytest
from datasets import Dataset

from posttrain.data.tokenize import tokenize_preference, tokenize_sft
from posttrain.data.tool_examples import TOOL_SCHEMAS, tool_call, tool_conversations, tool_preferences
from posttrain.errors import ConfigError, DataError
from posttrain.models.tiny import CHATML_TEMPLATE, build_tokenizer

CALL_TURN = '\n<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 30}}\n</tool_call><|im_end|>\n'
ANSWER_TURN = "12 plus 30 is 42.<|im_end|>\n"
NO_GENERATION_TEMPLATE = CHATML_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
# renders the tool list but writes an assistant turn's content only: its tool calls vanish
CALLS_DROPPED_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n<tools>' }}{%- for tool in tools %}{{- '\\n' ~ (tool | tojson) }}"
    "{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ (message['content'] or '') ~ "
    "'<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# ChatML that knows nothing of tools
TOOLLESS_TEMPLATE = CALLS_DROPPED_TEMPLATE[CALLS_DROPPED_TEMPLATE.index("{%- for message"):]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _with_template(template):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def _target_pieces(tokenizer, ids, mask):
    """The decoded text of each run of consecutive loss targets."""
    pieces, run = [], []
    for token, target in zip(ids, mask):
        if target:
            run.append(token)
        elif run:
            pieces.append(tokenizer.decode(run))
            run = []
    return pieces + ([tokenizer.decode(run)] if run else [])


def test_assistant_only_loss_counts_the_assistant_turns_and_their_tool_calls_only(tokenizer):
    row = tokenize_sft(Dataset.from_list(tool_conversations()[:1]), tokenizer, assistant_only_loss=True)[0]
    text = tokenizer.decode(row["input_ids"])
    assert "<tools>" in text and '"name": "lookup"' in text  # the schemas reach the system turn
    assert _target_pieces(tokenizer, row["input_ids"], row["completion_mask"]) == [CALL_TURN, ANSWER_TURN]


def test_a_completion_holding_a_tool_result_has_loss_on_its_assistant_turns_only(tokenizer):
    messages = tool_conversations()[0]["messages"]
    rows = [{"prompt": messages[:1], "completion": messages[1:], "tools": TOOL_SCHEMAS}]
    row = tokenize_sft(Dataset.from_list(rows), tokenizer)[0]
    assert "<tools>" in tokenizer.decode(row["input_ids"])
    assert _target_pieces(tokenizer, row["input_ids"], row["completion_mask"]) == [CALL_TURN, ANSWER_TURN]
    every_token = tokenize_sft(Dataset.from_list(rows), tokenizer, completion_only_loss=False)[0]
    assert every_token["input_ids"] == row["input_ids"] and all(every_token["completion_mask"])


def test_tools_as_a_json_string_render_as_the_list_does(tokenizer):
    as_list = tokenize_sft(Dataset.from_list(tool_conversations()), tokenizer, assistant_only_loss=True)
    as_json = tokenize_sft(Dataset.from_list(tool_conversations(tools_as_json=True)), tokenizer,
                           assistant_only_loss=True)
    assert as_list["input_ids"] == as_json["input_ids"]
    assert as_list["completion_mask"] == as_json["completion_mask"]
    # Arrow gives each stored schema and call its neighbours' keys as None: they must not render as null
    assert "null" not in tokenizer.decode(as_list[1]["input_ids"])


def test_masks_need_no_generation_block(tokenizer):
    """The assistant spans come from rendering turn by turn, so a template without
    {% generation %} markers gives the same tokens and masks."""
    data = Dataset.from_list(tool_conversations())
    marked = tokenize_sft(data, tokenizer, assistant_only_loss=True)
    unmarked = tokenize_sft(data, _with_template(NO_GENERATION_TEMPLATE), assistant_only_loss=True)
    assert marked["input_ids"] == unmarked["input_ids"]
    assert marked["completion_mask"] == unmarked["completion_mask"]
    assert _target_pieces(tokenizer, unmarked[0]["input_ids"], unmarked[0]["completion_mask"]) == [CALL_TURN, ANSWER_TURN]


def test_row_template_kwargs_and_tools_reach_preference_prompts():
    template = "{%- if note is defined %}{{- '[' ~ note ~ ']' }}{%- endif %}" + CHATML_TEMPLATE
    rows = tool_preferences()
    for row, note in zip(rows, ("first", "second")):
        row["chat_template_kwargs"] = {"note": note}
    tokenizer = _with_template(template)
    out = tokenize_preference(Dataset.from_list(rows), tokenizer, max_length=None)
    prompts = [tokenizer.decode(ids) for ids in out["prompt_input_ids"]]
    assert prompts[0].startswith("[first]<|im_start|>system") and prompts[1].startswith("[second]")
    assert all("<tools>" in prompt for prompt in prompts)


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit_prompt", "implicit_prompt"])
def test_preference_chosen_calls_the_tool_and_prompt_lists_the_tools(tokenizer, implicit):
    rows = tool_preferences()
    if implicit:
        rows = [{"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"],
                 "tools": row["tools"]} for row in rows]
    out = tokenize_preference(Dataset.from_list(rows), tokenizer, max_length=None)
    assert "<tools>" in tokenizer.decode(out[0]["prompt_input_ids"])
    assert tokenizer.decode(out[0]["chosen_input_ids"]) == (
        '\n<tool_call>\n{"name": "add", "arguments": {"a": 17, "b": 25}}\n</tool_call><|im_end|>\n')
    assert tokenizer.decode(out[0]["rejected_input_ids"]) == "It is 41.<|im_end|>\n"


@pytest.mark.parametrize(
    ("bad_value", "problem"),
    [
        ('{"type": "function", "function": {"name": "add"}}', "the tools are not a list"),
        ('[{"name": "add",', "the tools are not valid JSON"),
        ('[{"type": "function", "function": {"description": "adds"}}]', "tool 0 has no function name"),
    ],
    ids=["not_a_list", "bad_json", "no_name"],
)
def test_malformed_tools_are_data_errors_with_an_address(tokenizer, bad_value, problem):
    rows = tool_conversations(tools_as_json=True)[:2]
    rows[1]["tools"] = bad_value
    with pytest.raises(DataError) as caught:
        tokenize_sft(Dataset.from_list(rows), tokenizer, source="tools.jsonl")
    error = caught.value
    assert (error.source, error.row, error.column) == ("tools.jsonl", 1, "tools")
    assert error.problem.startswith(problem)
    assert error.fix


def test_a_tools_column_beside_plain_text_is_refused(tokenizer):
    rows = [{"prompt": "1+1=", "completion": "2", "tools": json.dumps(TOOL_SCHEMAS)}]
    with pytest.raises(DataError, match="needs conversational data"):
        tokenize_sft(Dataset.from_list(rows), tokenizer)
    with pytest.raises(DataError, match="needs conversational data"):
        tokenize_preference(Dataset.from_list([{"prompt": "1+1=", "chosen": "2", "rejected": "3",
                                                "tools": json.dumps(TOOL_SCHEMAS)}]), tokenizer)


@pytest.mark.parametrize("method", ["sft", "preference"])
def test_a_template_that_ignores_tools_is_a_config_error(method):
    tokenizer = _with_template(TOOLLESS_TEMPLATE)
    if method == "sft":
        data, tokenize = Dataset.from_list(tool_conversations()), tokenize_sft
    else:
        data, tokenize = Dataset.from_list(tool_preferences()), tokenize_preference
    with pytest.raises(ConfigError, match="does not render tool schemas") as caught:
        tokenize(data, tokenizer)
    assert "chat_template_path" in str(caught.value)


def test_a_template_that_drops_tool_calls_is_a_config_error():
    rows = tool_conversations()[:1]
    with pytest.raises(ConfigError, match="drops tool calls") as caught:
        tokenize_sft(Dataset.from_list(rows), _with_template(CALLS_DROPPED_TEMPLATE))
    assert "chat_template_path" in str(caught.value)
    # without a tools column too: the calls alone must render
    rows = [{"messages": [{"role": "user", "content": "1+1?"}, tool_call("add", a=1, b=1),
                          {"role": "tool", "content": "2"}, {"role": "assistant", "content": "2"}]}]
    with pytest.raises(ConfigError, match="drops tool calls"):
        tokenize_sft(Dataset.from_list(rows), _with_template(TOOLLESS_TEMPLATE))
