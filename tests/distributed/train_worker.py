"""Short offline training runs, started by the distributed tests under torchrun or alone.

``python train_worker.py METHODS MODEL_DIR OUTPUT_ROOT PER_DEVICE_BATCH STEPS [FIELD=VALUE ...]`` trains each
of METHODS (comma-separated: sft, reward, dpo) for STEPS optimizer steps on a fixed embedded dataset and saves
its final weights to OUTPUT_ROOT/METHOD. FIELD=VALUE pairs (JSON values) override config fields. One process
with batch 8 and two processes with batch 4 see the same global batches.
"""

from __future__ import annotations

import json
import os
import sys


def _dataset(method: str, rows: int):
    from datasets import Dataset

    from posttrain.tasks import get_task

    preferences = get_task("arithmetic").as_preference(rows, conversational=True)
    if method == "sft":
        return Dataset.from_list([{"messages": row["prompt"] + row["chosen"]} for row in preferences])
    return preferences


def _trainer_classes(method: str):
    import posttrain

    names = {"sft": "SFT", "reward": "Reward", "dpo": "DPO"}
    return getattr(posttrain, names[method] + "Config"), getattr(posttrain, names[method] + "Trainer")


def main(argv: list[str]) -> int:
    methods, model_dir, output_root, batch, steps = argv[0].split(","), argv[1], argv[2], int(argv[3]), int(argv[4])
    overrides = {name: json.loads(value) for name, value in (pair.split("=", 1) for pair in argv[5:])}
    import torch

    torch.set_num_threads(1)
    for method in methods:
        config_class, trainer_class = _trainer_classes(method)
        output_dir = os.path.join(output_root, method)
        values = dict(output_dir=output_dir, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-3,
                      logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, report_to="none")
        trainer = trainer_class(model=model_dir, args=config_class(**{**values, **overrides}),
                                train_dataset=_dataset(method, 8 * steps))
        trainer.train()
        trainer.save_model(output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
