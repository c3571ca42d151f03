"""A two-process CPU run leaves no gloo group alive for interpreter finalisation, where gloo's worker threads
can abort the process ("terminate called without an active exception", exit code -6) after it trained."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = textwrap.dedent('''
    import atexit, json, os, sys
    import torch.distributed as dist
    from datasets import Dataset
    from posttrain import SFTConfig, SFTTrainer
    from posttrain.models.tiny import tiny_model_path

    rank = os.environ["RANK"]

    def record():  # registered first, so it runs after any exit handler registered later
        with open(os.path.join(sys.argv[1], f"exit-{rank}.json"), "w") as handle:
            json.dump({"group_alive_at_exit": dist.is_initialized()}, handle)

    os.makedirs(sys.argv[1], exist_ok=True)
    atexit.register(record)
    args = SFTConfig(output_dir=sys.argv[1], per_device_train_batch_size=2, max_steps=1, save_strategy="no",
                     disable_tqdm=True, report_to="none")
    dataset = Dataset.from_list([{"text": f"{i} + 1 = {i + 1}"} for i in range(8)])
    trainer = SFTTrainer(tiny_model_path(), args=args, train_dataset=dataset)
    trainer.train()
    assert dist.is_initialized() and dist.get_backend() == "gloo"
''')


def test_the_gloo_group_is_destroyed_before_the_interpreter_exits(tmp_path, run_command):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    run_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                 str(out)], timeout=600)
    for rank in (0, 1):
        assert json.loads((out / f"exit-{rank}.json").read_text()) == {"group_alive_at_exit": False}
