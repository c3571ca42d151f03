"""Where a training step's peak memory is reached: resident memory sampled through each phase.

    python -m benchmarks.memory_phases --impl posttrain --method grpo --workload big-vocab --steps 3
    python -m benchmarks.memory_phases --impl trl --method grpo --workload big-vocab --steps 3

Builds the same trainer as ``benchmarks.worker`` and wraps its phases: sampling and scoring (the
online trainers' generation method), the loss forward (``compute_loss``), the backward
(``accelerator.backward``); anything else (optimizer step, data loading) is "other". A thread reads
the process's resident memory every few milliseconds and records, for each phase, the highest value
seen and how far it raised the process's high-water mark. CPU only; on Linux.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import threading
import time

PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20
GENERATION_METHODS = ("_generate_and_score", "_generate_and_score_completions")


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE_MB


class PhaseSampler:
    """Samples RSS in a thread; ``phase(name)`` wraps a callable so its calls are attributed to ``name``."""

    def __init__(self, interval_s: float = 0.003):
        self.interval_s = interval_s
        self.current = "other"
        self.peak = {}  # phase -> highest RSS seen while in it
        self.raised = {}  # phase -> MB by which it raised the high-water mark
        self.high_water = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        value, phase = rss_mb(), self.current
        self.peak[phase] = max(self.peak.get(phase, 0.0), value)
        if value > self.high_water:
            self.raised[phase] = self.raised.get(phase, 0.0) + value - self.high_water
            self.high_water = value

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval_s)

    def phase(self, name, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            outer = self.current
            self._sample()
            self.current = name
            try:
                return fn(*args, **kwargs)
            finally:
                self._sample()
                self.current = outer
        return wrapped

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def main(argv=None) -> int:
    from benchmarks.worker import build_trainer
    from benchmarks.workloads import workload_by_name

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["posttrain", "trl"], required=True)
    parser.add_argument("--method", default="grpo")
    parser.add_argument("--workload", default="big-vocab")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--options", default="{}", help="JSON of extra config fields")
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as out:
        options = {"activation_checkpointing": False, **json.loads(args.options)}
        trainer = build_trainer(args.impl, args.method, workload_by_name(args.workload), args.steps, out, options)
        sampler = PhaseSampler()
        for name in GENERATION_METHODS:
            if hasattr(trainer, name):
                setattr(trainer, name, sampler.phase("sampling+scoring", getattr(trainer, name)))
        trainer.compute_loss = sampler.phase("loss forward", trainer.compute_loss)
        trainer.accelerator.backward = sampler.phase("backward", trainer.accelerator.backward)
        loaded = rss_mb()
        with sampler:
            trainer.train()
    phases = sorted(sampler.peak, key=lambda p: -sampler.peak[p])
    print(f"{args.impl} {args.method} {args.workload}: RSS after loading {loaded:,.0f} MB, "
          f"high-water {sampler.high_water:,.0f} MB")
    for name in phases:
        print(f"  {name:<18} peak {sampler.peak[name]:>8,.0f} MB   raised the high-water mark by "
              f"{sampler.raised.get(name, 0.0):>7,.0f} MB")
    print("RESULT " + json.dumps({"impl": args.impl, "loaded_mb": loaded, "high_water_mb": sampler.high_water,
                                  "peak_mb": sampler.peak, "raised_mb": sampler.raised}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
