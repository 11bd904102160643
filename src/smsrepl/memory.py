"""Returning freed memory to the system between rounds of a long-running process.

glibc keeps memory that was freed in its arenas, and raises its mmap threshold
after a large block is freed, so the 8 MiB chunk buffers of a later round come
from the heap and stay there. RSS then shows the largest round's high-water,
not the live data. ``malloc_trim(0)`` releases the free pages of every arena.
Elsewhere (musl, other systems) this is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_trim = None


def _load():
    global _trim
    if _trim is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            fn = libc.malloc_trim
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
            _trim = fn
        except (OSError, AttributeError):
            _trim = False
    return _trim


def release_free_memory() -> bool:
    """Hand free heap pages back to the system; True if the allocator released any."""
    fn = _load()
    return bool(fn(0)) if fn else False
