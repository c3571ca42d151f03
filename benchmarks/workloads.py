"""Offline benchmark workloads: a model directory and a chat dataset per workload.

Tokenizers are word-level over synthetic words (``w0``, ``w1``, ...), so each word is one token and
row lengths are exact; the vocabulary size is what matters for the output head's cost.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

CACHE = os.environ.get("POSTTRAIN_BENCH_CACHE", os.path.join(os.path.dirname(__file__), ".cache"))

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Workload:
    name: str
    vocab_size: int
    user_tokens: int
    assistant_tokens: int
    rows: int
    batch_size: int
    max_length: int
    description: str
    max_positions: int = 2048  # the model's max_position_embeddings
    shape: str = "h256"  # a key of MODEL_SHAPES


LONG_MAX_POSITIONS = 131_072

# Qwen2 shapes (all with tied embeddings): the small benchmark model, and Qwen2.5-0.5B's for the GPU sweep
MODEL_SHAPES = {
    "h256": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=1024),
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
}
# workload name prefix (``<prefix>-<tokens>``) of each shape's length-sweep workload
LONG_PREFIXES = {"h256": "long", "qwen2.5-0.5b": "long05b"}


WORKLOADS = {
    "small": Workload("small", 2048, 12, 16, 512, 8, 1024,
                      "Qwen2 h256 L4 (4 heads, 2 KV), vocab 2k, ~35-token chats, batch 8"),
    "big-vocab": Workload("big-vocab", 151_936, 100, 300, 256, 8, 1024,
                          "Qwen2 h256 L4, vocab 151,936 (tied), 100+300-token chats, max_length 1024, batch 8"),
}


def long_workload(length: int, shape: str = "h256") -> Workload:
    """The big-vocabulary model with positions extended, one row of ``length`` tokens per step.

    ``shape``: the small benchmark model (``long-<tokens>``) or a randomly initialised model shaped
    like Qwen2.5-0.5B (``long05b-<tokens>``: hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864).

    The assistant turn is twice ``length`` words so that truncation to ``max_length`` gives rows of
    exactly ``length`` tokens for SFT, and prompt + completion of ``length`` tokens for DPO (each
    preference completion is half the assistant length). Online methods sample from the 64-word prompt.
    """
    sizes = MODEL_SHAPES[shape]
    return Workload(f"{LONG_PREFIXES[shape]}-{length}", 151_936, 64, 2 * length, 8, 1, length,
                    f"Qwen2 h{sizes['hidden_size']} L{sizes['num_hidden_layers']}, vocab 151,936, "
                    f"one {length}-token row per step", LONG_MAX_POSITIONS, shape)


def workload_by_name(name: str) -> Workload:
    """A named workload, or ``long-<tokens>`` for the length sweep."""
    if name in WORKLOADS:
        return WORKLOADS[name]
    prefix, _, length = name.rpartition("-")
    for shape, shape_prefix in LONG_PREFIXES.items():
        if prefix == shape_prefix and length.isdigit():
            return long_workload(int(length), shape)
    raise SystemExit(f"unknown workload {name!r}: one of {sorted(WORKLOADS)}, long-<tokens> or long05b-<tokens>")


def _build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = ["user", "assistant", "system", "\n"]
    n_words = vocab_size - len(specials) - len(words)
    vocab = {tok: i for i, tok in enumerate(specials + words + [f"w{i}" for i in range(n_words)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=specials[1:])
    tok.chat_template = CHATML
    return tok


def model_dir(workload: Workload) -> str:
    """Create (once) and return the directory of the workload's random Qwen2 and tokenizer."""
    suffix = "" if workload.max_positions == 2048 else f"-pos{workload.max_positions}"
    suffix += "" if workload.shape == "h256" else f"-{workload.shape}"
    path = os.path.join(CACHE, f"model-{workload.vocab_size}{suffix}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = _build_tokenizer(workload.vocab_size)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=workload.vocab_size, tie_word_embeddings=True, max_position_embeddings=workload.max_positions,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None, **MODEL_SHAPES[workload.shape],
    )
    model = Qwen2ForCausalLM(config)
    if workload.shape != "h256":
        model = model.to(torch.bfloat16)  # half the file; the worker loads it in the dtype it is asked for
    tmp = path + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def chat_dataset_file(workload: Workload) -> str:
    """A JSONL file of ``messages`` rows with the workload's token counts."""
    path = os.path.join(CACHE, f"chat-{workload.name}.jsonl")
    if os.path.exists(path):
        return path
    os.makedirs(CACHE, exist_ok=True)
    rng = random.Random(0)
    n_words = workload.vocab_size - 7

    def text(n):
        return " ".join(f"w{rng.randrange(n_words)}" for _ in range(n))

    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        for _ in range(workload.rows):
            u = max(1, workload.user_tokens + rng.randint(-workload.user_tokens // 5, workload.user_tokens // 5))
            a = max(1, workload.assistant_tokens + rng.randint(-workload.assistant_tokens // 5, workload.assistant_tokens // 5))
            row = {"messages": [{"role": "user", "content": text(u)}, {"role": "assistant", "content": text(a)}]}
            handle.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def preference_dataset_file(workload: Workload) -> str:
    """A JSONL file of conversational preference rows (prompt, chosen, rejected)."""
    path = os.path.join(CACHE, f"pref-{workload.name}.jsonl")
    if os.path.exists(path):
        return path
    os.makedirs(CACHE, exist_ok=True)
    rng = random.Random(1)
    n_words = workload.vocab_size - 7

    def text(n):
        return " ".join(f"w{rng.randrange(n_words)}" for _ in range(n))

    half = max(1, workload.assistant_tokens // 2)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        for _ in range(workload.rows):
            row = {
                "prompt": [{"role": "user", "content": text(workload.user_tokens)}],
                "chosen": [{"role": "assistant", "content": text(half)}],
                "rejected": [{"role": "assistant", "content": text(half)}],
            }
            handle.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def prompt_dataset_file(workload: Workload) -> str:
    """A JSONL file of conversational prompt-only rows, for the online methods."""
    path = os.path.join(CACHE, f"prompts-{workload.name}.jsonl")
    if os.path.exists(path):
        return path
    os.makedirs(CACHE, exist_ok=True)
    rng = random.Random(2)
    n_words = workload.vocab_size - 7
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        for _ in range(workload.rows):
            text = " ".join(f"w{rng.randrange(n_words)}" for _ in range(workload.user_tokens))
            handle.write(json.dumps({"prompt": [{"role": "user", "content": text}]}) + "\n")
    os.replace(tmp, path)
    return path
