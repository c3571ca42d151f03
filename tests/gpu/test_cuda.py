"""The GPU paths: bf16 by default, every trainer on CUDA, the output head and rollouts on the device,
and clear errors for GPU extras that are not installed. Skipped where no CUDA GPU is present."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and POSTTRAIN_TEST_GPU=1")

from posttrain import (  # noqa: E402
    ConfigError,
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    OnlineDPOConfig,
    OnlineDPOTrainer,
    PPOConfig,
    PPOTrainer,
    RewardConfig,
    RewardTrainer,
    RLOOConfig,
    RLOOTrainer,
    SFTConfig,
    SFTTrainer,
    get_task,
)

CUDA = torch.device("cuda")
COMMON = dict(logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none", seed=0)


@pytest.fixture(scope="module")
def task():
    return get_task("arithmetic", max_operand=10)


@pytest.fixture(scope="module")
def reward_model_dir():
    from posttrain.models.tiny import tiny_model_path

    return tiny_model_path(reward=True)


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _on_cuda(model) -> bool:
    return all(param.device.type == "cuda" for param in model.parameters())


def test_configs_default_to_bf16_on_a_bf16_gpu():
    expected = torch.cuda.is_bf16_supported()
    for config_class in (SFTConfig, DPOConfig, RewardConfig, GRPOConfig, RLOOConfig, OnlineDPOConfig):
        assert config_class(output_dir="o").bf16 is expected, config_class.__name__
    assert SFTConfig(output_dir="o", use_cpu=True).bf16 is False


def test_sft_learns_in_bf16_and_saves_a_loadable_model(tiny_model_dir, task, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=30, per_device_train_batch_size=16,
                     learning_rate=3e-3, **COMMON)
    trainer = SFTTrainer(tiny_model_dir, args=args, train_dataset=task.as_messages(64))
    assert trainer.args.bf16 is torch.cuda.is_bf16_supported()
    trainer.train()
    assert _on_cuda(trainer.model)
    losses = _losses(trainer)
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3
    trainer.save_model()
    reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    generator = pipeline("text-generation", model=reloaded, tokenizer=tokenizer, device=0)
    out = generator("Question: What is 2 + 3?\nAnswer:", max_new_tokens=4, do_sample=False)
    assert isinstance(out[0]["generated_text"], str)


def test_chunked_logps_on_cuda_match_float64_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from posttrain.models.lm_head import token_logps
    from posttrain.ops import logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).to(CUDA).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (3, 24), generator=generator).to(CUDA)
    targets = torch.ones_like(input_ids)
    targets[:, :6] = 0
    with torch.no_grad():
        result = token_logps(model, input_ids, targets, torch.ones_like(input_ids), chunk_size=16)
        logits = model(input_ids=input_ids).logits.double()
    expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    expected = expected * targets[:, 1:]
    assert result.logps.device.type == "cuda"
    assert not any(key[0].type == "cuda" for key in logprobs._workspaces)  # the caching allocator recycles
    torch.testing.assert_close(result.logps.double(), expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        low = token_logps(model, input_ids, targets, torch.ones_like(input_ids), chunk_size=16)
    assert low.logps.dtype == torch.float32  # the head's softmax stays in float32 under autocast
    assert (low.logps.double() - expected).abs().max() < 0.1


def test_tied_head_gradient_after_the_layers_lowers_the_cuda_peak():
    """On CUDA the caching allocator reuses freed activations, so no trim is needed: with the tied hand-off
    (one (V, d) gradient, made after the layers' backward) the step's peak allocation is below plain
    autograd's, with the same gradients."""
    import contextlib

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from posttrain.models import lm_head

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=32_000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=256, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).to(CUDA)
    input_ids = torch.randint(0, config.vocab_size, (8, 256), device=CUDA)
    completion_mask = torch.ones_like(input_ids)

    def step():
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        lm_head.token_logps(model, input_ids, completion_mask).logps.sum().backward()
        torch.cuda.synchronize()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        return torch.cuda.max_memory_allocated() - start, grads

    @contextlib.contextmanager
    def plain(_model):
        yield None

    deferred_peak, deferred = step()
    original = lm_head.tied_embedding_lookups
    lm_head.tied_embedding_lookups = plain
    try:
        plain_peak, rebuilt = step()
    finally:
        lm_head.tied_embedding_lookups = original
    for name, grad in rebuilt.items():
        assert (deferred[name] - grad).norm() <= 1e-4 * grad.norm() + 1e-6, name
    assert deferred_peak < plain_peak, (deferred_peak, plain_peak)


def test_shared_prompt_forward_on_cuda_matches_the_full_forward(monkeypatch):
    from tests.models.test_shared_prompt import _logps_and_grads, build, grouped_rows

    model = build("qwen2").to(CUDA)
    rows = {name: value.to(CUDA) for name, value in grouped_rows().items()}
    full_logps, _, full_grads = _logps_and_grads(model, rows, False, monkeypatch)
    logps, _, grads = _logps_and_grads(model, rows, True, monkeypatch)
    torch.testing.assert_close(logps, full_logps, atol=1e-4, rtol=1e-4)
    for grad, full in zip(grads, full_grads):
        assert (grad - full).norm() <= 1e-4 * full.norm()


