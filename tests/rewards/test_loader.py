from __future__ import annotations

import sys
import textwrap

import pytest

from posttrain.errors import ConfigError
from posttrain.rewards import BUILTIN_REWARDS, RewardModelScorer, load_reward_func, load_reward_funcs


def test_builtin_names_and_settings():
    accuracy, fmt, penalty = load_reward_funcs(["accuracy", "format", "length_penalty(target=2, scale=0.5)"])
    assert accuracy is BUILTIN_REWARDS["accuracy"] and fmt is BUILTIN_REWARDS["format"]
    assert penalty(["p"], ["x"], completion_ids=[[0] * 6]) == [-1.0]
    custom = load_reward_funcs("format(r'^\\d+$')")[0]
    assert custom(["p", "p"], ["123", "12a"]) == [1.0, 0.0]


def test_module_function(tmp_path, monkeypatch):
    package = tmp_path / "my_rewards"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scores.py").write_text(
        textwrap.dedent(
            """
            def shout(prompts, completions, **kwargs):
                return [float(c.isupper()) for c in completions]

            class Holder:
                @staticmethod
                def half(prompts, completions, **kwargs):
                    return [0.5] * len(completions)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    shout, half = load_reward_funcs(["my_rewards.scores:shout", "my_rewards.scores:Holder.half"])
    assert shout(["p", "p"], ["HI", "hi"]) == [1.0, 0.0]
    assert half(["p"], ["x"]) == [0.5]
    with pytest.raises(ConfigError) as info:
        load_reward_funcs(["my_rewards.scores:missing"])
    assert "has no attribute 'missing'" in str(info.value) and "shout" in str(info.value)
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        load_reward_funcs(["no_such_module:f"])
    for name in [m for m in sys.modules if m.startswith("my_rewards")]:
        monkeypatch.delitem(sys.modules, name)


def test_file_function(tmp_path):
    file = tmp_path / "reward_file.py"
    file.write_text(
        "def count_words(prompts, completions, **kwargs):\n"
        "    return [float(len(c.split())) for c in completions]\n"
        "VALUE = 3\n"
    )
    (function,) = load_reward_funcs([f"{file}:count_words"])
    assert function(["p", "p"], ["a b c", "d"]) == [3.0, 1.0]
    with pytest.raises(ConfigError, match="not a function"):
        load_reward_funcs([f"{file}:VALUE"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_reward_funcs([f"{tmp_path / 'absent.py'}:f"])
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="boom"):
        load_reward_funcs([f"{broken}:f"])


def test_model_directory(reward_model_dir):
    (scorer,) = load_reward_funcs([reward_model_dir])
    assert isinstance(scorer, RewardModelScorer)
    assert len(scorer(["hello"], [" there"])) == 1


def test_callables_pass_through_and_unknown_specs_list_the_forms(tmp_path):
    def mine(prompts, completions, **kwargs):
        return [0.0] * len(completions)

    assert load_reward_funcs([mine]) == [mine]
    with pytest.raises(ConfigError) as info:
        load_reward_funcs(["acuracy"])
    message = str(info.value)
    assert "'acuracy'" in message
    for part in ("accuracy", "incremental_format", "module:function", "file.py:function", "directory"):
        assert part in message
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_reward_funcs([str(tmp_path / "empty_dir")])
    with pytest.raises(ConfigError, match="values must be literals"):
        load_reward_funcs(["length_penalty(target=os.getcwd())"])
    with pytest.raises(ConfigError, match="length_penalty takes"):
        load_reward_funcs(["length_penalty(tgt=3)"])


def test_a_causal_lm_directory_is_refused_with_the_fix(tmp_path, tokenizer):
    # AutoModelForSequenceClassification would load it with a random score head and only a load report
    import transformers

    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=32)
    path = tmp_path / "sft"
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    with pytest.raises(ConfigError) as info:
        load_reward_funcs([str(path)])
    message = str(info.value)
    assert str(path) in message and "Qwen2ForCausalLM" in message
    assert "posttrain reward" in message and "AutoModelForSequenceClassification" in message
    assert info.value.field == "reward_funcs"
    with pytest.raises(ConfigError, match="not a reward model"):
        RewardModelScorer(str(path))


# ----------------------------------------------------------------------------- hub ids


@pytest.fixture(scope="module")
def tiny_reward_model_dir(tmp_path_factory):
    from posttrain.models.tiny import create_tiny_reward_model

    return create_tiny_reward_model(tmp_path_factory.mktemp("tiny-rm"))


def test_a_hub_id_loads_the_cached_reward_model(tiny_reward_model_dir, offline_hub_cache):
    offline_hub_cache.add(tiny_reward_model_dir, "org/tiny-rm")
    (by_id,) = load_reward_funcs("org/tiny-rm")
    (by_directory,) = load_reward_funcs([tiny_reward_model_dir])
    assert isinstance(by_id, RewardModelScorer) and by_id.__name__ == "tiny-rm"  # TRL names it by the id's last part
    prompts, completions = ["2 + 2 =", "The sky is"], [" 4", " green"]
    assert by_id(prompts, completions) == by_directory(prompts, completions)


def test_an_uncached_hub_id_offline_names_the_id_and_the_fix(offline_hub_cache):
    with pytest.raises(ConfigError) as info:
        load_reward_funcs(["org/not-downloaded"])
    message = str(info.value)
    assert "'org/not-downloaded'" in message and "HF_HUB_OFFLINE" in message and "hf download org/not-downloaded" in message
    assert info.value.field == "reward_funcs"


def test_a_misspelt_builtin_is_neither_loaded_nor_looked_up_without_a_hint(offline_hub_cache):
    with pytest.raises(ConfigError, match="did you mean 'accuracy'"):
        load_reward_funcs(["acuracy"])
    with pytest.raises(ConfigError, match="module or file function"):
        load_reward_funcs(["not a spec at all!"])


def test_a_tokenizer_given_for_a_reward_model_is_the_one_it_uses(tiny_reward_model_dir, offline_hub_cache):
    from transformers import AutoTokenizer

    offline_hub_cache.add(tiny_reward_model_dir, "org/tiny-rm")
    given = AutoTokenizer.from_pretrained(tiny_reward_model_dir)
    assert load_reward_func("org/tiny-rm", tokenizer=given).tokenizer is given
    assert load_reward_func(tiny_reward_model_dir, tokenizer=given).tokenizer is given
