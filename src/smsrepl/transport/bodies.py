"""Buffers for large frame bodies, shared by every receiving connection of a process, and bounded.

Each connection used to keep up to four 8 MiB buffers of its own for reuse,
besides those of frames still queued or being applied: a receiver serving 32
block sessions held 30.8 MiB of RSS per session. Here all connections draw
from one pool:

* a buffer is free once nothing refers to it but the pool (its frame was
  applied and every view of it dropped); CPython's reference count says so,
  so consumers need no release call;
* the bodies in use and kept together stay within ``limit`` bytes: a
  connection that asks for more waits (its peer is held back by TCP) until a
  body is free. A connection with fewer than ``floor`` bodies in use is
  never made to wait (a consumer may still hold the frame it applied last
  while it waits for the next), and no wait lasts longer than ``max_wait``:
  past it the body is made beyond the limit, so a consumer that keeps views
  of many frames slows down but cannot hang;
* free buffers beyond ``keep`` are handed back to the system.

Where reference counts are not available (not CPython) every body gets a new
buffer, as without a pool.
"""
from __future__ import annotations

import sys
import threading
import time

#: bytes of large bodies in use or kept, for all connections of the process together
LIMIT = 128 << 20
#: free bodies kept for reuse (a new 8 MiB buffer costs a page fault per 4 KiB filled)
KEEP = 4
#: bodies in use a connection may always have, whatever the limit
FLOOR = 2
#: the longest a connection waits for a body before it is made beyond the limit
MAX_WAIT = 2.0
#: how often a waiting connection looks for a body freed meanwhile (freeing is silent)
POLL = 0.005

_REFCOUNT = getattr(sys, "getrefcount", None)


class _Body:
    __slots__ = ("buf", "owner")

    def __init__(self, buf: bytearray, owner: object) -> None:
        self.buf = buf
        self.owner = owner


def _free(body: _Body) -> bool:
    # referenced by the _Body and by getrefcount's argument only
    return _REFCOUNT is not None and _REFCOUNT(body.buf) <= 2


class BodyPool:
    def __init__(self, limit: int = LIMIT, *, keep: int = KEEP, floor: int = FLOOR,
                 max_wait: float = MAX_WAIT) -> None:
        self.limit = limit
        self.keep = keep
        self.floor = floor
        self.max_wait = max_wait
        self._bodies: list[_Body] = []
        self._lock = threading.Lock()
        #: times a connection waited for a body, and bodies made beyond the limit after MAX_WAIT
        self.waits = 0
        self.overdrawn = 0

    def get(self, length: int, owner: object) -> memoryview:
        """A buffer of ``length`` bytes for ``owner`` (a token of one connection: the pool must
        not keep a connection alive), waiting while the pool is full."""
        if _REFCOUNT is None:
            return memoryview(bytearray(length))
        deadline = None
        while True:
            with self._lock:
                got = self._take(length, owner, overdraw=deadline is not None and time.monotonic() >= deadline)
            if got is not None:
                return got
            if deadline is None:
                self.waits += 1
                deadline = time.monotonic() + self.max_wait
            time.sleep(POLL)

    def _take(self, length: int, owner: object, *, overdraw: bool) -> memoryview | None:
        reuse, free, mine, total = None, [], 0, 0
        for body in self._bodies:
            total += len(body.buf)
            if _free(body):
                if reuse is None and len(body.buf) >= length:
                    reuse = body
                else:
                    free.append(body)
            elif body.owner is owner:
                mine += 1
        if reuse is not None:
            reuse.owner = owner
            self._drop(free[self.keep:])
            return memoryview(reuse.buf)[:length]
        # room for a new one: free buffers too small (or beyond what is kept) go first
        gone = []
        while free and (total + length > self.limit or len(free) >= self.keep):
            gone.append(free.pop())
            total -= len(gone[-1].buf)
        self._drop(gone)
        over = total + length > self.limit and mine >= self.floor
        if over and not overdraw:
            return None
        self.overdrawn += over
        buf = bytearray(length)
        self._bodies.append(_Body(buf, owner))
        return memoryview(buf)[:length]

    def _drop(self, bodies: list[_Body]) -> None:
        if bodies:
            gone = {id(b) for b in bodies}
            self._bodies = [b for b in self._bodies if id(b) not in gone]

    def trim(self) -> int:
        """Hand every free buffer back to the system; how many there were."""
        with self._lock:
            free = [b for b in self._bodies if _free(b)]
            self._drop(free)
        return len(free)

    def held(self) -> tuple[int, int]:
        """(bodies, bytes) the pool holds, in use or free."""
        with self._lock:
            return len(self._bodies), sum(len(b.buf) for b in self._bodies)


#: the process's pool
_pool = BodyPool()


def body_pool() -> BodyPool:
    return _pool
