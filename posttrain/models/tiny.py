"""Offline tiny models: a byte-level BPE tokenizer trained on text we generate, and small random
Qwen2 / Llama causal LMs saved as ordinary Hugging Face model directories.

Nothing here touches the network. Every artifact is a pure function of its arguments (same seed,
same weights and same tokenizer bytes), so tests and the demo can build what they need on the fly.

The tokenizer uses the ChatML scheme for both architectures: ``<|im_start|>``/``<|im_end|>``
frame each turn, ``<|im_end|>`` is the end-of-sequence token, ``<|endoftext|>`` is the padding
token (distinct from EOS, so a padded batch never looks finished), and there is no BOS token.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast

from posttrain.errors import ConfigError

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
# Plain added tokens: kept whole (never split by BPE) but not "special", so decoding keeps them.
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

ARCHES = ("qwen2", "llama")
SIZES: dict[str, dict[str, int]] = {
    # unit tests: a forward+backward step takes milliseconds
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),
    # the demo: a few million parameters, learns the embedded arithmetic task in minutes on a CPU
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=768),
}
MAX_POSITIONS = 2048
MIN_VOCAB_SIZE = 320  # 256 byte symbols + special and tag tokens + a few merges

# Bump when the corpus, the tokenizer recipe or the model recipe changes: the cache key includes it,
# so a stale cached model is never reused.
FACTORY_VERSION = 2

# The Qwen2 pre-tokenizer split. transformers rebuilds a tokenizer saved beside a `qwen2` config as
# `Qwen2Tokenizer`, which installs exactly this split + NFC + ByteLevel(use_regex=False) whatever the
# saved tokenizer.json says. Training with the same pipeline makes the save/load round trip exact.
# It also isolates every digit (`\p{N}` alone), which arithmetic tasks need.
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHATML_TEMPLATE = (
    # tools: one system turn listing the schemas (merged with a leading system message), Hermes style
    "{%- set first_is_system = messages and messages[0]['role'] == 'system' %}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if first_is_system %}{{- messages[0]['content'] ~ '\\n\\n' }}{%- endif %}"
    "{{- 'You may call these tools. Write each call as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' ~ (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and first_is_system) %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{- raise_exception('chat template: unknown role ' ~ message['role'] ~ '; use system, user, assistant or tool') }}"
    "{%- endif %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- elif message['content'] is none %}{%- set content = '' %}"
    "{%- else %}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{{- content }}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set function = call['function'] if call['function'] is defined else call %}"
    "{{- '\\n<tool_call>\\n' ~ ({'name': function['name'], 'arguments': function['arguments']} | tojson) ~ '\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ content ~ '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# ----------------------------------------------------------------------------- training corpus

_WORDS = (
    "the a an this that these those some every each one two three many few all no "
    "model models data answer answers question questions number numbers sum difference result value "
    "cat dog bird fish tree river mountain city road house garden window door table book story letter "
    "child children teacher student friend people person team group machine computer program language "
    "morning evening night day week year time moment water light sound music color word sentence "
    "is are was were be been has have had do does did can could will would should may might must "
    "read write learn teach train test check count add subtract solve think know see find give take "
    "make build run walk open close start stop help need want like keep move turn show tell ask say "
    "small large quick slow bright dark happy careful simple hard easy new old good right wrong true false "
    "red green blue short long first last next other same different correct exact clear ready "
    "and or but if then so because while when where why how what which who with without "
    "in on at to from of for by about into over under after before between through again very"
).split()
_NAMES = "Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Mallory Oscar Peggy Trent Walter".split()
_UNICODE_WORDS = "café naïve über façade jalapeño São Zürich résumé déjà smörgåsbord 東京 数学 Ωmega π λ".split()
_CODE_SNIPPETS = (
    "def add(a, b):\n    return a + b\n",
    "for i in range({n}):\n    total += i * {m}\n",
    "if x > {n}:\n    print(\"large\")\nelse:\n    print(\"small\")\n",
    "result = [x ** 2 for x in range({n}) if x % {m} == 0]\n",
    "{{\"name\": \"item{n}\", \"count\": {m}, \"ok\": true}}\n",
    "class Counter:\n    def __init__(self):\n        self.value = {n}\n",
    "while n != 0:\n    n -= {m}\n",
    "assert check(\"{n}\") is True  # {m}\n",
)


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_NAMES if rng.random() < 0.1 else _WORDS) for _ in range(rng.randint(4, 14))]
    if rng.random() < 0.15:
        words.insert(rng.randrange(len(words)), rng.choice(_UNICODE_WORDS))
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 2025)))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice(".!?.,;:")


def _arithmetic_line(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-*")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return rng.choice(
        (
            f"{a} {op} {b} = {value}",
            f"What is {a} {op} {b}? {value}",
            f"Compute {a}{op}{b}. The answer is {value}.",
            f"<answer>{value}</answer>",
        )
    )


def _chat_turn(rng: random.Random) -> str:
    # Chat framing without the special tokens themselves: those are added tokens, never merged.
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return rng.choice(
        (
            f"system\nYou are a helpful assistant.\nuser\nWhat is {a} + {b}?\nassistant\n{a + b}\n",
            f"user\n{_sentence(rng)}\nassistant\n{_sentence(rng)}\n",
            f"user\nWhat is {a} - {b}?\nassistant\nThe answer is {a - b}.\n",
            f"tool\n{{\"result\": {a * b}}}\nassistant\nDone.\n",
        )
    )


def tokenizer_corpus(seed: int = 0, n_lines: int = 6000) -> list[str]:
    """English-like sentences, numbers, arithmetic, chat turns and code-ish lines; deterministic in ``seed``."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.40:
            lines.append(" ".join(_sentence(rng) for _ in range(rng.randint(1, 3))))
        elif kind < 0.60:
            lines.append(_arithmetic_line(rng))
        elif kind < 0.75:
            lines.append(_chat_turn(rng))
        elif kind < 0.90:
            lines.append(rng.choice(_CODE_SNIPPETS).format(n=rng.randint(0, 999), m=rng.randint(1, 9)))
        else:
            lines.append(f"{rng.randint(1, 28)}/{rng.randint(1, 12)}/{rng.randint(1900, 2030)} costs ${rng.randint(0, 9999)}.{rng.randint(0, 99):02d}")
    return lines


