"""activation_offloading and tiled_mlp through the trainers: the same run, value for value, as without them."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from posttrain import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
from posttrain.models.offload import activation_offloading_enabled
from posttrain.models.tiling import position_wise_mlps

LEVERS = {"activation_offloading": True, "tiled_mlp": True, "sequence_tile_size": 4}
# plain SGD: Adam would turn float32 rounding in near-zero gradients into learning-rate-sized steps
COMMON = dict(max_steps=2, learning_rate=1e-1, optim="sgd", logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0)


def _chats(n=4):
    return Dataset.from_list([
        {"messages": [{"role": "user", "content": f"Count from {i} to {i + 9} in words, please."},
                      {"role": "assistant", "content": "one two three four five six seven eight nine ten " * (1 + i % 2)}]}
        for i in range(n)
    ])


def _preferences(n=4):
    return Dataset.from_list([{"prompt": f"Q{i}: what is {i}+1? Say it in a sentence.", "chosen": f" it is {i + 1}, I think",
                               "rejected": f" {i + 7} or so"} for i in range(n)])


def _losses_and_weights(trainer):
    layers_offloaded = activation_offloading_enabled(trainer.model)
    tiled = any(hasattr(m, "_posttrain_sequence_tile_size") for m in position_wise_mlps(trainer.model))
    trainer.train()
    losses = [h.get("loss", h.get("loss/policy")) for h in trainer.state.log_history if "loss" in h or "loss/policy" in h]
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return (layers_offloaded, tiled), losses, weights


@pytest.mark.parametrize("levers", [LEVERS, pytest.param({"activation_offloading": True, "gradient_checkpointing": True},
                                                          marks=pytest.mark.slow),
                                    pytest.param({"tiled_mlp": True, "sequence_tile_size": 4}, marks=pytest.mark.slow)])
def test_sft_with_levers_is_the_same_run(tiny_model_dir, tmp_path, levers):
    def run(options):
        args = SFTConfig(output_dir=str(tmp_path / str(len(options))), per_device_train_batch_size=2, **COMMON, **options)
        return _losses_and_weights(SFTTrainer(tiny_model_dir, args=args, train_dataset=_chats()))

    plain, levered = run({}), run(levers)
    assert levered[0] == (bool(levers.get("activation_offloading")), bool(levers.get("tiled_mlp")))
    assert levered[1] == pytest.approx(plain[1], rel=1e-5)
    for name, value in plain[2].items():
        assert torch.allclose(levered[2][name], value, rtol=1e-4, atol=1e-6), name


@pytest.mark.slow  # the levers in DPO's forward are the SFT path's
def test_dpo_with_levers_is_the_same_run(tiny_model_dir, tmp_path):
    def run(options):
        args = DPOConfig(output_dir=str(tmp_path / str(len(options))), per_device_train_batch_size=2, **COMMON, **options)
        return _losses_and_weights(DPOTrainer(tiny_model_dir, args=args, train_dataset=_preferences()))

    plain, levered = run({}), run(LEVERS)
    assert plain[0] == (False, False) and levered[0] == (True, True)
    assert levered[1] == pytest.approx(plain[1], rel=1e-5)
    for name, value in plain[2].items():
        assert torch.allclose(levered[2][name], value, rtol=1e-4, atol=1e-6), name


def _length_reward(completions, **kwargs):
    return [float(len(c if isinstance(c, str) else c[0]["content"])) / 10.0 for c in completions]


def test_grpo_with_levers_is_the_same_run(tiny_model_dir, tmp_path):
    prompts = Dataset.from_list([{"prompt": f"What is {i} + 1? Answer:"} for i in range(4)])

    def run(options):
        args = GRPOConfig(output_dir=str(tmp_path / str(len(options))), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=6, **COMMON, **options)
        return _losses_and_weights(GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=args,
                                               train_dataset=prompts))

    plain, levered = run({}), run(LEVERS)
    assert plain[0] == (False, False) and levered[0] == (True, True)
    assert levered[1] == pytest.approx(plain[1], rel=1e-5, abs=1e-7)
    for name, value in plain[2].items():
        assert torch.allclose(levered[2][name], value, rtol=1e-4, atol=1e-6), name


@pytest.mark.slow  # about 2 s
def test_sft_lora_with_levers_is_the_same_run(tiny_model_dir, tmp_path):
    """Frozen embeddings: the first layer's input needs no gradient, the adapters inside the layers do."""
    from peft import LoraConfig

    def run(options):
        args = SFTConfig(output_dir=str(tmp_path / str(len(options))), per_device_train_batch_size=2, **COMMON, **options)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
        torch.manual_seed(0)  # the adapters are drawn from the global generator when the trainer wraps the model
        return _losses_and_weights(SFTTrainer(tiny_model_dir, args=args, train_dataset=_chats(), peft_config=lora))

    plain, levered = run({}), run(LEVERS)
    assert levered[0] == (True, True)
    assert levered[1] == pytest.approx(plain[1], rel=1e-5)
    adapters = [name for name in plain[2] if "lora_" in name]
    assert adapters
    for name in adapters:
        assert torch.allclose(levered[2][name], plain[2][name], rtol=1e-4, atol=1e-6), name


