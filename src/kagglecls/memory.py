"""How a stage process gets its memory from glibc's malloc: freed memory kept for the next allocation while
the stage computes, and handed back to the system before worker processes are forked. Imports nothing of ours.

Only glibc is concerned (musl and macOS have their own allocators): elsewhere both do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import platform

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library Python already runs on (its symbols, without looking for the file: ctypes.util's
    find_library would start ldconfig at every stage's start)."""
    return ctypes.CDLL(None) if platform.libc_ver()[0] == "glibc" else None


def keep_freed_memory() -> bool:
    """Have malloc keep freed memory for the next allocation instead of handing it back to the system.

    By default every block over 32 MB gets a mapping of its own, unmapped when freed, and the system zeroes
    each of its pages again on first touch. A network's activations are such blocks: Lite0's largest map is
    50 MB for a batch of 128 images at 64 px (precompute's), and 38 MB for a batch of 8 at 224 px. Served from
    the heap instead, the same memory is reused batch after batch. bench/bench_allocator.py: the frozen body's
    forward 2.0x faster at 64 px and 2.6x at 224 px, a finetune step 1.19x at 96 px and 1.08x at 224 px, for
    7-19% more peak memory. Only where memory comes from changes: outputs are the same bytes. Returns whether
    it applied.
    """
    libc = _glibc()
    if libc is None:
        return False
    no_mappings = libc.mallopt(M_MMAP_MAX, 0)
    no_trimming = libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    return bool(no_mappings and no_trimming)


def release_freed_memory() -> None:
    """Hand the free memory that keep_freed_memory keeps back to the system (malloc_trim), before worker
    processes are forked (the image checks and the resize cache, data loader workers): each child starts with
    a copy of the parent's resident memory in its own count, so a heap grown by the network's batches would
    be counted again in every worker. Measured on precompute's cache workers: 645 MB resident each, 370 MB
    after the release."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
