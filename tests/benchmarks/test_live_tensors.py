"""The live-tensor counter behind benchmarks/live_tensors.py: freed storages leave the total, views count once,
and a peak reached inside the backward is charged to the autograd node running then."""

from __future__ import annotations

import torch

from benchmarks.live_tensors import LiveTensorPeaks


def test_the_total_follows_allocations_and_frees():
    with LiveTensorPeaks(min_bytes=1) as counter:
        first = torch.ones(1024)  # 4 KiB
        second = first * 2  # 8 KiB live
        del first, second
        third = torch.ones(1536)  # 6 KiB: under the 8 KiB peak
        view = third[:10] + 0  # a new 40-byte tensor
        alias = third[5:]  # a view: no new storage
        fourth = torch.ones(1024)  # 6 KiB + 40 B + 4 KiB
        assert counter.total == 6144 + 40 + 4096
    assert counter.peaks["forward"] == 6144 + 40 + 4096
    assert alias.untyped_storage().data_ptr() == third.untyped_storage().data_ptr()
    del view, fourth


def test_a_backward_peak_is_charged_to_its_node():
    weight = torch.ones(512, 512, requires_grad=True)  # made before counting: not counted
    with LiveTensorPeaks(min_bytes=1024) as counter:
        out = (weight @ weight).sum()
        out.backward()
    backward = {phase: peak for phase, peak in counter.peaks.items() if phase != "forward"}
    assert "MmBackward0" in backward
    # the matmul's (512, 512) output was freed after the sum; its backward makes two gradients of 1 MiB each
    assert backward["MmBackward0"] >= 2 * 2**20
    assert counter.peaks["forward"] == 2**20



def test_a_new_storage_at_a_freed_ones_address_is_counted():
    # the allocator may give a freed storage's address to the next output before the counter has seen the
    # free: keyed by address, the new storage must replace the old entry, not hide behind it. Two storages
    # over one buffer stand in for that reuse
    memory = bytearray(4096)
    source = torch.ones(1024)
    with LiveTensorPeaks(min_bytes=1) as counter:
        first = torch.frombuffer(memory, dtype=torch.float32)
        torch.add(source, 1, out=first)
        assert counter.total == 4096
        del first
        second = torch.frombuffer(memory, dtype=torch.float32)
        torch.add(source, 2, out=second)
        assert counter.total == 4096
    assert second.sum().item() == 3 * 1024


def test_a_storage_resized_to_nothing_leaves_the_total():
    with LiveTensorPeaks(min_bytes=1) as counter:
        kept = torch.ones(1024)  # 4 KiB
        freed = torch.ones(2048)  # 8 KiB
        assert counter.total == 12288
        freed.untyped_storage().resize_(0)  # its memory is gone, the storage object is not
        torch.ones(1)  # any operator: the counter looks again
        assert counter.total == 4096 + 4
    assert counter.peaks["forward"] == 12288
    assert kept.sum().item() == 1024 and freed.untyped_storage().nbytes() == 0
