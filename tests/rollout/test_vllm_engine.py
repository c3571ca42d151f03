from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.rollout import SamplingParams, VLLMRolloutEngine, make_rollout_engine
from posttrain.rollout.vllm_engine import _named_weights_for_vllm


def test_missing_vllm_is_one_clear_config_error(qwen2, tokenizer, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    with pytest.raises(ConfigError) as info:
        make_rollout_engine("vllm", qwen2, tokenizer)
    message = str(info.value)
    assert "vllm" in message and "not installed" in message and "'hf'" in message
    assert "\n" not in message


def test_vllm_without_cuda_is_one_clear_config_error(qwen2, tokenizer, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA GPU"):
        VLLMRolloutEngine(qwen2, tokenizer)


def test_weights_sent_to_vllm_are_merged_with_plain_names(tokenizer, make_qwen2):
    peft = pytest.importorskip("peft")
    base = make_qwen2(tokenizer, seed=2)
    plain_names = set(dict(base.named_parameters()))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    weight_before = layer.base_layer.weight.detach().clone()
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
    sent = {name: tensor.clone() for name, tensor in _named_weights_for_vllm(model)}
    assert set(sent) == plain_names
    assert torch.allclose(sent["model.layers.0.self_attn.q_proj.weight"], weight_before + delta, atol=1e-6)
    assert torch.equal(layer.base_layer.weight, weight_before)  # unmerged afterwards


# ----------------------------------------------------------------------------- against a stand-in vllm module
# vLLM needs a CUDA GPU, so these tests replace the `vllm` module with a scripted one that records what the
# engine asks of it and answers in vLLM's output shapes (RequestOutput.outputs[j].token_ids / finish_reason).


class _ScriptedLLM:
    instances: list[_ScriptedLLM] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.loads: list[dict[str, torch.Tensor]] = []
        self.requests: list[tuple[list, object]] = []
        self.prefix_cache_resets = 0
        self.sleep_calls: list[str] = []
        runner_model = types.SimpleNamespace(load_weights=self._load_weights)
        worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=runner_model))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(worker=worker)))
        _ScriptedLLM.instances.append(self)

    def _load_weights(self, weights):
        if not self.loads or self._load_complete:
            self.loads.append({})
            self._load_complete = False
        for name, tensor in weights:
            self.loads[-1][name] = tensor.detach().clone()

    def sleep(self, level=1):
        self.sleep_calls.append(f"sleep{level}")

    def wake_up(self):
        self.sleep_calls.append("wake")

    def reset_prefix_cache(self):
        self.prefix_cache_resets += 1
        self._load_complete = True  # the engine resets the cache once all weights are in

    def generate(self, requests, sampling_params, use_tqdm=False):
        self.requests.append((requests, sampling_params))
        outputs = []
        for i, request in enumerate(requests):
            # like vLLM: one SamplingParams for every request, or a list with one per request
            params = sampling_params[i] if isinstance(sampling_params, list) else sampling_params
            eos = params.stop_token_ids[0]
            samples = []
            for j in range(params.n):
                length = 1 + (i + 2 * j) % params.max_tokens
                stops = length < params.max_tokens
                ids = [10 + (i * 7 + j * 3 + k) % 50 for k in range(length - 1)] + ([eos] if stops else [11])
                sample = types.SimpleNamespace(token_ids=ids, finish_reason="stop" if stops else "length")
                if getattr(params, "logprobs", None) is not None:  # {token: Logprob} per position, as vLLM
                    sample.logprobs = [{t: types.SimpleNamespace(logprob=-0.01 * t)} for t in ids]
                samples.append(sample)
            outputs.append(types.SimpleNamespace(prompt_token_ids=request["prompt_token_ids"], outputs=samples))
        return outputs


@pytest.fixture
def scripted_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM = _ScriptedLLM
    module.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    module.sampling_params = types.SimpleNamespace(StructuredOutputsParams=lambda **kw: types.SimpleNamespace(**kw))
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr("posttrain.rollout.vllm_engine._check_vllm_available", lambda: None)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    _ScriptedLLM.instances = []
    return _ScriptedLLM