@pytest.mark.slow  # about 6 s; the levers on these architectures are checked in float64 in tests/models
@pytest.mark.parametrize("arch", ["gpt2", "qwen3_moe"])
def test_sft_with_levers_is_the_same_run_on_other_architectures(arch, tmp_path):
    """GPT-2 (a KV cache passed to its blocks by position, Conv1D MLPs) and a MoE model whose router loss SFT adds."""
    from posttrain.models.tiny import build_tiny_model, build_tokenizer_variant

    tokenizer = build_tokenizer_variant("own_pad")
    # tiled_mlp on the MoE model tiles nothing (no dense MLP) and is refused; offloading alone there
    levers = LEVERS if arch == "gpt2" else {"activation_offloading": True}

    def run(options):
        overrides = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if arch == "gpt2" else {}
        model = build_tiny_model(arch, tokenizer, **overrides)
        args = SFTConfig(output_dir=str(tmp_path / str(len(options))), per_device_train_batch_size=2, **COMMON,
                         **options)
        return _losses_and_weights(SFTTrainer(model, args=args, train_dataset=_chats(), processing_class=tokenizer))

    plain, levered = run({}), run(levers)
    assert levered[0] == (True, arch == "gpt2")
    assert levered[1] == pytest.approx(plain[1], rel=1e-5)
    for name, value in plain[2].items():
        assert torch.allclose(levered[2][name], value, rtol=1e-4, atol=1e-6), name


def _sum_length_reward(completions, **kwargs):
    return [float(len(c if isinstance(c, str) else c[0]["content"])) / 10.0 for c in completions]


@pytest.mark.slow  # four methods, two runs each: about 10 s
@pytest.mark.parametrize("method", ["reward", "rloo", "online_dpo", "ppo"])
def test_the_other_methods_with_levers_are_the_same_run(method, tiny_model_dir, tmp_path):
    from posttrain import (OnlineDPOConfig, OnlineDPOTrainer, PPOConfig, PPOTrainer, RewardConfig, RewardTrainer,
                           RLOOConfig, RLOOTrainer)
    from posttrain.models.tiny import tiny_model_path

    prompts = Dataset.from_list([{"prompt": f"What is {i} + {i % 5}?"} for i in range(8)])

    def run(options):
        out = str(tmp_path / str(len(options)))
        if method == "reward":
            trainer = RewardTrainer(model=tiny_model_dir, train_dataset=_preferences(8), args=RewardConfig(
                output_dir=out, per_device_train_batch_size=4, **COMMON, **options))
        elif method == "rloo":
            trainer = RLOOTrainer(tiny_model_dir, reward_funcs=_sum_length_reward, train_dataset=prompts, args=RLOOConfig(
                output_dir=out, per_device_train_batch_size=4, num_generations=2, max_completion_length=6, **COMMON,
                **options))
        elif method == "online_dpo":
            trainer = OnlineDPOTrainer(tiny_model_dir, reward_funcs=_sum_length_reward, train_dataset=prompts,
                                       args=OnlineDPOConfig(output_dir=out, per_device_train_batch_size=2,
                                                            max_completion_length=5, **COMMON, **options))
        else:
            ppo_fields = {k: v for k, v in COMMON.items() if k != "max_steps"}
            trainer = PPOTrainer(model=tiny_model_dir, reward_model=tiny_model_path(reward=True), train_dataset=prompts,
                                 args=PPOConfig(output_dir=out, per_device_train_batch_size=4, total_episodes=8,
                                                response_length=6, num_ppo_epochs=2, num_mini_batches=2,
                                                num_sample_generations=0, **ppo_fields, **options))
        return _losses_and_weights(trainer)

    plain, levered = run({}), run(LEVERS)
    assert plain[0] == (False, False) and levered[0] == (True, True)
    assert levered[1] == pytest.approx(plain[1], rel=1e-5, abs=1e-7)
    for name, value in plain[2].items():
        assert torch.allclose(levered[2][name], value, rtol=1e-4, atol=1e-6), name


def test_grpo_scores_long_padded_rollouts_padding_free_with_the_same_run(tiny_model_dir, tmp_path, monkeypatch):
    """Rollouts of different lengths (EOS on) are padded; past PADDING_FREE_MIN_LENGTH columns the policy and the
    reference score them as one packed row. The threshold is lowered here so that the tiny run takes that path."""
    from posttrain.models import packed_attention

    prompts = Dataset.from_list([{"prompt": f"What is {i} + 1? Answer:"} for i in range(4)])
    calls = []
    original = packed_attention.padding_free_layout

    def spy(*args, **kwargs):
        layout = original(*args, **kwargs)
        calls.append(layout is not None)
        return layout

    monkeypatch.setattr("posttrain.models.lm_head.padding_free_layout", spy)

    def run(min_length):
        monkeypatch.setattr(packed_attention, "PADDING_FREE_MIN_LENGTH", min_length)
        calls.clear()
        args = GRPOConfig(output_dir=str(tmp_path / str(min_length)), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=12, beta=0.1, **COMMON)
        trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_length_reward, args=args, train_dataset=prompts)
        assert trainer.model.config._attn_implementation == "posttrain_packed_sdpa"
        result = _losses_and_weights(trainer)
        return result, list(calls)

    (plain, plain_calls), (packed, packed_calls) = run(10**9), run(1)
    assert plain_calls and not any(plain_calls)
    assert sum(packed_calls) >= 2  # the policy and the reference on the padded rollouts (step 2 has no padding)
    assert packed[1] == pytest.approx(plain[1], rel=1e-5, abs=1e-7)
    for name, value in plain[2].items():
        assert torch.allclose(packed[2][name], value, rtol=1e-4, atol=1e-6), name


