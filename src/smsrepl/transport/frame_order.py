"""The frames of one receiver session, handed to the loop that applies them in the session's order.

A session on one connection hands its frames over as they were read ("plain", at most
``depth`` ahead of the loop). A session over several connections (parallel streams, see
protocol/frames.py: STREAMS and SEQ) has each frame numbered: the readers of all its
connections put them here, and the loop takes them in SEQ order, exactly the one order a
single connection would have carried, so what applies them (a replica, a tree writer) and
their checkpoints are the same either way. Frames read ahead of their turn wait here, up to
``hold`` bytes; a reader with a later frame then waits, and the reader of the connection
carrying the next frame in order is never held up by them (its frame is always taken), so the
readers cannot deadlock.

Failures and the reason a session was ended are handed over first (``put_nowait``).
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque

from smsrepl.errors import RemoteProtocolError
from smsrepl.protocol.frames import frame_size

#: bytes of frames read ahead of their turn a session holds at most
HOLD_BYTES = 64 << 20
#: what a frame held costs beyond frame_size(): its event object, its entry and its number
#: (about 190 bytes measured for a SCANNED frame, whose frame_size is 64)
HELD_COST = 256


class FrameOrder:
    def __init__(self, depth: int, hold: int = HOLD_BYTES) -> None:
        self.depth = depth
        self.hold = hold
        self._cond = threading.Condition()
        self._ready: deque = deque()
        self._urgent: deque = deque()
        self._held: dict[int, tuple[object, int]] = {}
        self._held_bytes = 0
        self._next = 0
        self.sequenced = False
        self.closed = False

    # --- the loop's side -----------------------------------------------------
    def get(self, timeout: float | None = None) -> object:
        """The next item; queue.Empty after ``timeout`` seconds without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._urgent and not self._ready:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise queue.Empty
                self._cond.wait(left)
            item = self._urgent.popleft() if self._urgent else self._ready.popleft()
            self._cond.notify_all()
            return item

    def put_nowait(self, item: object) -> None:
        """``item`` (an exception: a failure, the reason the session ends) before any frame;
        dropped once the loop is gone (an error's traceback holds its reader, and so this)."""
        with self._cond:
            if self.closed:
                return
            self._urgent.append(item)
            self._cond.notify_all()

    def close(self) -> None:
        """The loop is gone: readers waiting to hand a frame over give up."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    # --- the readers' side -----------------------------------------------------
    def put(self, item: object) -> bool:
        """A frame of a session on one connection (or one read before SEQ began), in the order
        read; False once the loop is gone."""
        with self._cond:
            if self.sequenced:
                raise RemoteProtocolError(f"{type(item).__name__} without SEQ in a session over several connections")
            while len(self._ready) >= self.depth and not self.closed:
                self._cond.wait()
            if self.closed:
                return False
            self._ready.append(item)
            self._cond.notify_all()
            return True

    def put_seq(self, seq: int, item: object) -> bool:
        """The ``seq``-th frame of the session's order, from any of its connections; False once
        the loop is gone."""
        size = frame_size(item) + HELD_COST
        with self._cond:
            self.sequenced = True
            while True:  # checked again after every wait: another reader may have had this SEQ
                if seq < self._next or seq in self._held:
                    raise RemoteProtocolError(f"SEQ {seq} came twice")
                if self.closed:
                    return False
                if seq == self._next:
                    if len(self._ready) < self.depth:
                        break
                elif self._held_bytes < self.hold:
                    self._held[seq] = (item, size)
                    self._held_bytes += size
                    return True
                self._cond.wait()
            self._ready.append(item)
            self._next += 1
            while self._next in self._held:  # those read ahead, now in turn
                held, n = self._held.pop(self._next)
                self._held_bytes -= n
                self._ready.append(held)
                self._next += 1
            self._cond.notify_all()
            return True
