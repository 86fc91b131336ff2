"""Giving freed heap memory back to the operating system.

glibc's ``malloc`` keeps freed blocks for reuse, and after a burst of large allocations (an ORT session holding a
whole model, a step's activations) its adaptive ``mmap`` threshold rises to 32 MiB, so later blocks up to that size
come from the heap and stay there when freed: the process keeps its peak RSS.  ``malloc_trim(0)`` returns every
free page of every heap (``madvise``).  Measured on SmolLM2's sequential calibration: 0.4 GiB (≈ 0.8× the weight
bytes) stayed resident after the batch probe without it.  Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def release_free_memory() -> None:
    """Return the heap's free pages to the operating system (glibc ``malloc_trim(0)``; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
