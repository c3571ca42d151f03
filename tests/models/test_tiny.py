from __future__ import annotations

import json
import threading
import unicodedata
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from posttrain.errors import ConfigError
from posttrain.models import tiny
from posttrain.models.tiny import (
    build_tokenizer,
    count_parameters,
    create_tiny_model,
    create_tiny_reward_model,
    init_model_main,
    tiny_model_path,
)

VARIED_TEXTS = [
    "What is 7 + 12?",
    "1234567890 and -42, 3.14159, 1,000,000 or 2024-06-30T12:00",
    "Héllo wörld, café naïve façade — Zürich 東京 数学 🙂 ﬁ",
    "Cafe\u0301 and A\u030a decomposed",  # NFC composes these, before and after a reload alike
    "  leading spaces\n\n\ttabs\r\nand   runs   of spaces  ",
    "def add(a, b):\n    return a + b  # it's done, we'll see; they're ok",
    "<|im_start|>user\nWhat is 3 - 1?<|im_end|>\n<|im_start|>assistant\n<think>2</think><answer>2</answer><|im_end|>",
    "<|endoftext|>padding<|endoftext|>",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 19 + 23? Ünïcode 🙂"},
    {"role": "assistant", "content": "<think>19 + 23 = 42</think><answer>42</answer>"},
    {"role": "user", "content": "And 7 - 9?"},
]


def _hand_param_count(arch: str, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, inter: int,
                      tied: bool = True) -> int:
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    attention = hidden * hidden + 2 * hidden * kv + hidden * hidden
    if arch == "qwen2":
        attention += hidden + 2 * kv  # q, k, v biases
    per_layer = attention + 3 * hidden * inter + 2 * hidden
    embeddings = vocab * hidden * (1 if tied else 2)
    return embeddings + layers * per_layer + hidden


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_training_is_deterministic_and_seeded():
    first = tiny._trained_tokenizer_json.__wrapped__(1024, 0)
    second = tiny._trained_tokenizer_json.__wrapped__(1024, 0)
    other_seed = tiny._trained_tokenizer_json.__wrapped__(1024, 1)
    assert first == second
    assert first != other_seed


def test_tokenizer_size_and_special_tokens():
    tokenizer = build_tokenizer()
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == 1024
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.bos_token is None
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<answer>", "</answer>"):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, token
        assert tokenizer.convert_ids_to_tokens(ids) == [token]
    # framing tokens vanish with skip_special_tokens; the reasoning tags are ordinary text and stay
    ids = tokenizer("<|im_start|>x<think>1</think><|im_end|>", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "x<think>1</think>"
    # no BOS is ever prepended
    assert tokenizer("12")["input_ids"] == tokenizer("12", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", ["1234567890", "x = 3.14159 and 2024", " 99 bottles", "a1b22c333", "-7+08"])
def test_every_digit_is_its_own_token(text):
    tokenizer = build_tokenizer()
    tokens = [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.tokenize(text)]
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert all(len(t) == 1 for t in digit_tokens), tokens
    assert len(digit_tokens) == sum(c.isdigit() for c in text)


def test_decode_inverts_encode():
    tokenizer = build_tokenizer()
    for text in VARIED_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_chat_template_renders_chatml():
    tokenizer = build_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "tool", "content": "{\"ok\": true}"},
        {"role": "user", "content": [{"type": "text", "text": "Again"}, {"type": "text", "text": "?"}]},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>tool\n{\"ok\": true}<|im_end|>\n"
        "<|im_start|>user\nAgain?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without_prompt = tokenizer.apply_chat_template(messages[:3], tokenize=False)
    assert without_prompt.endswith("<|im_start|>assistant\n4<|im_end|>\n")


def test_chat_template_renders_tool_calls_and_rejects_unknown_roles():
    tokenizer = build_tokenizer()
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "", "tool_calls": [call]}], tokenize=False
    )
    assert rendered.endswith(
        '<|im_start|>assistant\n\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><|im_end|>\n'
    )
    with pytest.raises(Exception, match="unknown role"):
        tokenizer.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


def test_chat_template_marks_assistant_tokens():
    tokenizer = build_tokenizer()
    messages = [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "3"}]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(marked) == "3<|im_end|>"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_autotokenizer_round_trip_gives_identical_ids(arch, tmp_path):
    path = create_tiny_model(tmp_path / arch, arch=arch)
    in_memory = build_tokenizer(arch=arch)
    loaded = AutoTokenizer.from_pretrained(path)
    if arch == "qwen2":
        # the pitfall this guards against: transformers rebuilds the tokenizer as Qwen2Tokenizer
        assert type(loaded).__name__ == "Qwen2Tokenizer"
    assert len(loaded) == len(in_memory)
    for text in VARIED_TEXTS:
        assert loaded(text)["input_ids"] == in_memory(text)["input_ids"], text
        ids = in_memory(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == in_memory.decode(ids)
    for generation_prompt in (False, True):
        expected = in_memory.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=generation_prompt)
        found = loaded.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=generation_prompt)
        assert found["input_ids"] == expected["input_ids"]
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id) == (
        in_memory.eos_token_id, in_memory.pad_token_id, None)


