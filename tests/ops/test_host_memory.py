"""Trimming the C heap before a large host allocation."""

import platform

import pytest
import torch

from posttrain.ops import host_memory


def _resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's heap")
def test_freed_heap_blocks_stop_counting_once_trimmed():
    blocks = [torch.ones(16 * 1024) for _ in range(3000)]  # 64 KiB each: served from the heap, not mmap
    pinned = torch.ones(16 * 1024)  # allocated above them, so freeing them cannot shrink the heap's top
    del blocks
    before = _resident_mb()
    assert host_memory.return_free_heap_pages()
    assert before - _resident_mb() > 100  # of the ~190 MB freed
    assert pinned.sum() == 16 * 1024


def test_only_a_large_cpu_allocation_trims(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "return_free_heap_pages", lambda: calls.append(1) or True)
    assert not host_memory.before_large_host_allocation(host_memory.FRESH_MAPPING_BYTES - 1, "cpu")
    assert not host_memory.before_large_host_allocation(2**30, "meta")
    assert host_memory.before_large_host_allocation(host_memory.FRESH_MAPPING_BYTES, torch.device("cpu"))
    assert calls == [1]
