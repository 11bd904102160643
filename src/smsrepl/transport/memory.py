"""Keeping a long-running endpoint's memory what is live, not its high-water mark.

glibc raises its mmap threshold each time a large block is freed (up to
32 MiB), so after the first 8 MiB frame buffer comes and goes the next ones are
carved from the heaps of whichever threads use them, and fragments stay behind.
Measured here with a continuous sync of ~2 rounds a second: the receiver grew
from 58 to 75 MiB in 2 minutes (and to 128 MiB in a 30-minute soak); with the
threshold pinned at 1 MiB it stayed at 52 MiB and the sender at 51 MiB instead
of 70-75. ``pin_mmap_threshold()`` (the CLI calls it at start; an embedding
agent may too) fixes the threshold, so buffers of 1 MiB and more are mapped
and returned to the system when freed; ``release_free_memory()`` hands back the
free pages of every heap (continuous sync after each round, the receiver after
each session). Elsewhere than glibc both are no-ops.
"""
from __future__ import annotations


#: allocations of this size and more are mapped on their own and unmapped when freed
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        import ctypes  # on first use: a short command (verify) never pins anything

        try:
            # the process's own symbols: find_library() would run ldconfig (10-20 ms a start)
            libc = ctypes.CDLL(None)
            libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
            libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _libc = libc
        except (OSError, AttributeError):
            _libc = False
    return _libc


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (no dynamic raising); True if the allocator took it."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"mmap threshold {threshold!r} must be a positive number of bytes")
    libc = _glibc()
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) if libc else False


def release_free_memory() -> bool:
    """Hand free heap pages back to the system; True if the allocator released any."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc else False
