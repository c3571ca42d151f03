"""A metric a reward function logs with log_metric is averaged over every call on every process, and a name
only one process logged neither hangs the others nor is lost (2 gloo processes, GRPO)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = textwrap.dedent('''
    import os, sys
    from datasets import Dataset
    from posttrain import GRPOConfig, GRPOTrainer
    from posttrain.models.tiny import tiny_model_path

    rank = int(os.environ.get("RANK", 0))

    def reporting(completions, log_metric, **kwargs):
        log_metric("process_rank", float(rank))
        if rank == 0:
            log_metric("only_on_rank0", 4.0)
            log_metric("only_on_rank0", 6.0)
        return [float(len(c)) for c in completions]

    args = GRPOConfig(output_dir=sys.argv[1], use_cpu=True, per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=4, max_steps=1, logging_steps=1, save_strategy="no", disable_tqdm=True,
                      report_to="none")
    dataset = Dataset.from_list([{"prompt": f"{i} + 1 ="} for i in range(4)])
    GRPOTrainer(tiny_model_path(), reward_funcs=reporting, args=args, train_dataset=dataset).train()
''')


def test_logged_metrics_are_averaged_over_processes(tmp_path, run_command):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    run_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                 str(out)], timeout=600)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = next(record for record in records if "loss" in record)
    assert logged["process_rank"] == pytest.approx(0.5)  # (0 + 1) / 2: one call on each process
    assert logged["only_on_rank0"] == pytest.approx(5.0)
