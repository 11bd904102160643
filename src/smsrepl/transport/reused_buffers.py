"""Buffers that frames' bytes are written into and given back once the frame is written.

A fresh buffer per frame is mapped afresh (glibc maps allocations of 1 MiB and more on their
own: transport/memory.py) and faulted in page by page as it is filled: 77,000 faults and ~0.1 s
of a sender's CPU on a 1 GiB loopback copy. Reused, a round's frames share a few buffers.
"""
from __future__ import annotations

import threading

#: buffers are made in multiples of this: frames whose zero blocks are left out of the payload
#: vary in length, and a buffer a little too short for the next one is one more made
GRAIN = 1 << 20


class ReusedBuffers:
    """Thread-safe. ``keep``: free buffers kept at most (None: as many as were given back)."""

    def __init__(self, keep: int | None = None) -> None:
        self.keep = keep
        self.made = 0
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes."""
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) >= size:
                    return self._free.pop(i)
            if self._free:
                self._free.pop()  # too small: replaced, so that the buffers stay as many as the frames in flight
            self.made += 1
        return bytearray(max(GRAIN, -(-size // GRAIN) * GRAIN))

    def give(self, buf: bytearray | None) -> None:
        if buf is not None:
            with self._lock:
                if self.keep is None or len(self._free) < self.keep:
                    self._free.append(buf)

    def clear(self) -> None:
        """Let go of the free buffers."""
        with self._lock:
            self._free.clear()
