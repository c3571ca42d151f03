"""Giving the C heap's free pages back to the operating system before a large host allocation.

glibc serves a request of more than 32 MiB (the ceiling of its dynamic mmap threshold) with a fresh
mapping, whatever its free lists hold, and keeps the pages of freed smaller blocks (a backward's
spent activations) resident until the heap is trimmed. Freed activations and a new (V, d) gradient
would then both count in the process's resident memory. ``malloc_trim`` hands the free pages back;
on another C library (musl, macOS) there is nothing to call and nothing is done.
"""

from __future__ import annotations

import ctypes
import functools

import torch

# glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems: larger requests always get their own mapping
FRESH_MAPPING_BYTES = 32 * 2**20


@functools.cache
def _malloc_trim():
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def return_free_heap_pages() -> bool:
    """Hand the heap's free pages back to the OS; False where the C library cannot (nothing done)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def before_large_host_allocation(nbytes: int, device: torch.device | str) -> bool:
    """Trim the heap when ``nbytes`` on ``device`` will be a fresh mapping of host memory; True when trimmed.

    Accelerators' caching allocators reuse freed blocks themselves, and a smaller request is served
    from the free lists, so neither needs it.
    """
    if torch.device(device).type != "cpu" or nbytes < FRESH_MAPPING_BYTES:
        return False
    return return_free_heap_pages()

