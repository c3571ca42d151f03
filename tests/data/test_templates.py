from __future__ import annotations

import copy

import pytest
from datasets import Dataset

from posttrain.data.templates import (
    apply_chat_template_text,
    has_chat_template,
    render_prompt_completion,
    require_chat_template,
)
from posttrain.errors import DataError

PROMPT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
COMPLETION = [{"role": "assistant", "content": "world"}]


def test_has_chat_template(chatml_tokenizer):
    assert has_chat_template(chatml_tokenizer)
    bare = copy.deepcopy(chatml_tokenizer)
    bare.chat_template = None
    assert not has_chat_template(bare)
    with pytest.raises(DataError) as caught:
        require_chat_template(bare, source="chat.jsonl", column="messages")
    assert str(caught.value).startswith("chat.jsonl, column 'messages': the data is conversational")
    assert "chat_template" in caught.value.fix


def test_apply_chat_template_text(chatml_tokenizer):
    text = apply_chat_template_text(chatml_tokenizer, PROMPT, add_generation_prompt=True)
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_render_prompt_completion_is_a_split_of_the_whole(chatml_tokenizer):
    prompt_text, completion_text = render_prompt_completion(chatml_tokenizer, PROMPT, COMPLETION)
    whole = apply_chat_template_text(chatml_tokenizer, PROMPT + COMPLETION)
    assert prompt_text + completion_text == whole
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert completion_text == "world<|im_end|>\n"


def test_template_whose_prompt_is_not_a_prefix(chatml_tokenizer):
    odd = copy.deepcopy(chatml_tokenizer)
    # the generation prompt says "bot", assistant turns say "assistant": no clean boundary
    odd.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'bot: ' }}{% endif %}"
    )
    with pytest.raises(DataError) as caught:
        render_prompt_completion(odd, PROMPT, COMPLETION)
    assert "does not render the prompt as the beginning" in caught.value.problem
    assert "bot: " in caught.value.expected


def test_none_valued_keys_are_dropped(chatml_tokenizer):
    # arrow gives every message every key; a message without 'name' comes back with name=None
    named = copy.deepcopy(chatml_tokenizer)
    named.chat_template = (
        "{% for m in messages %}{{ m['role'] }}{% if m.name is defined %}({{ m.name }}){% endif %}"
        "{{ ': ' + m['content'] + '\\n' }}{% endfor %}"
    )
    rows = Dataset.from_list([{"messages": [{"role": "user", "content": "hi", "name": "ann"}, {"role": "assistant", "content": "yo"}]}])
    messages = rows[0]["messages"]
    assert messages[1]["name"] is None
    assert apply_chat_template_text(named, messages) == "user(ann): hi\nassistant: yo\n"


def test_template_errors_become_data_errors(chatml_tokenizer):
    strict = copy.deepcopy(chatml_tokenizer)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('tool messages are not supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(DataError) as caught:
        apply_chat_template_text(strict, [{"role": "tool", "content": "x"}])
    assert "tool messages are not supported" in caught.value.problem
    assert caught.value.found == "roles ['tool']"
