"""Giving the memory of a training step's freed tensors back to the system.

A step of the default drafter allocates and frees ~6 GB of activations, in tensors whose sizes
change with every batch's sequence lengths. glibc's malloc raises its mmap threshold after large
blocks are freed, so later large tensors come from the heap, whose freed holes it keeps: with
bfloat16 autocast the process grew by ~0.7 GB per step (8 GB after 12 steps of one shard; a
stage-11 run with 94 shards in memory was killed at 21 GB of 24). `malloc_trim(0)` after each step
returns the free heap pages (1.5 GB after 12 steps, the step ~5% slower). A no-op where the C
library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the system; whether that could be asked (glibc)."""
    trim = _trim()
    if trim is None:
        return False
    trim(0)
    return True
