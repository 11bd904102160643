"""What a count of bytes on the socket stands for, as a round's progress.

A sender hands frames to its channel ahead of the socket: an op stream holds batches, several
connections hold a frame or so each, a speed limit or a slow link lets a frame out over
seconds. What it has handed over is known exactly (a source offset, file bytes); what reached
the socket is a byte count. Each frame handed over adds a mark: the count at which it will
have left, and what the sender had handed over by then. The progress at a count is the mark
reached, moving linearly towards the next one.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol


class FrameCounts(Protocol):
    """What a channel (transport.channel) counts of the frames handed to it: frame_size() of
    them all, and of those on the socket, the one going now's in part."""

    frame_bytes_queued: int

    def frame_bytes_sent(self) -> int: ...


#: marks kept before the ones behind the socket are dropped as new ones are added
KEEP = 256


class SentMarks:
    """Points (count, values) with counts and every value never decreasing; ``now()`` is the
    count reached. ``beyond``: past the last mark the values grow with the count, byte for byte
    (what is being handed over now has no mark yet); else they stop at the last mark's."""

    def __init__(self, now: Callable[[], int], start: tuple[int, ...], *, at: int = 0,
                 beyond: bool = False) -> None:
        self._now = now
        self._beyond = beyond
        self._lock = threading.Lock()
        self._marks: deque[tuple[int, tuple[int, ...]]] = deque([(at, start)])

    def add(self, count: int, values: tuple[int, ...]) -> None:
        """By ``count`` on the socket, ``values`` were handed over (call in the order handed)."""
        with self._lock:
            last, before = self._marks[-1]
            self._marks.append((max(count, last), tuple(map(max, values, before))))
            trim = len(self._marks) > KEEP
        if trim:
            self.value()

    def value(self) -> tuple[int, ...]:
        """The values that reached the socket by now."""
        count = self._now()
        with self._lock:
            marks = self._marks
            while len(marks) > 1 and marks[1][0] <= count:
                marks.popleft()
            c0, v0 = marks[0]
            if count <= c0:
                return v0
            if len(marks) == 1:
                return tuple(v + count - c0 for v in v0) if self._beyond else v0
            c1, v1 = marks[1]
            return tuple(a + (b - a) * (count - c0) // (c1 - c0) for a, b in zip(v0, v1))
