"""Every logged value of a run, as JSON lines in ``<output_dir>/metrics.jsonl``.

Written by a callback that every posttrain trainer installs, so that plots and reports can be
made after the fact from the run directory alone (and survive a crash: each line is flushed).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"


class MetricsFileCallback(TrainerCallback):
    """Append each ``on_log`` record, with its step, to ``<output_dir>/metrics.jsonl`` (main process only)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero or not args.output_dir:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        record = {"step": state.global_step, **{k: _plain(v) for k, v in logs.items()}}
        with open(os.path.join(args.output_dir, METRICS_FILE), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/metrics.jsonl`` (empty if there is none)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric across records that carry it."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(int(record.get("step", len(steps))))
            values.append(float(value))
    return steps, values
