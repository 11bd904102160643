"""A sender's session over several TLS connections (parallel streams), as one channel.

On a long fat link one TCP connection is held below the link by its window and by how slowly
it recovers from a loss; several share the link as several flows do. The session's frames
keep one order (each sent after a SEQ with its place in it, protocol/frames.py): data frames
(STREAM_FRAMES) go to whichever connection has the least queued, every other frame to the
session's own connection, and the receiver applies them in SEQ order, as one connection's
(transport/frame_order.py). So the round's code, its resume state and its checkpoints are the
same whatever the count; the speed limit and the over-speed guard are shared (one limiter
pays for the bytes of every connection).

``send`` returns before the frame is written, so a frame's buffers are copied first when they
are not its own (a data frame's payload and digests are views of the sender's read buffers,
reused once ``send`` returns): into buffers kept for reuse, so that fresh pages are not
faulted in for every frame. Each connection has a writer thread and a queue of one frame or
so; ``send`` waits while every queue is full.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable

from smsrepl._lazy import np

from smsrepl.errors import ReplicationError, TransportError
from smsrepl.protocol import frames as F
from smsrepl.protocol.connection import STREAM_FRAMES
from smsrepl.transport.channel import Channel
from smsrepl.transport.limits import STREAM_KEEPALIVE
from smsrepl.transport.reused_buffers import ReusedBuffers

#: bytes queued for one connection (the frame being written included) before send() picks another
#: or waits: one 8 MiB frame, so N connections hold at most about N frames
LANE_BYTES = 8 << 20


#: seconds close() lets the writers finish what is queued, all together
CLOSE_WAIT = 5.0

#: frame_size() of the SEQ each frame is sent after
SEQ_SIZE = F.frame_size(F.Seq(0))

#: copy buffers kept for reuse
KEEP_BUFFERS = 16

#: seconds a send() waiting for room sleeps between looks (it is woken when room is made)
ROOM_WAIT = 1.0


def owned(event: F.Event, buffers: ReusedBuffers) -> tuple[F.Event, bytearray | None]:
    """``event`` holding buffers of its own (payload copied into one of ``buffers``, returned
    too; arrays copied): the caller may reuse what it made the event from."""
    if not isinstance(event, STREAM_FRAMES) or isinstance(event, (F.ZeroRange, F.Scanned)):
        return event, None
    payload = event.payload
    buf = None
    if not isinstance(payload, bytes):
        view = memoryview(payload).cast("B")
        buf = buffers.take(view.nbytes)
        buf[:view.nbytes] = view
        payload = memoryview(buf)[:view.nbytes]
    if isinstance(event, F.FileOps):
        return dataclasses.replace(event, payload=payload), buf
    new = event.recoded(event.codec, payload)
    for name in ("digests", "index", "zeros"):
        value = getattr(new, name, None)
        if isinstance(value, np.ndarray):
            object.__setattr__(new, name, value.copy())
    return new, buf


class _Lane:
    def __init__(self, chan: Channel, index: int) -> None:
        self.chan = chan
        self.index = index
        self.items: deque = deque()
        self.queued = 0
        self.thread: threading.Thread | None = None


class Stripes(Channel):
    """The session's connection ``main`` and its extra connections, as one Channel for the
    sender's code (only what a sender uses of a Channel: send, recv, abort, close, the counters,
    the limiter and the guard)."""

    def __init__(self, main: Channel, extra: list[Channel]) -> None:  # noqa: super().__init__ not called
        self.main = main
        self.conn = main.conn
        self.sock = main.sock
        self._cond = threading.Condition()
        self._seq = 0
        self._turn = 0
        self._failure: BaseException | None = None
        self._closing = False
        self._buffers = ReusedBuffers(keep=KEEP_BUFFERS)
        #: frame_size() of the frames handed to send() (each with its SEQ), and of what the
        #: connections had sent when they joined: frame_bytes_sent() counts those too
        self.frame_bytes_queued = main.frame_bytes_queued
        self._lanes = [_Lane(main, 0)]
        for chan in extra:
            self.add(chan)
        self._start(self._lanes[0])

    # --- what the sender's code reads and sets of a Channel ----------------------
    @property
    def streams(self) -> int:
        return len(self._lanes)

    @property
    def wire_sent(self) -> int:
        return sum(lane.chan.wire_sent for lane in self._lanes)

    @wire_sent.setter
    def wire_sent(self, value: int) -> None:
        raise AttributeError("wire_sent of several connections is their sum")

    def frame_bytes_sent(self) -> int:
        return sum(lane.chan.frame_bytes_sent() for lane in self._lanes)

    def unacknowledged(self) -> int:
        return sum(lane.chan.unacknowledged() for lane in self._lanes)

    @property
    def wire_received(self) -> int:
        return self.main.wire_received

    @wire_received.setter
    def wire_received(self, value: int) -> None:
        raise AttributeError("wire_received is the session connection's")

    @property
    def limiter(self):
        return self.main.limiter

    @limiter.setter
    def limiter(self, value) -> None:
        with self._cond:  # a connection joining meanwhile (add) gets it too
            for lane in self._lanes:
                lane.chan.limiter = value

    @property
    def on_sent(self) -> Callable[[int], None] | None:
        return self.main.on_sent

    @on_sent.setter
    def on_sent(self, value: Callable[[int], None] | None) -> None:
        with self._cond:
            for lane in self._lanes:
                lane.chan.on_sent = value

    @property
    def sent_at(self) -> float:
        return max(lane.chan.sent_at for lane in self._lanes)

    @sent_at.setter
    def sent_at(self, value: float) -> None:
        pass

    # --- the connections -------------------------------------------------------------
    @property
    def ended(self) -> bool:
        """The session closed its connections, or one of them failed."""
        return self._closing or self._failure is not None

    def add(self, chan: Channel) -> None:
        """One more connection (joined already: its HELLO, STREAMS and WELCOME exchanged)."""
        with self._cond:
            if self._closing or self._failure is not None:  # the session ended meanwhile
                chan.close()
                return
            chan.limiter, chan.on_sent = self.main.limiter, self.main.on_sent
            self.frame_bytes_queued += chan.frame_bytes_sent()
            lane = _Lane(chan, len(self._lanes))
            self._lanes.append(lane)
            # started under the lock: close() never finds a lane whose thread is not started
            # (joining one raises; the join thread adds lanes as the session may be ending)
            self._start(lane)
            # a send() waiting for room takes the new connection now, not when a busy one
            # finishes its frame (a third of a second at the start of a copy on a 50 ms link)
            self._cond.notify_all()

    def _start(self, lane: _Lane) -> None:
        lane.thread = threading.Thread(target=self._write, args=(lane,), daemon=True,
                                       name=f"smsrepl-stream-{lane.index}")
        lane.thread.start()

    def send(self, event: F.Event) -> None:
        data = isinstance(event, STREAM_FRAMES)
        size = F.frame_size(event)
        event, buf = owned(event, self._buffers)
        with self._cond:
            while True:
                if self._failure is not None:
                    raise self._failure
                if self._closing:
                    raise TransportError("the session's connections are closed")
                lane = self._pick() if data else self._lanes[0]
                if lane.queued < LANE_BYTES or not data:
                    break
                self._cond.wait(ROOM_WAIT)
            lane.items.append((self._seq, event, size, buf))
            lane.queued += size
            self.frame_bytes_queued += size + SEQ_SIZE
            self._seq += 1
            self._cond.notify_all()

    def _pick(self) -> _Lane:
        """The connection with the least queued; ties go round, so that every connection's
        window opens up even while none is behind. The session's own connection takes one when
        it was silent for STREAM_KEEPALIVE: it has no keepalive outside the order, and a frame
        every few seconds spread over 16 connections left it silent past the receiver's limit."""
        lanes = self._lanes
        main = lanes[0]
        if not main.items and time.monotonic() - main.chan.sent_at >= STREAM_KEEPALIVE:
            return main
        self._turn = (self._turn + 1) % len(lanes)
        best = lanes[self._turn]
        for i in range(1, len(lanes)):
            lane = lanes[(self._turn + i) % len(lanes)]
            if lane.queued < best.queued:
                best = lane
        return best

    def _write(self, lane: _Lane) -> None:
        chan = lane.chan
        try:
            while True:
                with self._cond:
                    while not lane.items and not self._closing and self._failure is None:
                        if not lane.index:
                            self._cond.wait()
                            continue
                        # every send() wakes every writer: the silence is counted from this
                        # connection's last frame, not from the last wakeup
                        left = STREAM_KEEPALIVE - (time.monotonic() - chan.sent_at)
                        if left <= 0:
                            break  # an idle extra connection: a keepalive, outside the order
                        self._cond.wait(left)
                    if self._failure is not None or (self._closing and not lane.items):
                        return
                    item = lane.items[0] if lane.items else None
                if item is None:
                    chan.send(F.Ping(0, time.monotonic_ns(), 0))
                    continue
                seq, event, size, buf = item
                chan.send(F.Seq(seq))
                chan.send(event)
                del event, item
                with self._cond:
                    lane.items.popleft()
                    lane.queued -= size
                    self._cond.notify_all()
                self._buffers.give(buf)
        except BaseException as exc:  # every connection stops: the session failed
            with self._cond:
                if self._failure is None:
                    # what a write raises is the session's error, as on one connection (the
                    # over-speed guard's, run once a frame was written, is not "connection lost")
                    self._failure = exc if isinstance(exc, ReplicationError) else TransportError(
                        f"connection {lane.index} of the session failed: {exc}")
                self._cond.notify_all()
            self.abort()

    def flush(self, timeout: float = 300.0) -> None:
        """Wait until every queued frame was written."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while any(lane.items for lane in self._lanes) and self._failure is None:
                if not self._cond.wait(max(0.0, min(1.0, deadline - time.monotonic()))) \
                        and time.monotonic() >= deadline:
                    raise TransportError("the session's connections did not take its frames in time")
            if self._failure is not None:
                raise self._failure

    def recv(self) -> F.Event:
        return self.main.recv()

    def abort(self, reason: str | None = None) -> None:
        for lane in list(self._lanes):
            lane.chan.abort(reason)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = time.monotonic() + CLOSE_WAIT
        for lane in list(self._lanes):
            if lane.thread is not None and lane.thread is not threading.current_thread():
                lane.thread.join(max(0.0, deadline - time.monotonic()))
                if lane.thread.is_alive():
                    # blocked on a peer that reads nothing: closing the socket would not wake
                    # it (Linux), shutting it down does
                    lane.chan.abort("the session's connections were closed")
                    lane.thread.join(1.0)
            lane.chan.close()
