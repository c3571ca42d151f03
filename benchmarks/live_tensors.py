"""Peak bytes of live tensors during one training step, per phase: the forward, and each autograd node's backward.

    python -m benchmarks.live_tensors --impl trl --length 8192 --options '{"gradient_checkpointing": true}'
    python -m benchmarks.live_tensors --impl posttrain --length 8192 \
        --options '{"activation_offloading": true, "tiled_mlp": true}'

Resident memory says how high a step goes, not which part of it goes there. Here every tensor an
operator returns (on the CPU, at least ``--min-kb`` large) is counted from its creation until its
storage is freed; the running total's maximum is kept per phase, named by the autograd node
running when it was reached (``forward`` outside the backward). Two lengths then give each phase's
growth per token: the output head's phase stays flat in both libraries, the layers' phases grow.

Tensors that existed before the step (weights, optimizer state) and memory that is not a tensor
(the allocator's free lists, Python) are not counted, so the totals sit below peak RSS; a spilled
tensor read back from a file counts as live though its pages are the page cache's. The step runs
about twice as slowly under the counting. One step of the ``long-<length>`` SFT workload
(:func:`benchmarks.workloads.long_workload`), one thread.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorPeaks(TorchDispatchMode):
    """Counts the bytes of live tensor storages made by operators; ``peaks[phase]`` is the largest total seen
    while that phase ran. Views share their base's storage and count once."""

    def __init__(self, min_bytes: int = 1 << 16) -> None:
        super().__init__()
        self.min_bytes = min_bytes
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.total = 0
        self.peaks: dict[str, int] = collections.defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        node = torch._C._current_autograd_node()
        phase = type(node).__name__ if node is not None else "forward"
        # storages freed since the last operator leave first: a new storage may sit at a freed one's address
        self.forget_freed()
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                self.record(tensor.untyped_storage())
        self.peaks[phase] = max(self.peaks[phase], self.total)
        return out

    def record(self, storage) -> None:
        """Count ``storage`` from now until it is freed (once, however many tensors view it)."""
        key = storage.data_ptr()
        if storage.nbytes() >= self.min_bytes and key not in self.live:
            self.live[key] = (StorageWeakRef(storage), storage.nbytes())
            self.total += storage.nbytes()

    def forget_freed(self) -> None:
        """Drop storages freed since the last look, and count ones resized since (``resize_(0)`` frees one's
        memory while the storage object lives on) at their new size."""
        for key, (ref, nbytes) in list(self.live.items()):
            storage = None if ref.expired() else torch.UntypedStorage._new_with_weak_ptr(ref.cdata)
            now = 0 if storage is None else storage.nbytes()
            if now != nbytes:
                self.total += now - nbytes
                if now:
                    self.live[key] = (ref, now)
                else:
                    del self.live[key]


def measure(impl: str, length: int, options: dict, min_bytes: int) -> dict[str, int]:
    """Per-phase peaks (bytes) of one SFT step of ``long-<length>`` built as the length sweep builds it."""
    from benchmarks.worker import build_trainer
    from benchmarks.workloads import long_workload

    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(impl, "sft", long_workload(length), 1, out, options)
        counter = LiveTensorPeaks(min_bytes)
        with counter:
            trainer.train()
    return dict(counter.peaks)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=["posttrain", "trl"], required=True)
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--options", default="{}", help="JSON of extra config fields")
    parser.add_argument("--min-kb", type=int, default=64, help="smallest tensor counted")
    parser.add_argument("--top", type=int, default=8, help="phases printed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    peaks = measure(args.impl, args.length, json.loads(args.options), args.min_kb * 1024)
    top = sorted(peaks.items(), key=lambda item: -item[1])[: args.top]
    print(f"{'phase':50s} {'peak MB':>9s}")
    for phase, nbytes in top:
        print(f"{phase:50s} {nbytes / 2**20:9.1f}")
    print("RESULT " + json.dumps({"impl": args.impl, "length": args.length, "options": json.loads(args.options),
                                  "peaks_mb": {phase: round(nbytes / 2**20, 1) for phase, nbytes in top}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