def test_rollouts_on_cuda_are_reproducible_and_the_lean_step_matches(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.rollout import HFRolloutEngine, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).to(CUDA)
    prompts = [tokenizer("Question: What is 3 + 4?\nAnswer:")["input_ids"], tokenizer("Question: 9 + 1?")["input_ids"]]
    sampling = SamplingParams(max_completion_length=12, temperature=1.0)
    batches = []
    for lean in (True, False):
        engine = HFRolloutEngine(model, tokenizer, lean_decode=lean)
        batches.append(engine.generate(prompts, num_generations=4, sampling=sampling,
                                       generator=torch.Generator(device="cuda").manual_seed(3)))
    lean_batch, plain_batch = batches
    assert lean_batch.completion_ids.device.type == "cuda"
    assert torch.equal(lean_batch.completion_ids, plain_batch.completion_ids)
    with pytest.raises(ConfigError, match="generator"):
        HFRolloutEngine(model, tokenizer).generate(prompts, sampling=sampling, generator=torch.Generator())


def test_dpo_and_reward_train_on_cuda(tiny_model_dir, reward_model_dir, task, tmp_path):
    pairs = task.as_preference(32)
    dpo = DPOTrainer(tiny_model_dir, args=DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=8,
                                                    per_device_train_batch_size=8, learning_rate=1e-3, **COMMON),
                     train_dataset=pairs)
    dpo.train()
    assert _on_cuda(dpo.model)
    losses = _losses(dpo)
    assert abs(losses[0] - math.log(2)) < 1e-2 and all(math.isfinite(loss) for loss in losses)
    reward = RewardTrainer(reward_model_dir, args=RewardConfig(output_dir=str(tmp_path / "rm"), max_steps=8,
                                                               per_device_train_batch_size=8, learning_rate=1e-3,
                                                               **COMMON),
                           train_dataset=pairs)
    reward.train()
    assert _on_cuda(reward.model) and all(math.isfinite(loss) for loss in _losses(reward))


def _accuracy_reward(completions, answer, **kwargs):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(str(a) in text) for text, a in zip(texts, answer)]


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_group_methods_train_on_cuda(method, tiny_model_dir, task, tmp_path):
    config_class, trainer_class = (GRPOConfig, GRPOTrainer) if method == "grpo" else (RLOOConfig, RLOOTrainer)
    args = config_class(output_dir=str(tmp_path / method), max_steps=3, per_device_train_batch_size=8,
                        num_generations=4, max_completion_length=8, learning_rate=1e-4, beta=0.04, **COMMON)
    trainer = trainer_class(tiny_model_dir, reward_funcs=_accuracy_reward, args=args,
                            train_dataset=task.as_prompt_only(16))
    trainer.train()
    assert _on_cuda(trainer.model)
    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert len(logged) == 3
    for entry in logged:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["kl"]) and 0.0 <= entry["reward"] <= 1.0
    completions = trainer.generate_completions(task.as_prompt_only(2).to_list())
    assert len(completions) == 2 * 4 and all(0.0 <= row["reward"] <= 1.0 for row in completions)


def test_online_dpo_trains_on_cuda(tiny_model_dir, reward_model_dir, task, tmp_path):
    args = OnlineDPOConfig(output_dir=str(tmp_path / "odpo"), max_steps=3, per_device_train_batch_size=4,
                           max_new_tokens=8, learning_rate=1e-4, **COMMON)
    trainer = OnlineDPOTrainer(tiny_model_dir, reward_funcs=reward_model_dir, args=args,
                               train_dataset=task.as_prompt_only(12))
    trainer.train()
    assert _on_cuda(trainer.model) and all(math.isfinite(loss) for loss in _losses(trainer))


def test_ppo_trains_on_cuda_and_saves_a_pipeline_model(tiny_model_dir, reward_model_dir, task, tmp_path):
    from transformers import pipeline

    args = PPOConfig(output_dir=str(tmp_path / "ppo"), per_device_train_batch_size=8, total_episodes=24,
                     response_length=8, num_ppo_epochs=2, num_mini_batches=2, learning_rate=1e-4,
                     num_sample_generations=0, **COMMON)
    trainer = PPOTrainer(args=args, model=tiny_model_dir, reward_model=reward_model_dir,
                         train_dataset=task.as_prompt_only(24, conversational=False))
    trainer.train()
    assert _on_cuda(trainer.model)
    logged = [entry for entry in trainer.state.log_history if "loss/policy" in entry]
    assert logged and all(math.isfinite(entry[key]) for entry in logged
                          for key in ("loss/policy", "loss/value", "objective/kl", "objective/scores"))
    trainer.save_model(args.output_dir)
    generator = pipeline("text-generation", model=args.output_dir, device=0)
    assert isinstance(generator("What is 1 + 2?", max_new_tokens=3)[0]["generated_text"], str)


def test_flash_attention_without_the_package_is_a_config_error(tiny_model_dir, tmp_path):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    args = SFTConfig(output_dir=str(tmp_path / "fa"), model_init_kwargs={"attn_implementation": "flash_attention_2"})
    with pytest.raises(ConfigError, match="flash-attn"):
        SFTTrainer(tiny_model_dir, args=args, train_dataset=get_task("arithmetic").as_messages(4))


def test_vllm_without_the_package_is_a_config_error(tiny_model_dir, task, tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    args = GRPOConfig(output_dir=str(tmp_path / "v"), max_steps=1, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=4, use_vllm=True, **COMMON)
    with pytest.raises(ConfigError, match="vllm"):
        trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_accuracy_reward, args=args,
                              train_dataset=task.as_prompt_only(4))
        trainer.train()


def test_bitsandbytes_request_without_the_package_is_a_config_error():
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    from posttrain.cli.args import ModelArguments

    with pytest.raises(ConfigError, match="bitsandbytes"):
        ModelArguments(model_name_or_path=os.devnull, load_in_4bit=True).model_init_kwargs()