def test_round_trip_check_would_catch_a_mismatched_pre_tokenizer(tmp_path):
    # Control for the test above: a tokenizer trained with GPT-2 style splitting, saved beside a
    # qwen2 config, comes back with Qwen2's split and tokenizes some text differently.
    path = Path(create_tiny_model(tmp_path / "m"))
    backend = Tokenizer.from_file(str(path / "tokenizer.json"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    mismatched = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    mismatched.save_pretrained(path)
    loaded = AutoTokenizer.from_pretrained(path)
    assert type(loaded).__name__ == "Qwen2Tokenizer"
    assert any(loaded(text)["input_ids"] != mismatched(text)["input_ids"] for text in VARIED_TEXTS)


def test_config_errors():
    with pytest.raises(ConfigError, match="arch"):
        build_tokenizer(arch="gpt2")
    with pytest.raises(ConfigError, match="vocab-size"):
        build_tokenizer(vocab_size=100)
    with pytest.raises(ConfigError, match="size"):
        create_tiny_model("unused", size="huge")


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_model_saves_loads_and_counts_parameters(arch, tmp_path):
    path = create_tiny_model(tmp_path / "m", arch=arch)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == ("Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM")
    assert (Path(path) / "model.safetensors").exists()
    assert count_parameters(model) == _hand_param_count(arch, 1024, 64, 2, 4, 2, 128)
    assert model.config.pad_token_id == 0 and model.config.eos_token_id == 2
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    # a training step on the tiny model is quick (best of three after a warm-up, to ride out a busy machine)
    batch = torch.randint(3, 1024, (8, 32), generator=torch.Generator().manual_seed(0))
    durations = []
    for _ in range(4):
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        durations.append(time.perf_counter() - start)
    assert min(durations[1:]) < 2.0
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(1024.0)).item()) < 0.5


def test_small_and_untied_parameter_counts(tmp_path):
    config = AutoConfig.from_pretrained(create_tiny_model(tmp_path / "s", size="small", tie_word_embeddings=False))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert count_parameters(model) == _hand_param_count("qwen2", 1024, 256, 4, 4, 2, 768, tied=False)
    assert count_parameters(model) == 3_674_368


def test_models_are_deterministic_in_seed_and_leave_global_rng_alone(tmp_path):
    state = torch.get_rng_state()
    first = Path(create_tiny_model(tmp_path / "a", seed=3))
    second = Path(create_tiny_model(tmp_path / "b", seed=3))
    assert torch.equal(torch.get_rng_state(), state)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    third = Path(create_tiny_model(tmp_path / "c", seed=4))
    assert (first / "model.safetensors").read_bytes() != (third / "model.safetensors").read_bytes()


def test_vocab_size_is_respected(tmp_path):
    path = create_tiny_model(tmp_path / "v", vocab_size=512)
    assert len(AutoTokenizer.from_pretrained(path)) == 512
    assert AutoConfig.from_pretrained(path).vocab_size == 512


def test_reward_model_loads_as_sequence_classifier(tmp_path):
    path = create_tiny_reward_model(tmp_path / "rm", arch="llama")
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["What is 1 + 1? 2", "3"], return_tensors="pt", padding=True)
    scores = model(**batch).logits
    assert scores.shape == (2, 1)
    alone = model(**tokenizer(["3"], return_tensors="pt")).logits
    torch.testing.assert_close(scores[1], alone[0], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- cache and CLI


def test_tiny_model_path_builds_once_and_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    path = Path(tiny_model_path("llama", "tiny"))
    assert path.parent == tmp_path / "cache" / "tiny"
    assert path.name.startswith("llama-tiny-1024-0")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny_model_path("llama", "tiny") == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    AutoModelForCausalLM.from_pretrained(path)
    reward = tiny_model_path("llama", "tiny", reward=True)
    assert reward != str(path)
    AutoModelForSequenceClassification.from_pretrained(reward)


def test_tiny_model_path_survives_a_race_and_a_half_written_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    name = f"qwen2-tiny-1024-7-f{tiny.FACTORY_VERSION}"
    broken = tmp_path / "cache" / "tiny" / name
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{")  # a crashed writer left this, with no completion marker
    results, errors = [], []

    def worker():
        try:
            results.append(tiny_model_path("qwen2", "tiny", seed=7))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == [str(broken)] * 3
    assert json.loads((broken / "config.json").read_text())["model_type"] == "qwen2"
    leftovers = [p.name for p in broken.parent.iterdir() if p.name != name]
    assert leftovers == []


def test_init_model_main(tmp_path, capsys):
    out = tmp_path / "cli-model"
    assert init_model_main([str(out), "--arch", "llama", "--size", "tiny", "--vocab-size", "640", "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    expected = _hand_param_count("llama", 640, 64, 2, 4, 2, 128)
    assert str(out) in printed and f"{expected:,} parameters" in printed
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "llama" and config.vocab_size == 640
    assert init_model_main([str(tmp_path / "rm"), "--reward-model"]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "rm").num_labels == 1
    with pytest.raises(SystemExit) as exit_info:
        init_model_main([str(out), "--arch", "gpt2"])
    assert exit_info.value.code == 2


def test_tiny_template_renders_tool_schemas_and_calls():
    from posttrain.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2}}}]},
        {"role": "tool", "name": "add", "content": "5"},
    ]
    with_tools = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    without = tokenizer.apply_chat_template(messages, tokenize=False)
    assert with_tools.count("<|im_start|>system") == 1  # the schemas join the leading system turn
    assert '"name": "add"' in with_tools.split("</tools>")[0] and "Be brief." in with_tools.split("</tools>")[0]
    assert "<tools>" not in without
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call><|im_end|>' in with_tools
    assert with_tools.endswith("<|im_start|>tool\n5<|im_end|>\n")


def test_the_cached_tiny_tokenizer_has_the_current_chat_template(tiny_tokenizer):
    # a template change must change the cache key (FACTORY_VERSION), or every run keeps a stale template
    assert tiny_tokenizer.chat_template == tiny.CHATML_TEMPLATE
