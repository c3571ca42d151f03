"""GRPO with ``use_vllm=True, vllm_mode="server"`` against a real ``posttrain vllm-serve --backend hf`` process on
localhost: real HTTP, real weight pushes. Also the config checks of the vLLM fields and the sampler/trainer
agreement check of the in-process engine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from posttrain import ConfigError, GRPOConfig, GRPOTrainer
from posttrain.errors import RolloutMismatchError
from posttrain.rollout.hf_engine import HFRolloutEngine
from posttrain.rollout.sequences import RolloutSequences, completion_token_logps

ROOT = Path(__file__).resolve().parents[2]


def _prompts(n=8):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i % 3}?"}]} for i in range(n)])


def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=6, learning_rate=5e-2, max_steps=2, logging_steps=1, save_strategy="no",
                  disable_tqdm=True, report_to="none", seed=3)
    values.update(overrides)
    return GRPOConfig(**values)


class RecordingReward:
    """A length reward that keeps every completion it scores, in order."""

    def __init__(self):
        self.seen: list[str] = []
        self.__name__ = "length"

    def __call__(self, prompts, completions, **kwargs):
        texts = [c[0]["content"] for c in completions]
        self.seen.extend(texts)
        return [len(text) / 10.0 for text in texts]


@pytest.fixture(scope="module")
def server_url(tiny_model_dir, tmp_path_factory):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    log = tmp_path_factory.mktemp("server") / "stderr.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "posttrain", "vllm-serve", "--model", tiny_model_dir, "--backend", "hf",
             "--host", "127.0.0.1", "--port", "0", "--dtype", "float32", "--device", "cpu"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
        )
    try:
        line = process.stdout.readline()  # the one line it prints once it listens (empty if it died)
        assert "serving" in line, f"the server did not start: {log.read_text()[-2000:]}"
        yield line.strip().rsplit(" at ", 1)[1]
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow  # starts a server process (~20 s on a busy machine) and trains twice
def test_server_mode_samples_what_the_in_process_engine_samples_and_follows_the_weights(tiny_model_dir, server_url, tmp_path):
    local_reward, server_reward = RecordingReward(), RecordingReward()
    local = GRPOTrainer(tiny_model_dir, reward_funcs=local_reward, args=_config(tmp_path / "local"), train_dataset=_prompts())
    local.train()
    remote = GRPOTrainer(tiny_model_dir, reward_funcs=server_reward, train_dataset=_prompts(),
                         args=_config(tmp_path / "server", use_vllm=True, vllm_mode="server",
                                      vllm_server_base_url=server_url, vllm_server_timeout=60))
    initial = {name: p.detach().clone() for name, p in remote.model.named_parameters()}
    remote.train()

    # (a) the same completions as in-process sampling with the same seed, in both steps (step 2 after a push)
    assert len(server_reward.seen) == 8 and server_reward.seen == local_reward.seen
    # the gap is numerical noise, so the importance weights are ~1 and the runs train alike
    logged = [r for r in remote.state.log_history if "sampling/sampling_logp_difference/mean" in r]
    assert len(logged) == 2
    assert all(r["sampling/sampling_logp_difference/mean"] < 1e-4 for r in logged)
    assert all(r["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-3) for r in logged)

    # (b) after a push, the server scores a fixed sequence with the trainer's current weights
    engine = remote._rollout_engine()  # global step 2 is not synced yet: pushes now
    assert engine.info["weights_version"] >= 3  # at construction, after step 1, after step 2
    tokenizer = remote.processing_class
    prompt = tokenizer("What is 2 + 2?")["input_ids"]
    completion = tokenizer(" four, then five")["input_ids"]
    served = torch.tensor(engine.sequence_logps([prompt], [completion])[0])
    rows = RolloutSequences(prompt_ids=torch.tensor([prompt]), prompt_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            completion_ids=torch.tensor([completion]),
                            completion_mask=torch.ones(1, len(completion), dtype=torch.long),
                            loss_mask=torch.ones(1, len(completion), dtype=torch.long), is_truncated=torch.zeros(1, dtype=torch.bool))
    with torch.no_grad():
        trained, _ = completion_token_logps(remote.model, rows)
        for name, param in remote.model.named_parameters():
            param.copy_(initial[name])
        before, _ = completion_token_logps(remote.model, rows)
    torch.testing.assert_close(served, trained[0], atol=1e-5, rtol=1e-5)
    assert (served - before[0]).abs().max() > 1e-3  # the weights moved, and the server has the moved ones


@pytest.mark.slow  # waits for a timeout
def test_a_server_that_does_not_answer_is_a_clear_config_error(tiny_model_dir, tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts connections into the backlog and never answers
    port = silent.getsockname()[1]
    try:
        args = _config(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_host="127.0.0.1", vllm_server_port=port,
                       vllm_server_timeout=1.0)
        start = time.monotonic()
        with pytest.raises(ConfigError) as info:
            GRPOTrainer(tiny_model_dir, reward_funcs=RecordingReward(), args=args, train_dataset=_prompts())
        assert time.monotonic() - start < 15
    finally:
        silent.close()
    message = str(info.value)
    assert "vllm_server_timeout" in message and f"127.0.0.1:{port}" in message and "posttrain vllm-serve" in message
    assert "\n" not in message


def test_vllm_serve_without_vllm_asks_for_vllm_or_the_hf_backend(tiny_model_dir, capsys):
    import importlib.util

    from posttrain.cli.main import main

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    assert main(["vllm-serve", "--model", tiny_model_dir]) == 2
    error = capsys.readouterr().err
    assert "vllm package is not installed" in error and "--backend hf" in error
    assert main(["vllm-serve", "--model", tiny_model_dir, "--backend", "hf", "--tensor_parallel_size", "2"]) == 2
    assert "tensor_parallel_size=2" in capsys.readouterr().err


@pytest.mark.parametrize("fields, flag", [
    (dict(use_vllm=True, vllm_mode="server", vllm_tensor_parallel_size=2), "--tensor_parallel_size"),
    (dict(use_vllm=True, vllm_mode="colocate", vllm_tensor_parallel_size=2), "no CUDA GPU"),
    (dict(use_vllm=True, vllm_mode="remote"), "vllm_mode"),
    (dict(use_vllm=True, vllm_model_impl="jax"), "vllm_model_impl"),
    (dict(vllm_group_port=51217), "HTTP port"),
    (dict(vllm_structured_outputs_regex=r"\d+"), "use_vllm"),
    (dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None), "both bounds"),
])
def test_vllm_fields_that_cannot_work_are_refused(fields, flag, tmp_path):
    with pytest.raises(ConfigError, match=flag):
        _config(tmp_path, **fields)


def test_trl_defaults_and_the_older_cap_name(tmp_path):
    config = _config(tmp_path)
    assert (config.vllm_mode, config.vllm_server_host, config.vllm_server_port, config.vllm_server_timeout) == (
        "colocate", "0.0.0.0", 8000, 240.0)
    assert (config.vllm_importance_sampling_correction, config.vllm_importance_sampling_mode,
            config.vllm_importance_sampling_clip_max, config.vllm_importance_sampling_clip_min) == (True, "sequence_mask", 3.0, None)
    assert _config(tmp_path, vllm_importance_sampling_cap=2.5).vllm_importance_sampling_clip_max == 2.5
    assert _config(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_base_url="http://h:1/").rollout_engine_options() == (
        "server", {"base_url": "http://h:1/", "host": "0.0.0.0", "port": 8000, "timeout": 240.0,
                   "structured_outputs_regex": None})


# ----------------------------------------------------------------------------- the in-process agreement check


@pytest.mark.slow  # two runs
def test_in_process_sampler_and_trainer_agree_and_a_corrupted_sampler_stops_the_run(tiny_model_dir, tmp_path, monkeypatch):
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=RecordingReward(), args=_config(tmp_path / "ok", max_steps=1),
                          train_dataset=_prompts())
    trainer.train()
    checked = [r for r in trainer.state.log_history if "sampling/sampling_logp_difference/mean" in r]
    assert len(checked) == 1 and checked[0]["sampling/sampling_logp_difference/mean"] < 1e-4

    original = HFRolloutEngine.generate

    def corrupted(self, *args, **kwargs):
        batch = original(self, *args, **kwargs)
        if batch.sampler_logps is not None:  # as if the trainer scored other tokens than were sampled
            batch.sampler_logps = batch.sampler_logps - 0.5 * batch.completion_mask
        return batch

    monkeypatch.setattr(HFRolloutEngine, "generate", corrupted)
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=RecordingReward(), args=_config(tmp_path / "bad", max_steps=1),
                          train_dataset=_prompts())
    with pytest.raises(RolloutMismatchError, match="chat template re-rendered"):
        trainer.train()


def test_grpo_loss_is_weighed_by_the_sampling_weights(tiny_model_dir, tmp_path):
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=RecordingReward(), args=_config(tmp_path), train_dataset=_prompts())
    torch.manual_seed(0)
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    rows = RolloutSequences(prompt_ids=torch.randint(5, 100, (4, 3)), prompt_mask=torch.ones(4, 3, dtype=torch.long),
                            completion_ids=torch.randint(5, 100, (4, 4)), completion_mask=completion_mask,
                            loss_mask=completion_mask.clone(), is_truncated=torch.zeros(4, dtype=torch.bool),
                            advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]), num_items_in_batch=completion_mask.sum().float())
    trainer.model.eval()
    with torch.no_grad():
        plain = trainer.compute_loss(trainer.model, rows)
        weights = torch.tensor([0.5, 2.0, 1.5, 3.0]).unsqueeze(1) * completion_mask
        weighted = trainer.compute_loss(trainer.model, rows.replace(sampling_weights=weights))
        # on-policy the ratio is 1: each token's loss is -A, so the weighted loss is -sum(w * A) / tokens
        expected = -(weights * rows.advantages.unsqueeze(1)).sum() / completion_mask.sum()
    assert plain.item() == pytest.approx(-(completion_mask * rows.advantages.unsqueeze(1)).sum().item() / 10, abs=1e-6)
    assert weighted.item() == pytest.approx(expected.item(), abs=1e-6)


def test_mixed_precision_sampling_is_corrected_at_every_generation(tiny_model_dir, tmp_path, monkeypatch):
    # bf16 needs a GPU (tests/gpu covers it); here the engine is told it samples in another precision
    monkeypatch.setattr("posttrain.trainers.sampler_gap.mixed_precision", lambda args: True)
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=RecordingReward(), train_dataset=_prompts(),
                          args=_config(tmp_path, vllm_importance_sampling_mode="token_truncate"))
    weights_seen = []
    original = GRPOTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        weights_seen.append(inputs.sampling_weights)
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "compute_loss", recording)
    trainer.train()
    assert len([r for r in trainer.state.log_history if "sampling/importance_sampling_ratio/mean" in r]) == 2
    assert len(weights_seen) == 2 and all(w is not None for w in weights_seen)
    assert all(torch.allclose(w, w.new_ones(()).expand_as(w) * (w > 0), atol=1e-3) for w in weights_seen)

    # without the correction the in-process engine is not even asked for its log-probs
    assert not trainer._sampler_gap.wants_sampler_logps(trainer.args, "train", corrects=False)
    assert trainer._sampler_gap.wants_sampler_logps(trainer.args, "train", corrects=True)
