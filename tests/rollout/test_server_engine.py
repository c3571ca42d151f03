"""The generation-server protocol in one process: a ``GenerationServer`` with the hf backend on a thread, and the
``ServerRolloutEngine`` client talking real HTTP to it (the subprocess run is in tests/trainers/test_grpo_server.py)."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.errors import ConfigError
from posttrain.rollout import HFRolloutEngine, SamplingParams, ServerRolloutEngine, sampling_keys
from posttrain.rollout.generation_server import GenerationServer, HFBackend, build_backend


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    backend = HFBackend(tiny_model_dir, dtype="float32", device="cpu")
    running = GenerationServer(backend, "127.0.0.1", 0)
    thread = threading.Thread(target=running.serve_forever, daemon=True)
    thread.start()
    yield running
    running.shutdown()


def _policy(tiny_model_dir, seed=None):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    if seed is not None:
        torch.manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
    return model


def test_the_server_samples_like_the_in_process_engine_with_the_pushed_weights(tiny_model_dir, server):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tokenizer(text)["input_ids"] for text in ("What is 1 + 2?", "Name a colour.", "Count to three:")]
    keys = sampling_keys(7, "train", 0, positions=range(3))
    sampling = SamplingParams(max_completion_length=8, temperature=0.9)
    moved = _policy(tiny_model_dir, seed=1)  # not the weights the server loaded from disk
    client = ServerRolloutEngine(moved, tokenizer, base_url=f"http://127.0.0.1:{server.port}", timeout=10,
                                 chunk_bytes=4096)  # many chunks
    assert client.info["backend"] == "hf" and client.info["weights_version"] == server.weights_version
    remote = client.generate(prompts, num_generations=3, sampling=sampling, prompt_keys=keys)
    local = HFRolloutEngine(moved, tokenizer, sampler_logprobs=True).generate(prompts, num_generations=3,
                                                                              sampling=sampling, prompt_keys=keys)
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "is_truncated", "prompt_index"):
        assert torch.equal(getattr(remote, name), getattr(local, name)), name
    torch.testing.assert_close(remote.sampler_logps, local.sampler_logps, atol=1e-6, rtol=1e-6)

    # layout independence: one prompt alone draws what it drew in the batch
    alone = client.generate(prompts[1:2], num_generations=3, sampling=sampling, prompt_keys=keys[1:2])
    width = alone.completion_ids.shape[1]
    assert torch.equal(alone.completion_ids, remote.completion_ids[3:6, :width])


def test_a_push_of_another_model_is_refused_with_the_reason(tiny_model_dir, server):
    from posttrain.models.tiny import tiny_model_path

    other_dir = tiny_model_path(vocab_size=512)
    other = AutoModelForCausalLM.from_pretrained(other_dir)
    with pytest.raises(ConfigError, match="serve the same model the trainer trains"):
        ServerRolloutEngine(other, AutoTokenizer.from_pretrained(other_dir), base_url=f"http://127.0.0.1:{server.port}",
                            timeout=10)


def test_a_client_that_does_not_sync_leaves_the_weights_alone(tiny_model_dir, server):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    version = server.weights_version
    ServerRolloutEngine(_policy(tiny_model_dir, seed=2), tokenizer, base_url=f"http://127.0.0.1:{server.port}",
                        timeout=10, sync_weights=False)
    assert server.weights_version == version


def test_the_hf_backend_refuses_what_it_cannot_do(tiny_model_dir):
    with pytest.raises(ConfigError, match="tensor_parallel_size=2"):
        build_backend("hf", tiny_model_dir, tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="backend"):
        build_backend("tgi", tiny_model_dir)
