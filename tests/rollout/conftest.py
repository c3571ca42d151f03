from __future__ import annotations

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "alice adds 12 and 30 to get 42",
    "<think>reason step by step</think> <answer>7</answer>",
    "numbers: 1, 2, 3, 10, 100, 1000",
    "hello world, hello model, goodbye world",
] * 20


def build_tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


def build_tiny_qwen2(tokenizer, seed: int = 0) -> transformers.Qwen2ForCausalLM:
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config)
    # random init at std 0.02 gives near-uniform logits (many near-ties); a larger spread makes
    # greedy choices well separated, so comparisons with model.generate are not decided by rounding
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="session")
def make_qwen2():
    return build_tiny_qwen2


@pytest.fixture(scope="session")
def qwen2(tokenizer) -> transformers.Qwen2ForCausalLM:
    return build_tiny_qwen2(tokenizer)


@pytest.fixture
def prompts(tokenizer) -> list[list[int]]:
    texts = ["the quick brown fox jumps", "alice adds 12", "hello world, hello model, goodbye"]
    return [tokenizer(t)["input_ids"] for t in texts]
