"""vllm_mode='server' against real vLLM (``posttrain vllm-serve --backend vllm``), and the bf16 in-process sampler's
gap and correction on a GPU. Skipped without a CUDA GPU (and, for the server, without vllm):
``POSTTRAIN_TEST_GPU=1 pytest tests/gpu/test_vllm_server.py``."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and POSTTRAIN_TEST_GPU=1")

from posttrain import GRPOConfig, GRPOTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMMON = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=8, learning_rate=5e-2,
              max_steps=2, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none", seed=0)


def _prompts(n=8):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i % 3}?"}]} for i in range(n)])


def _length(prompts, completions, **kwargs):
    return [len(c[0]["content"]) / 10.0 for c in completions]


def _gap_logs(trainer):
    return [r for r in trainer.state.log_history if "sampling/sampling_logp_difference/mean" in r]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")
def test_grpo_samples_from_a_real_vllm_server_and_pushes_its_weights(tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "posttrain", "vllm-serve", "--model", tiny_model_dir, "--backend", "vllm",
             "--host", "127.0.0.1", "--port", "0", "--gpu_memory_utilization", "0.3", "--max_model_len", "256",
             "--enforce_eager", "true"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
        )
    try:
        line = process.stdout.readline()
        assert "serving" in line, log.read_text()[-3000:]
        url = line.strip().rsplit(" at ", 1)[1]
        args = GRPOConfig(output_dir=str(tmp_path / "out"), use_vllm=True, vllm_mode="server", vllm_server_base_url=url,
                          vllm_server_timeout=120, **COMMON)
        trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_length, args=args, train_dataset=_prompts())
        trainer.train()
        engine = trainer._rollout_engine()
        assert engine.info["backend"] == "vllm" and engine.info["weights_version"] >= 3
        logs = _gap_logs(trainer)
        assert len(logs) == 2
        for record in logs:
            assert math.isfinite(record["sampling/sampling_logp_difference/mean"])
            assert record["sampling/sampling_logp_difference/mean"] < 0.5  # numerics, not other weights
            assert 0.0 <= record["sampling/importance_sampling_ratio/mean"] <= 3.0
        # the served weights are the trained ones: vLLM scores a completion like the trainer (up to its kernels)
        tokenizer = trainer.processing_class
        prompt, completion = tokenizer("What is 2 + 2?")["input_ids"], tokenizer(" four")["input_ids"]
        served = torch.tensor(engine.sequence_logps([prompt], [completion])[0])
        with torch.no_grad():
            ids = torch.tensor([prompt + completion], device=trainer.model.device)
            logits = trainer.model(input_ids=ids).logits.float()
        own = torch.log_softmax(logits[0, len(prompt) - 1 : -1], -1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1)
        torch.testing.assert_close(served, own.cpu(), atol=0.05, rtol=0.05)
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_bf16_in_process_sampling_logs_the_gap_and_corrects_it(tiny_model_dir, tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("needs a bf16 GPU")
    args = GRPOConfig(output_dir=str(tmp_path / "out"), vllm_importance_sampling_mode="token_truncate", **COMMON)
    assert args.bf16
    trainer = GRPOTrainer(tiny_model_dir, reward_funcs=_length, args=args, train_dataset=_prompts())
    trainer.train()
    logs = _gap_logs(trainer)
    assert len(logs) == 2  # every generation: bf16 sampler and trainer differ, so the loss is corrected
    assert all(0 < r["sampling/sampling_logp_difference/mean"] < 0.5 for r in logs)
    assert all(r["sampling/importance_sampling_ratio/max"] <= 3.0 for r in logs)