def test_vllm_engine_packs_outputs_like_the_hf_engine(qwen2, tokenizer, prompts, scripted_vllm):
    qwen2.name_or_path = "models/tiny-qwen2"
    engine = make_rollout_engine("vllm", qwen2, tokenizer, gpu_memory_utilization=0.25, max_model_len=64)
    llm = scripted_vllm.instances[-1]
    assert llm.kwargs["model"] == "models/tiny-qwen2"
    assert llm.kwargs["gpu_memory_utilization"] == 0.25 and llm.kwargs["max_model_len"] == 64
    assert llm.kwargs["enable_prefix_caching"] is True
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # in-process, so weights can be loaded in place
    assert set(llm.loads[0]) == set(dict(qwen2.named_parameters())) and llm.prefix_cache_resets == 1

    sampling = SamplingParams(max_completion_length=4, temperature=0.7, top_k=0)
    batch = engine.generate(prompts, num_generations=3, sampling=sampling, generator=torch.Generator().manual_seed(0))
    requests, params = llm.requests[-1]
    assert [r["prompt_token_ids"] for r in requests] == prompts
    assert (params.n, params.max_tokens, params.temperature, params.top_k) == (3, 4, 0.7, -1)
    assert params.stop_token_ids == [tokenizer.eos_token_id] and isinstance(params.seed, int)

    assert batch.group_size == 3 and batch.completion_ids.shape == (9, 4)
    assert batch.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    longest = max(len(p) for p in prompts)
    for row in range(9):
        prompt = prompts[row // 3]
        # prompts left-padded, each repeated for its group
        assert batch.prompt_ids[row, longest - len(prompt):].tolist() == prompt
        assert batch.prompt_mask[row].sum().item() == len(prompt)
    # request i, sample j has 1 + (i + 2j) % 4 tokens and stops at EOS unless it reached 4 tokens
    lengths = [1 + (i + 2 * j) % 4 for i in range(3) for j in range(3)]
    assert batch.completion_mask.sum(dim=1).tolist() == lengths
    assert batch.is_truncated.tolist() == [n == 4 for n in lengths]
    first = batch.completion_ids[1, :lengths[1]].tolist()
    assert first[-1] == tokenizer.eos_token_id and batch.completion_ids[1, lengths[1]:].eq(tokenizer.pad_token_id).all()
    assert batch.completion_ids.device == next(qwen2.parameters()).device

    greedy = SamplingParams(max_completion_length=4, temperature=0.0)
    engine.generate(prompts, sampling=greedy)
    assert llm.requests[-1][1].temperature == 0.0 and llm.requests[-1][1].seed is None


def test_grpo_with_vllm_sends_the_updated_weights_before_each_rollout(tiny_model_dir, tmp_path, scripted_vllm):
    from datasets import Dataset
    from transformers import TrainerCallback

    from posttrain import GRPOConfig, GRPOTrainer

    weights_after_step: dict[int, torch.Tensor] = {}

    class RecordWeights(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            weights_after_step[state.global_step] = model.get_input_embeddings().weight.detach().clone()

    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}]} for i in range(8)])
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=5, learning_rate=1e-2, max_steps=2, logging_steps=1, save_strategy="no",
                      disable_tqdm=True, report_to="none", use_vllm=True, vllm_gpu_memory_utilization=0.4)
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=lambda prompts, completions, **kw: [float(len(str(c))) for c in completions],
                          args=args, train_dataset=prompts, callbacks=[RecordWeights()])
    initial = trainer.model.get_input_embeddings().weight.detach().clone()
    trainer.train()

    llm = scripted_vllm.instances[-1]
    assert len(scripted_vllm.instances) == 1 and llm.kwargs["gpu_memory_utilization"] == 0.4
    # one SamplingParams per prompt, seeded from the prompt's sampling key (one prompt per step here)
    assert len(llm.requests) == 2 and all(len(params) == 1 for _, params in llm.requests)
    assert all(params[0].n == 4 and params[0].max_tokens == 5 for _, params in llm.requests)
    assert llm.requests[0][1][0].seed != llm.requests[1][1][0].seed
    # weights at construction, then the weights after step 1 before step 2's rollout
    assert len(llm.loads) == 2
    assert torch.equal(llm.loads[0]["model.embed_tokens.weight"], initial)
    assert torch.equal(llm.loads[1]["model.embed_tokens.weight"], weights_after_step[1])
    assert not torch.equal(weights_after_step[1], initial)
    # the logged completion lengths are the scripted ones: one prompt x 4 samples of 1 + 2j % 5 tokens
    lengths = [1, 3, 5, 2]
    logged = [record for record in trainer.state.log_history if "completions/mean_length" in record]
    assert logged[0]["completions/mean_length"] == pytest.approx(sum(lengths) / 4)
    assert logged[0]["completions/clipped_ratio"] == pytest.approx(1 / 4)


def test_colocate_fields_reach_vllm_and_its_log_probs_come_back(qwen2, tokenizer, prompts, scripted_vllm):
    qwen2.name_or_path = "models/tiny-qwen2"
    engine = make_rollout_engine("vllm", qwen2, tokenizer, tensor_parallel_size=1, model_impl="transformers",
                                 enable_sleep_mode=True, sampler_logprobs=True, structured_outputs_regex=r"\d+")
    llm = scripted_vllm.instances[-1]
    assert (llm.kwargs["tensor_parallel_size"], llm.kwargs["model_impl"]) == (1, "transformers")
    assert llm.kwargs["enable_sleep_mode"] is True and llm.kwargs["logprobs_mode"] == "processed_logprobs"
    batch = engine.generate(prompts, num_generations=2, sampling=SamplingParams(max_completion_length=4))
    params = llm.requests[-1][1]
    assert params.logprobs == 0 and params.structured_outputs.regex == r"\d+"
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(batch.sampler_logps[mask], -0.01 * batch.completion_ids[mask].float())
    assert batch.sampler_logps[~mask].eq(0).all()
    assert llm.sleep_calls == ["sleep1"]  # asleep between rollouts, so the optimizer step has the memory
    engine.load_weights(qwen2)
    engine.generate(prompts, sampling=SamplingParams(max_completion_length=4))
    assert llm.sleep_calls == ["sleep1", "wake", "sleep1"]


def test_tensor_parallel_over_more_gpus_than_visible_is_refused(qwen2, tokenizer, scripted_vllm):
    with pytest.raises(ConfigError, match="vllm_tensor_parallel_size=2"):
        make_rollout_engine("vllm", qwen2, tokenizer, tensor_parallel_size=2)