def test_sft_scores_long_padded_batches_padding_free_with_the_same_run(tiny_model_dir, tmp_path, monkeypatch):
    from posttrain.models import packed_attention

    calls = []
    original = packed_attention.padding_free_layout
    monkeypatch.setattr("posttrain.models.lm_head.padding_free_layout",
                        lambda *a, **k: calls.append(original(*a, **k)) or calls[-1])

    def run(min_length):
        monkeypatch.setattr(packed_attention, "PADDING_FREE_MIN_LENGTH", min_length)
        calls.clear()
        args = SFTConfig(output_dir=str(tmp_path / str(min_length)), per_device_train_batch_size=2, **COMMON)
        result = _losses_and_weights(SFTTrainer(tiny_model_dir, args=args, train_dataset=_chats()))
        return result, [layout is not None for layout in calls]

    (plain, plain_calls), (packed, packed_calls) = run(10**9), run(1)
    assert plain_calls and not any(plain_calls) and all(packed_calls)  # every batch of _chats() is padded
    assert packed[1] == pytest.approx(plain[1], rel=1e-5)
    for name, value in plain[2].items():
        assert torch.allclose(packed[2][name], value, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("method", ["ppo", "reward", "reward_lora"])
def test_ppo_and_reward_models_score_long_padded_batches_padding_free_with_the_same_run(method, tiny_model_dir, tmp_path,
                                                                                       monkeypatch):
    """PPO's policy, reference, value and reward models and RewardTrainer's model read padded batches (left-padded
    prompts, pairs of different lengths) past PADDING_FREE_MIN_LENGTH columns as one packed row: the same run."""
    from peft import LoraConfig

    from posttrain import PPOConfig, PPOTrainer, RewardConfig, RewardTrainer
    from posttrain.models import packed_attention, reward_scoring, value_head
    from posttrain.models.tiny import tiny_model_path

    calls = {}
    original = packed_attention.padded_batch_as_packed_row

    def spy(where):
        def layout(*args, **kwargs):
            packed = original(*args, **kwargs)
            calls.setdefault(where, []).append(packed is not None)
            return packed
        return layout

    monkeypatch.setattr(packed_attention, "padded_batch_as_packed_row", spy("policy"))  # through token_logps
    monkeypatch.setattr(value_head, "padded_batch_as_packed_row", spy("value"))
    monkeypatch.setattr(reward_scoring, "padded_batch_as_packed_row", spy("reward"))
    prompts = Dataset.from_list([{"prompt": "What is 1 + 1?" + " Think." * (i % 3)} for i in range(8)])

    def run(min_length):
        monkeypatch.setattr(packed_attention, "PADDING_FREE_MIN_LENGTH", min_length)
        calls.clear()
        out = str(tmp_path / str(min_length))
        if method.startswith("reward"):
            lora = LoraConfig(r=4, target_modules="all-linear") if method == "reward_lora" else None
            trainer = RewardTrainer(model=tiny_model_dir, train_dataset=_preferences(8), peft_config=lora,
                                    args=RewardConfig(output_dir=out, per_device_train_batch_size=4, **COMMON))
        else:
            ppo_fields = {k: v for k, v in COMMON.items() if k != "max_steps"}
            trainer = PPOTrainer(model=tiny_model_dir, reward_model=tiny_model_path(reward=True), train_dataset=prompts,
                                 args=PPOConfig(output_dir=out, per_device_train_batch_size=4, total_episodes=8,
                                                response_length=6, num_ppo_epochs=2, num_mini_batches=2, kl_coef=0.1,
                                                num_sample_generations=0, **ppo_fields))
        return _losses_and_weights(trainer), {where: list(taken) for where, taken in calls.items()}

    (plain, plain_calls), (packed, packed_calls) = run(10**9), run(1)
    expected = {"reward"} if method.startswith("reward") else {"policy", "value", "reward"}
    assert set(plain_calls) == expected and not any(any(taken) for taken in plain_calls.values())
    assert set(packed_calls) == expected and all(any(taken) for taken in packed_calls.values())
    assert packed[1] == pytest.approx(plain[1], rel=1e-5, abs=1e-7)
    for name, value in plain[2].items():
        assert torch.allclose(packed[2][name], value, rtol=1e-4, atol=1e-6), name
