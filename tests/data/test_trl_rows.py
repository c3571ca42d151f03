"""Row shapes TRL reads that posttrain takes as they are: ShareGPT conversations, per-row template variables."""

import copy

import pytest
from datasets import Dataset

from posttrain.data.formats import DataFormat, validate_dataset
from posttrain.data.sharegpt import convert_sharegpt
from posttrain.data.tokenize import tokenize_preference, tokenize_sft

SHAREGPT = [
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 2+2?"},
                       {"from": "gpt", "value": "4"}]},
    {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]},
]
AS_MESSAGES = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
]


def test_sharegpt_conversations_become_messages():
    converted = convert_sharegpt(Dataset.from_list(SHAREGPT))
    assert converted.column_names == ["messages"]
    assert converted.to_list() == AS_MESSAGES
    assert validate_dataset(converted, [DataFormat.CONVERSATIONAL]).format is DataFormat.CONVERSATIONAL


def test_sharegpt_tokenizes_as_the_same_conversation_in_messages(tiny_tokenizer):
    from_sharegpt = tokenize_sft(convert_sharegpt(Dataset.from_list(SHAREGPT)), tiny_tokenizer, assistant_only_loss=True)
    from_messages = tokenize_sft(Dataset.from_list(AS_MESSAGES), tiny_tokenizer, assistant_only_loss=True)
    assert from_sharegpt.to_list() == from_messages.to_list()


def test_sharegpt_preference_columns_and_streaming(tiny_tokenizer):
    row = {"prompt": [{"from": "human", "value": "Hi?"}], "chosen": [{"from": "gpt", "value": "Hello."}],
           "rejected": [{"from": "gpt", "value": "Go away."}]}
    converted = convert_sharegpt(Dataset.from_list([row]))
    assert converted[0]["chosen"] == [{"role": "assistant", "content": "Hello."}]
    assert len(tokenize_preference(converted, tiny_tokenizer)) == 1
    streamed = list(convert_sharegpt(Dataset.from_list(SHAREGPT).to_iterable_dataset()))
    assert [r["messages"] for r in streamed] == [r["messages"] for r in AS_MESSAGES]


def test_plain_messages_are_left_alone():
    dataset = Dataset.from_list(AS_MESSAGES)
    assert convert_sharegpt(dataset) is dataset


def test_sft_trainer_reads_sharegpt_rows(tiny_model_dir, tmp_path):
    from posttrain import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, disable_tqdm=True, save_strategy="no")
    trainer = SFTTrainer(model=tiny_model_dir, args=args, train_dataset=Dataset.from_list(SHAREGPT))
    text = trainer.processing_class.decode(trainer.train_dataset[0]["input_ids"])
    assert "user" in text and "What is 2+2?" in text and "human" not in text


# like Qwen3's: with enable_thinking=False every assistant turn opens with a marker the model does not write
THINKING_TEMPLATE = (
    "{% set quiet = enable_thinking is defined and not enable_thinking %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and quiet %}no-think "
    "{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if quiet %}no-think {% endif %}{% endif %}"
)


@pytest.fixture()
def thinking_tokenizer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = THINKING_TEMPLATE
    return tokenizer


def test_per_row_chat_template_kwargs_reach_the_template(thinking_tokenizer):
    rows = [
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo"}],
         "chat_template_kwargs": {"enable_thinking": False}},
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo"}],
         "chat_template_kwargs": {"enable_thinking": True}},
    ]
    tokenized = tokenize_sft(Dataset.from_list(rows), thinking_tokenizer)
    texts = [thinking_tokenizer.decode(ids) for ids in tokenized["input_ids"]]
    assert "no-think" in texts[0] and "no-think" not in texts[1]
    # the variable shapes the prompt, so the completion mask starts after it in the first row only
    prompt_lengths = [mask.index(1) for mask in tokenized["completion_mask"]]
    assert prompt_lengths[0] > prompt_lengths[1]


def test_a_row_without_the_key_renders_as_without_the_column(thinking_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
             "chat_template_kwargs": {"enable_thinking": False}},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
             "chat_template_kwargs": {}}]
    with_column = tokenize_sft(Dataset.from_list(rows), thinking_tokenizer, assistant_only_loss=True)
    without = tokenize_sft(Dataset.from_list([{"messages": rows[1]["messages"]}]), thinking_tokenizer,
                           assistant_only_loss=True)
    assert with_column[1] == without[0]
    # assistant_only_loss locates the turn with the row's variables too: the marker is not a target
    ids, mask = with_column[0]["input_ids"], with_column[0]["completion_mask"]
    assert "no-think" in thinking_tokenizer.decode(ids)
    assert "no-think" not in thinking_tokenizer.decode([t for t, m in zip(ids, mask) if m])
