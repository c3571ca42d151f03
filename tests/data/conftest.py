"""Tiny tokenizers built on the fly (no hub): a ChatML one like our models', and one with a BOS
token and an end-of-turn token that is not EOS."""

from __future__ import annotations

import datasets
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

datasets.disable_progress_bars()

CORPUS = [
    "hello world, how are you today?",
    "the cat sat on the mat and the dog sat on the log.",
    "What is 2 + 2? The answer is 4.",
    "Question: name a colour. Answer: blue is a colour, red is too.",
    "user assistant system tool message reply prompt completion chosen rejected",
    "I like green apples and long walks; you like short stories.",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# BOS from the template itself, turns closed by <|eot|> (not the EOS token </s>)
BOS_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '[' + message['role'] + ']: ' + message['content'] + '<|eot|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant]: ' }}{% endif %}"
)


def _train_bpe(special_tokens: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    return tokenizer


@pytest.fixture(scope="session")
def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """ChatML: eos '<|im_end|>' (also the end of each turn), pad '<|endoftext|>', no BOS."""
    backend = _train_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def bos_tokenizer() -> PreTrainedTokenizerFast:
    """Adds BOS '<s>' to plain text by itself; eos '</s>'; turns end with '<|eot|>'."""
    backend = _train_bpe(["<pad>", "<s>", "</s>", "<|eot|>"])
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<|eot|>"],
    )
    tokenizer.chat_template = BOS_TEMPLATE
    return tokenizer


@pytest.fixture()
def write_jsonl(tmp_path):
    """Write rows to ``tmp_path/name`` as JSON lines and return the path."""
    import json

    def write(name: str, rows: list[dict]) -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(path)

    return write
