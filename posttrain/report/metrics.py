"""Every logged value of a run, as JSON lines in ``<output_dir>/metrics.jsonl``.

Written by a callback that every posttrain trainer installs, so that plots and reports can be
made after the fact from the run directory alone (and survive a crash: each line is flushed).
NaN and inf values are written as ``NaN``/``Infinity``, which Python's ``json`` reads back.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"


class MetricsFileCallback(TrainerCallback):
    """Append each ``on_log`` record, with its step, to ``<output_dir>/metrics.jsonl`` (main process only).

    At the start of training the file is made to describe this run only: a run resumed from step N
    keeps the rows up to step N and drops the later ones (the resumed run logs them again); a new
    run into a directory that already holds a ``metrics.jsonl`` moves it aside to
    ``metrics.<UTC time>.jsonl``. ``resume_step`` is set by the trainer before ``train`` (the
    Trainer loads its state after ``on_train_begin``); otherwise the state's own step is used.
    """

    def __init__(self) -> None:
        self.resume_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and args.output_dir:
            step = self.resume_step if self.resume_step is not None else state.global_step
            start_metrics_file(args.output_dir, step)
        self.resume_step = None
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero or not args.output_dir:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        record = {"step": state.global_step, **{k: _plain(v) for k, v in logs.items()}}
        with open(os.path.join(args.output_dir, METRICS_FILE), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def start_metrics_file(run_dir: str, resumed_step: int | None) -> None:
    """Prepare ``<run_dir>/metrics.jsonl`` for a run: truncated after ``resumed_step``, or moved aside for a new run."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return
    if resumed_step:
        kept = [line for line in _lines(path) if _step_of(line) <= resumed_step]
        temporary = path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
        os.replace(temporary, path)
        return
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(os.path.getmtime(path)))
    aside = os.path.join(run_dir, f"metrics.{stamp}.jsonl")
    suffix = 1
    while os.path.exists(aside):
        aside = os.path.join(run_dir, f"metrics.{stamp}-{suffix}.jsonl")
        suffix += 1
    os.replace(path, aside)


def _lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [line if line.endswith("\n") else line + "\n" for line in handle if line.strip()]


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):  # a line cut short by a crash
        return float("inf")


def _plain(value: Any) -> Any:
    # NaN and inf are written as JSON's NaN/Infinity extensions (json.loads reads them back): a diverged
    # step must show as NaN, not as a missing value
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
