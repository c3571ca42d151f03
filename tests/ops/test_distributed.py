"""Global statistics equal the single-process ones, on two real gloo processes."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from posttrain.losses.entropy import high_entropy_mask
from posttrain.ops.distributed import all_gather_1d, all_reduce_sum, global_mean_std

VALUES = torch.tensor([0.5, 2.0, float("nan"), -1.0, 3.5, 0.0, 7.0, 1.25])
ENTROPY = torch.tensor([[1.0, 2.0, 1.2, 0.0], [1.5, 0.3, 0.9, 2.5], [0.2, 0.4, 3.0, 0.6]])
ENTROPY_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # uneven split: 3 values here, 5 there
    mine = VALUES[:3] if rank == 0 else VALUES[3:]
    mean, std = global_mean_std(mine)
    total = all_reduce_sum(torch.tensor([float(rank + 1)]))
    gathered = all_gather_1d(mine)
    rows = slice(0, 1) if rank == 0 else slice(1, 3)  # the micro-batch's rows, unevenly split
    high = high_entropy_mask(ENTROPY[rows], ENTROPY_MASK[rows], 0.5, gather=all_gather_1d)
    if rank == 0:
        torch.save({"mean": mean, "std": std, "total": total, "gathered": gathered, "high": high}, out)
    dist.destroy_process_group()


def test_single_process_matches_float64_by_hand():
    kept = VALUES[~torch.isnan(VALUES)].double()
    mean, std = global_mean_std(VALUES)
    assert torch.allclose(mean, kept.mean())
    assert torch.allclose(std, kept.std())


def test_mask_and_degenerate_counts():
    mask = torch.tensor([True, False, False, False, False, False, False, False])
    mean, std = global_mean_std(VALUES, mask)
    assert mean.item() == 0.5 and std.item() == 0.0
    mean, _ = global_mean_std(VALUES, torch.zeros(8, dtype=torch.bool))
    assert torch.isnan(mean)


def test_two_processes_equal_one(tmp_path):
    out = str(tmp_path / "stats.pt")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    got = torch.load(out)
    mean, std = global_mean_std(VALUES)
    assert torch.allclose(got["mean"], mean) and torch.allclose(got["std"], std)
    assert got["total"].item() == 3.0
    assert torch.equal(torch.nan_to_num(got["gathered"], nan=-9.0), torch.nan_to_num(VALUES, nan=-9.0))
    # the high-entropy threshold is the whole micro-batch's, however its rows are spread over processes
    assert torch.equal(got["high"], high_entropy_mask(ENTROPY, ENTROPY_MASK, 0.5)[:1])
    assert not torch.equal(got["high"], high_entropy_mask(ENTROPY[:1], ENTROPY_MASK[:1], 0.5))  # a local threshold differs