# ----------------------------------------------------------------------------- tokenizer


def _check_choice(value: str, allowed: tuple[str, ...] | list[str], field: str) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {field} {value!r}", field=field.replace("_", "-"), fix=f"use one of: {', '.join(allowed)}")


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int, seed: int) -> str:
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAG_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # more merges need more distinct text; the corpus grows with the requested vocabulary
    corpus = tokenizer_corpus(seed, n_lines=max(6000, 8 * vocab_size))
    backend.train_from_iterator(corpus, trainer=trainer)
    backend.add_tokens(list(TAG_TOKENS))
    return backend.to_str()


def build_tokenizer(*, arch: str = "qwen2", vocab_size: int = 1024, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train (or fetch from the in-process cache) a byte-level BPE tokenizer with a ChatML template.

    The same pipeline is used for ``qwen2`` and ``llama``: NFC, the Qwen2 split (one token per digit),
    byte-level BPE. ``len(tokenizer)`` equals ``vocab_size`` whenever the generated corpus offers
    enough merges (always for the default 1024; very large requests may end a little short).
    """
    _check_choice(arch, ARCHES, "arch")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"vocab size {vocab_size} is too small for a byte-level tokenizer", field="vocab-size",
                          fix=f"use at least {MIN_VOCAB_SIZE}")
    backend = Tokenizer.from_str(_trained_tokenizer_json(vocab_size, seed))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=MAX_POSITIONS,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


# ----------------------------------------------------------------------------- models


def _model_config(arch: str, size: str, vocab_size: int, tokenizer: PreTrainedTokenizerFast, tie_word_embeddings: bool, **extra):
    from transformers import LlamaConfig, Qwen2Config

    config_class = Qwen2Config if arch == "qwen2" else LlamaConfig
    shape = SIZES[size]
    return config_class(
        vocab_size=vocab_size,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0,
        **shape,
        **extra,
    )


def _build(arch: str, size: str, vocab_size: int | None, seed: int, tie_word_embeddings: bool, reward: bool):
    _check_choice(arch, ARCHES, "arch")
    _check_choice(size, tuple(SIZES), "size")
    tokenizer = build_tokenizer(arch=arch, vocab_size=1024 if vocab_size is None else vocab_size, seed=seed)
    if reward:
        from transformers import AutoModelForSequenceClassification as auto_class

        config = _model_config(arch, size, len(tokenizer), tokenizer, tie_word_embeddings, num_labels=1)
    else:
        from transformers import AutoModelForCausalLM as auto_class

        config = _model_config(arch, size, len(tokenizer), tokenizer, tie_word_embeddings)
    # a private RNG stream: building a model never moves the caller's global torch seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_class.from_config(config, dtype=torch.float32)
    return model, tokenizer


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, output_dir: str | os.PathLike) -> str:
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def create_tiny_model(
    output_dir: str | os.PathLike,
    *,
    arch: str = "qwen2",
    size: str = "tiny",
    vocab_size: int | None = None,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> str:
    """Save a randomly initialised causal LM and its tokenizer to ``output_dir``; return the path.

    ``arch`` is ``"qwen2"`` (``Qwen2ForCausalLM``) or ``"llama"`` (``LlamaForCausalLM``); ``size`` is
    ``"tiny"`` (hidden 64, 2 layers) or ``"small"`` (hidden 256, 4 layers). The directory loads with
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``; its
    ``generation_config`` stops at ``<|im_end|>`` and pads with ``<|endoftext|>``.
    """
    model, tokenizer = _build(arch, size, vocab_size, seed, tie_word_embeddings, reward=False)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    return _save(model, tokenizer, output_dir)


def create_tiny_reward_model(
    output_dir: str | os.PathLike,
    *,
    arch: str = "qwen2",
    size: str = "tiny",
    vocab_size: int | None = None,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> str:
    """Save a random ``AutoModelForSequenceClassification`` (one score, ``num_labels=1``) with the same
    tokenizer as :func:`create_tiny_model`; ``config.pad_token_id`` is set so it can score padded batches."""
    model, tokenizer = _build(arch, size, vocab_size, seed, tie_word_embeddings, reward=True)
    return _save(model, tokenizer, output_dir)


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ----------------------------------------------------------------------------- other architectures and tokenizers

# Tiny configurations of the architectures users bring, built offline from transformers' config
# classes (tests/models/test_architecture_matrix.py, docs/architectures.md). Each entry: the config
# class name and the fields that make it tiny or exercise what is special about it.
_ATTENTION = dict(num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
MATRIX_ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_ATTENTION)),
    "mistral": ("MistralConfig", dict(_ATTENTION, sliding_window=4)),
    "qwen2": ("Qwen2Config", dict(_ATTENTION)),
    "qwen3": ("Qwen3Config", dict(_ATTENTION, head_dim=16)),
    # the router's load-balancing loss joins the training loss when output_router_logits is on
    "qwen3_moe": ("Qwen3MoeConfig", dict(_ATTENTION, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=32, output_router_logits=True,
                                          router_aux_loss_coef=0.01)),
    "mixtral": ("MixtralConfig", dict(_ATTENTION, num_local_experts=4, num_experts_per_tok=2,
                                      output_router_logits=True, router_aux_loss_coef=0.01)),
    # final-logit soft-capping (a low cap so that it bends tiny logits) and alternating sliding windows
    "gemma2": ("Gemma2Config", dict(_ATTENTION, head_dim=16, final_logit_softcapping=0.5, sliding_window=4)),
    "phi3": ("Phi3Config", dict(_ATTENTION)),
    # logits divided by logits_scaling, plus muP multipliers inside the network
    "granite": ("GraniteConfig", dict(_ATTENTION, logits_scaling=8.0, embedding_multiplier=2.0,
                                      residual_multiplier=0.5, attention_multiplier=0.25)),
    "olmo2": ("Olmo2Config", dict(_ATTENTION)),
    # learned absolute positions, LayerNorm, a Conv1D-style block
    "gpt2": ("GPT2Config", dict(n_head=2, n_inner=64)),
}


def build_tiny_model(
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    reward: bool = False,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    seed: int = 0,
    **overrides,
) -> PreTrainedModel:
    """A random causal LM of architecture ``arch`` (a key of :data:`MATRIX_ARCHITECTURES`) sized for
    ``tokenizer``, in float32; its token ids (EOS, pad, BOS) are the tokenizer's. ``reward=True``
    gives the sequence-classification model with one score (a reward or value model)."""
    import transformers

    _check_choice(arch, tuple(MATRIX_ARCHITECTURES), "arch")
    config_name, fields = MATRIX_ARCHITECTURES[arch]
    values = dict(fields, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, vocab_size=len(tokenizer),
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=arch != "phi3",
                  # 5x the usual 0.02: distributions far enough from uniform that a wrong log-prob shows
                  initializer_range=0.1)
    if arch == "gpt2":
        values.update(n_positions=MAX_POSITIONS)
    else:
        values.update(max_position_embeddings=MAX_POSITIONS)
    values.update(overrides)
    if reward:
        values.update(num_labels=1)
    config = getattr(transformers, config_name)(**values)
    auto_class = transformers.AutoModelForSequenceClassification if reward else transformers.AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_class.from_config(config, dtype=torch.float32)
    if reward:
        return model
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id
    )
    return model


BOS_TOKEN = "<|startoftext|>"
# how a tokenizer marks padding and the start of a text: the cases users bring
TOKENIZER_VARIANTS = ("own_pad", "pad_is_eos", "no_pad", "template_bos")


def build_tokenizer_variant(variant: str, *, vocab_size: int = 1024, seed: int = 0) -> PreTrainedTokenizerFast:
    """The tiny tokenizer of :func:`build_tokenizer`, changed to one of :data:`TOKENIZER_VARIANTS`:

    ``own_pad``: a pad token distinct from EOS (the default); ``pad_is_eos``: pad and EOS are one
    token, so a finished sequence and padding look alike; ``no_pad``: no pad token at all;
    ``template_bos``: a BOS token that the chat template writes at the start of every conversation
    and that the tokenizer also adds to any text it encodes, as Llama 3's do: a templated
    conversation must still start with exactly one.
    """
    _check_choice(variant, TOKENIZER_VARIANTS, "tokenizer_variant")
    tokenizer = build_tokenizer(vocab_size=vocab_size, seed=seed)
    if variant == "pad_is_eos":
        tokenizer.pad_token = tokenizer.eos_token
    elif variant == "no_pad":
        tokenizer.pad_token = None
    elif variant == "template_bos":
        tokenizer.add_special_tokens({"bos_token": BOS_TOKEN})
        tokenizer.chat_template = "{{- bos_token }}" + CHATML_TEMPLATE
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
            special_tokens=[(BOS_TOKEN, tokenizer.bos_token_id)],
        )
    return tokenizer


# ----------------------------------------------------------------------------- process-wide cache

_COMPLETE_MARKER = ".posttrain-complete"


def cache_root() -> Path:
    """``$POSTTRAIN_CACHE/tiny`` when that variable is set, else ``~/.cache/posttrain/tiny``."""
    base = os.environ.get("POSTTRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "posttrain")
    return Path(base) / "tiny"


def tiny_model_path(
    arch: str = "qwen2", size: str = "tiny", *, vocab_size: int = 1024, seed: int = 0, reward: bool = False
) -> str:
    """Path of a cached tiny model (created on first use); safe when several processes race.

    Each process builds into its own temporary folder and renames it into place; a loser of the race
    discards its copy and uses the winner's. ``reward=True`` gives the sequence-classification variant.
    """
    _check_choice(arch, ARCHES, "arch")
    _check_choice(size, tuple(SIZES), "size")
    name = f"{arch}-{size}-{vocab_size}-{seed}" + ("-reward" if reward else "") + f"-f{FACTORY_VERSION}"
    final = cache_root() / name
    if (final / _COMPLETE_MARKER).exists():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared between users
    try:
        create = create_tiny_reward_model if reward else create_tiny_model
        create(staging, arch=arch, size=size, vocab_size=vocab_size, seed=seed)
        (staging / _COMPLETE_MARKER).write_text(f"factory version {FACTORY_VERSION}\n")
        if final.exists() and not (final / _COMPLETE_MARKER).exists():
            shutil.rmtree(final, ignore_errors=True)  # left half-written by a crashed process
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / _COMPLETE_MARKER).exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return str(final)


# ----------------------------------------------------------------------------- command line


def init_model_main(argv: list[str] | None = None) -> int:
    """``posttrain init-model OUT [--arch qwen2|llama] [--size tiny|small] [--vocab-size N] [--seed S]``."""
    parser = argparse.ArgumentParser(
        prog="posttrain init-model", description="Create a tiny random model and its tokenizer, offline."
    )
    parser.add_argument("output_dir", metavar="OUT", help="directory to write the model into")
    parser.add_argument("--arch", choices=ARCHES, default="qwen2", help="model architecture (default: qwen2)")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny", help="tiny: unit tests; small: the demo")
    parser.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary size (default: 1024)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the tokenizer corpus and the weights")
    parser.add_argument("--reward-model", action="store_true", help="save a sequence-classification reward model")
    parser.add_argument("--untied", action="store_true", help="separate input embedding and output head weights")
    args = parser.parse_args(argv)
    create = create_tiny_reward_model if args.reward_model else create_tiny_model
    path = create(args.output_dir, arch=args.arch, size=args.size, vocab_size=args.vocab_size, seed=args.seed,
                  tie_word_embeddings=not args.untied)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        auto_class = AutoModelForSequenceClassification if args.reward_model else AutoModelForCausalLM
        n_params = count_parameters(auto_class.from_config(config))
    print(f"{path}\t{args.arch}-{args.size}\t{n_params:,} parameters")
    return 0
