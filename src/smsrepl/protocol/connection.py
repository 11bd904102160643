"""The protocol state machine, sans I/O (in the manner of h11/h2).

    conn = Connection(SENDER)
    wire_buffers = conn.send(Hello(...))     # events in, bytes out
    conn.receive_data(bytes_from_peer)       # bytes in ...
    event = conn.next_event()                # ... events out (or NEED_DATA)

Large frame bodies can also be read in place, without a copy: after
next_event returned NEED_DATA, ``conn.receive_buffer()`` may offer a
writable view of the rest of the current body; write n bytes into it and
call ``conn.received(n)``.

Both ends track one conversation state; every frame, sent or received, must
appear in TRANSITIONS for the current state, or it is an error: our own
misuse raises LocalProtocolError, the peer's raises RemoteProtocolError.
Any other exception from next_event is a bug.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from enum import Enum


from smsrepl.errors import LocalProtocolError, RemoteProtocolError
from smsrepl.protocol import frames as F


class Role(Enum):
    SENDER = "sender"
    RECEIVER = "receiver"


SENDER = Role.SENDER
RECEIVER = Role.RECEIVER


class State(Enum):
    START = "start"
    HANDSHAKE = "handshake"
    IDLE = "idle"
    ROUND = "round"
    ROUND_ENDING = "round_ending"
    #: the sender's CLOSE came right after its ROUND_END ("early-close"): the round's end, then CLOSE
    ROUND_CLOSING = "round_closing"
    CLOSING = "closing"
    #: an extra connection of a session over several (HELLO kind "stream"), after its WELCOME
    STREAM = "stream"
    CLOSED = "closed"
    ERROR = "error"


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
#: bodies at least this long are assembled in their own buffer (see receive_buffer)
DIRECT_BODY_MIN = 64 << 10
#: large-body buffers kept for reuse (frames still held by a consumer need their own)
KEEP_BODIES = 4
_REFCOUNT = getattr(sys, "getrefcount", None)  # CPython's; elsewhere every body gets a new buffer


class ConnectionClosed(F.Event):
    """The byte stream ended; ``clean`` when it ended after CLOSE was exchanged."""

    TYPE = -1

    def __init__(self, clean: bool) -> None:
        self.clean = clean

    def __repr__(self) -> str:
        return f"ConnectionClosed(clean={self.clean})"


S, R = SENDER, RECEIVER
_LIVE = (State.IDLE, State.ROUND, State.ROUND_ENDING)

TRANSITIONS: dict[tuple[State, Role, type], State] = {
    (State.START, S, F.Hello): State.HANDSHAKE,
    (State.HANDSHAKE, S, F.TreeRequest): State.HANDSHAKE,  # a file sender need not wait for WELCOME
    (State.HANDSHAKE, R, F.Welcome): State.IDLE,
    (State.IDLE, S, F.ManifestRequest): State.IDLE,
    (State.IDLE, R, F.Status): State.IDLE,  # after the WELCOME of a "status" session
    (State.IDLE, R, F.ManifestData): State.IDLE,
    (State.IDLE, S, F.RoundBegin): State.ROUND,
    (State.IDLE, S, F.TreeRequest): State.IDLE,
    (State.IDLE, S, F.TreeSubset): State.IDLE,
    (State.IDLE, R, F.TreeData): State.IDLE,
    (State.ROUND, R, F.TreeData): State.ROUND,  # an ordered listing still arriving ("tree-stream")
    (State.ROUND, S, F.FileOps): State.ROUND,
    (State.ROUND, S, F.SigRequest): State.ROUND,
    (State.ROUND, R, F.SigData): State.ROUND,
    (State.IDLE, S, F.Close): State.CLOSING,
    (State.ROUND, S, F.BlockData): State.ROUND,
    (State.ROUND, S, F.BlockSet): State.ROUND,
    (State.ROUND, S, F.ZeroRange): State.ROUND,
    (State.ROUND, S, F.Scanned): State.ROUND,
    (State.ROUND, R, F.Checkpoint): State.ROUND,
    (State.ROUND, S, F.RoundEnd): State.ROUND_ENDING,
    (State.ROUND_ENDING, R, F.Checkpoint): State.ROUND_ENDING,
    (State.ROUND_ENDING, R, F.RoundDone): State.IDLE,
    (State.CLOSING, R, F.Close): State.CLOSED,
    (State.ROUND_ENDING, S, F.Close): State.ROUND_CLOSING,
    (State.ROUND_CLOSING, R, F.Checkpoint): State.ROUND_CLOSING,
    (State.ROUND_CLOSING, R, F.Pong): State.ROUND_CLOSING,
    (State.ROUND_CLOSING, R, F.Streams): State.ROUND_CLOSING,
    (State.ROUND_CLOSING, R, F.RoundDone): State.CLOSING,
    (State.IDLE, S, F.Streams): State.IDLE,
    (State.HANDSHAKE, S, F.Streams): State.HANDSHAKE,  # an extra connection's join, after its HELLO
    (State.STREAM, S, F.Ping): State.STREAM,
}
#: what an extra connection carries, each after its SEQ (the receiver checks the order of the
#: merged frames with the session's own connection state)
STREAM_FRAMES = (F.BlockData, F.BlockSet, F.ZeroRange, F.Scanned, F.FileOps)
for _cls in STREAM_FRAMES + (F.Seq,):
    TRANSITIONS[(State.STREAM, S, _cls)] = State.STREAM
for _st in _LIVE:
    TRANSITIONS[(_st, S, F.Seq)] = _st
    TRANSITIONS[(_st, R, F.Streams)] = _st  # the answer may come after the round began
for _st in _LIVE:
    TRANSITIONS[(_st, S, F.Ping)] = _st
    TRANSITIONS[(_st, R, F.Pong)] = _st
for _st in State:  # an ERROR frame may follow a violation, to tell the peer why
    if _st is not State.CLOSED:
        TRANSITIONS[(_st, S, F.Error)] = State.ERROR
        TRANSITIONS[(_st, R, F.Error)] = State.ERROR


class Connection:
    def __init__(self, role: Role, *, max_body: int = F.MAX_BODY,
                 bodies: Callable[[int, object], memoryview] | None = None) -> None:
        """``bodies(length, token)``: where large bodies come from (a process-wide pool of the
        transport's, given this connection's token); else buffers of this connection's own."""
        self.role = role
        self._bodies_from = bodies
        self._token = object()
        self.peer = RECEIVER if role is SENDER else SENDER
        self.state = State.START
        self.max_body = max_body
        self._buf = bytearray()
        self._body: memoryview | None = None  # a large frame's body being filled in place
        self._bodies: list[bytearray] = []  # buffers of earlier large bodies, for reuse
        self._body_filled = 0
        self._body_head: tuple[int, int, bytes] = (0, 0, b"")  # type, check, first 8 header bytes
        self._eof = False
        self._closed_reported = False
        self.bytes_sent = 0
        self.bytes_received = 0

    def _next_state(self, who: Role, event: F.Event) -> State:
        nxt = TRANSITIONS.get((self.state, who, type(event)))
        if nxt is None:
            name = type(event).__name__
            if who is self.role:
                raise LocalProtocolError(f"cannot send {name} in state {self.state.value}")
            state, self.state = self.state, State.ERROR
            raise RemoteProtocolError(f"peer sent {name} in state {state.value}")
        return nxt

    def join_stream(self) -> None:
        """After the WELCOME of a HELLO of kind "stream": this connection carries a session's
        frames beside its own connection (STREAM_FRAMES, each after a SEQ)."""
        if self.state is not State.IDLE:
            raise LocalProtocolError(f"cannot carry a stream in state {self.state.value}")
        self.state = State.STREAM

    def send(self, event: F.Event) -> list[bytes | memoryview]:
        """Buffers that carry ``event``; write them in order. Payloads are not copied.

        An event the table does not allow now raises LocalProtocolError and changes nothing;
        one that cannot be encoded raises it too and leaves the connection in ERROR (the
        conversation cannot go on without the frame)."""
        nxt = self._next_state(self.role, event)
        try:
            parts = F.encode(event)
        except F.FrameError as exc:
            self.state = State.ERROR
            raise LocalProtocolError(f"cannot encode {type(event).__name__}: {exc}") from exc
        self.state = nxt
        self.bytes_sent += sum(len(p) for p in parts)
        return parts

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; an empty ``data`` means the stream ended."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("data received after end of stream")
        self.bytes_received += len(data)
        body = self._body
        if body is not None:
            take = min(len(data), len(body) - self._body_filled)
            body[self._body_filled:self._body_filled + take] = data[:take]
            self._body_filled += take
            data = memoryview(data)[take:]
            if not len(data):
                return
        self._buf += data

    def receive_buffer(self) -> memoryview | None:
        """A view of the rest of the current large frame body, to read into directly; else None."""
        if self._body is None or self._eof:
            return None
        return memoryview(self._body)[self._body_filled:]

    def received(self, n: int) -> None:
        """``n`` bytes were written into the view from receive_buffer."""
        if self._body is None or not 0 <= n <= len(self._body) - self._body_filled:
            raise LocalProtocolError("received() does not match the offered buffer")
        self._body_filled += n
        self.bytes_received += n

    def next_event(self) -> F.Event | _Sentinel:
        if self._body is not None:
            if self._body_filled < len(self._body):
                return self._end_or_need()
            view, self._body = self._body, None
            ftype, check, head8 = self._body_head
            return self._decode(ftype, view, check, head8)
        buf = self._buf
        if len(buf) < F.HEADER_SIZE:
            return self._end_or_need()
        length, ftype, flags, reserved, check = F.HEADER.unpack_from(buf)
        if length > self.max_body:
            self.state = State.ERROR
            raise RemoteProtocolError(f"frame of {length} bytes exceeds the maximum of {self.max_body}")
        if flags or reserved:
            self.state = State.ERROR
            raise RemoteProtocolError("frame flags or reserved bits set")
        if ftype not in F.TYPES:
            self.state = State.ERROR
            raise RemoteProtocolError(f"unknown frame type 0x{ftype:02x}")
        end = F.HEADER_SIZE + length
        if len(buf) < end:
            if length >= DIRECT_BODY_MIN and not self._eof:
                # assemble the body in its own buffer: the bytes so far, then in place
                self._body_head = (ftype, check, bytes(buf[:8]))
                self._body = self._body_buffer(length)
                have = len(buf) - F.HEADER_SIZE
                self._body[:have] = memoryview(buf)[F.HEADER_SIZE:]
                self._body_filled = have
                del buf[:]
            return self._end_or_need()
        head8 = bytes(buf[:8])
        body = bytes(buf[F.HEADER_SIZE:end])
        del buf[:end]
        return self._decode(ftype, body, check, head8)

    def _body_buffer(self, length: int) -> memoryview:
        """A buffer for a large body: an earlier one that nothing refers to any more (its
        event and every view of it are gone), else a new one. A new 4 MiB buffer per frame
        cost a page fault per 4 KiB: 16% of a receiver's time with many small files."""
        if self._bodies_from is not None:
            return self._bodies_from(length, self._token)
        refcount = _REFCOUNT
        if refcount is not None:
            for buf in self._bodies:
                # free: referenced only by the list, this loop and getrefcount's argument
                if len(buf) >= length and refcount(buf) <= 3:
                    return memoryview(buf)[:length]
        buf = bytearray(length)
        if len(self._bodies) >= KEEP_BODIES:
            self._bodies.pop(0)
        self._bodies.append(buf)
        return memoryview(buf)[:length]

    def _decode(self, ftype: int, body: bytes | memoryview, check: int, head8: bytes) -> F.Event:
        try:
            event = F.decode(ftype, body, check, head8)
        except F.FrameError as exc:
            self.state = State.ERROR
            raise RemoteProtocolError(str(exc)) from None
        self.state = self._next_state(self.peer, event)
        return event

    def _end_or_need(self) -> F.Event | _Sentinel:
        if not self._eof:
            return NEED_DATA
        if self._closed_reported:
            raise RemoteProtocolError("end of stream already reported")
        self._closed_reported = True
        clean = self.state is State.CLOSED and not self._buf and self._body is None
        if not clean and self.state not in (State.ERROR, State.CLOSED):
            self.state = State.ERROR
        return ConnectionClosed(clean)

    def events(self) -> Iterable[F.Event]:
        """All complete events buffered so far."""
        while True:
            ev = self.next_event()
            if isinstance(ev, _Sentinel):  # NEED_DATA
                return
            yield ev
            if isinstance(ev, ConnectionClosed):
                return
