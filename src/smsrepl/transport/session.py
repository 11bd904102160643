"""One admitted connection's session on the receiver: HELLO, the handler of its kind, the end.

The session reads HELLO, checks the protocol version and hands the connection to the handler
its kind names in the endpoint server's table (block_session.py, file_session.py,
probe_sessions.py). What is alike in every kind lives here: PING, CLOSE and ERROR; a failure
told to the sender as an ERROR frame (then what it still streams is read and dropped, so the
ERROR is not lost to a reset); ending the session from another thread (the receiver stops,
another sender takes the target over); frames read ahead on a thread of their own; the
target's claim released and the outcome recorded whatever happened.
"""
from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from smsrepl.errors import (RefusedError, RemoteProtocolError, ReplicationError, TargetBusyError,
                            TargetWriteError, TransportError)
from smsrepl.protocol import PROTOCOL_VERSION, ConnectionClosed
from smsrepl.protocol import frames as F
from smsrepl.stages import StageClock
from smsrepl.transport.channel import Channel
from smsrepl.transport.claims import TargetClaims
from smsrepl.transport.frame_order import FrameOrder
from smsrepl.transport.limits import DRAIN_STREAMING, MAX_STREAMS, STOP_DRAIN
from smsrepl.transport.loglimit import LimitedWarnings

if TYPE_CHECKING:
    from smsrepl.transport.stream_offers import StreamOffers

log = logging.getLogger("smsrepl.receiver")

#: the frames every session kind answers alike (Session.control)
CONTROL = (F.Ping, F.Close, F.Error, ConnectionClosed, F.Streams)


@dataclass(frozen=True, slots=True)
class SessionOutcome:
    target: str
    peer: str
    ok: bool
    error: ReplicationError | None
    rounds: int
    bytes_written: int


class Host(Protocol):
    """What sessions use of the endpoint that serves them."""

    targets: Mapping[str, str]
    create: bool
    state_dir: str
    checkpoint_seconds: float
    claims: TargetClaims
    warnings: LimitedWarnings
    stopping: threading.Event
    streams: StreamOffers

    def status(self) -> tuple[list, list]: ...


class Handler:
    """The work of one session kind, given the session and its HELLO. ``serve()`` returns True
    once the sender closed the session cleanly; ``close()`` runs whatever happened."""

    def __init__(self, session: Session, hello: F.Hello) -> None:
        self.session = session
        self.hello = hello
        self.chan = session.chan
        self.host = session.host
        self.peer = session.peer

    def serve(self) -> bool:
        raise NotImplementedError

    def ended(self, why: ReplicationError) -> ReplicationError:
        """The reason the session was ended from another thread, as its sender hears it."""
        return why

    def close(self) -> None:
        pass


class Session:
    def __init__(self, host: Host, chan: Channel, peer: str, kinds: Mapping[str, type[Handler]], *,
                 on_hello: Callable[[str], None] | None = None) -> None:
        self.host = host
        self.kinds = kinds
        self.on_hello = on_hello
        self.chan = chan
        self.peer = peer
        self.outcome: SessionOutcome | None = None
        self.hello: F.Hello | None = None
        self.handler: Handler | None = None
        self.rounds = 0
        self.written = 0
        self._frames: FrameOrder | None = None
        #: the key extra connections of this session present (grant_streams), once granted
        self.stream_key: str | None = None
        self._reader_stop: threading.Event | None = None
        self.lock_fd: int | None = None
        #: why the session must end now (the receiver stops, another sender takes over): the
        #: applying loop raises it at its next frame
        self.ended: ReplicationError | None = None
        self.started = time.time()

    def end(self, why: ReplicationError) -> None:
        """End the session from another thread: its loop stops at the next frame, the target is
        checkpointed and the sender hears ``why`` (no ERROR frame can be sent on a channel whose
        loop is not reading frames: a consistency check, a network check, a handshake)."""
        self.ended = why
        frames = self._frames
        if frames is None:
            self.chan.abort(why.message)
            return
        frames.put_nowait(why)  # wakes a loop waiting for the sender's next frame

    def claim(self, name: str) -> None:
        """Hold target ``name`` for this session until it ends."""
        self.lock_fd = self.host.claims.claim(name, self)

    def run(self) -> None:
        target_name = "?"
        error: ReplicationError | None = None
        clean = False
        try:
            ev = self.chan.recv()
            if not isinstance(ev, F.Hello):
                raise RemoteProtocolError(f"expected HELLO, got {type(ev).__name__}")
            self.hello = ev
            if self.on_hello is not None:
                self.on_hello(ev.kind)
            target_name = ev.target
            if PROTOCOL_VERSION not in ev.versions:
                raise RefusedError(f"no common protocol version (peer speaks {ev.versions}, we speak {PROTOCOL_VERSION})")
            kind = self.kinds.get(ev.kind)
            if kind is None:
                raise RefusedError(f"session kind {ev.kind!r} is not supported by this receiver")
            self.handler = kind(self, ev)
            clean = self.handler.serve()
        except Exception as exc:  # noqa: BLE001 - every failure must reach the sender, not kill the thread
            error = self._failed(exc, target_name)
        finally:
            if self._reader_stop is not None:
                self._reader_stop.set()  # a reader still waiting to hand over a frame gives up
            if self._frames is not None:
                self._frames.close()
            if self.stream_key is not None:
                self.host.streams.withdraw(self.stream_key)
            try:
                if self.handler is not None:
                    self.handler.close()
            except Exception:  # noqa: BLE001 - the target is released whatever closing it did
                log.exception("%s: target %s: closing it failed", self.peer, target_name)
            finally:
                if self.lock_fd is not None:
                    self.host.claims.release(target_name, self.lock_fd)
        # a question, or another connection's session's frames: not a session of its own
        if self.hello is not None and self.hello.kind not in ("status", "stream"):
            if error is not None:
                error = detached(error)
            self.outcome = SessionOutcome(target_name, self.peer, clean and error is None, error, self.rounds,
                                          self.written)
        # the reason it was ended was raised in its loop: its traceback holds that loop's frame and
        # so this session; the frames queue may hold it too. Let go of both, or only a full gc
        # frees the session's buffers
        if self.ended is not None:
            detached(self.ended)
        self._frames = None
        # the handler and the session refer to each other: the handler's buffers (a replica's
        # manifest, a tree writer's) would wait for a full gc
        self.handler = None

    def _failed(self, exc: Exception, target_name: str) -> ReplicationError:
        """Say why the session failed, in the log and to its sender."""
        if self.ended is not None:
            exc = self.handler.ended(self.ended) if self.handler is not None else self.ended
        if not isinstance(exc, ReplicationError):
            log.exception("%s: target %s: internal error", self.peer, target_name)
            exc = ReplicationError(f"receiver internal error: {type(exc).__name__}: {exc}")
            exc.resumable = True  # nothing says a rerun would fail again
        if isinstance(exc, TargetWriteError):
            name_target(exc, target_name, self.host.targets.get(target_name) if self.hello else None)
        if isinstance(exc, TargetBusyError):  # a crowd at a busy target says it once in a while
            self.host.warnings.warning("busy", "%s: target %s: %s", self.peer, target_name, exc)
        else:
            log.warning("%s: target %s: %s", self.peer, target_name, exc,
                        extra={"peer": self.peer, "target": target_name, "code": exc.code or None})
        if not isinstance(exc, TransportError):
            try:
                self.chan.send(F.Error(exc.code or "", exc.message, exc.exit_code, exc.resumable))
                # a sender still streaming a round may take a while to read the ERROR and
                # stop: until it does, its data is read and dropped (closing on unread data
                # would reset the connection and lose the ERROR, and with it the reason)
                self._drain(DRAIN_STREAMING if isinstance(exc, TargetWriteError) else 2.0)
            except ReplicationError:
                pass
        return exc

    def control(self, ev: F.Event, during: str) -> bool:
        """PING, CLOSE, ERROR, STREAMS and the end of the stream, alike in every session; True
        once closed."""
        if isinstance(ev, F.Streams):
            self.grant_streams(ev)
            return False
        if isinstance(ev, F.Ping):
            self.chan.send(F.Pong(ev.nonce, ev.clock_ns, 0))
            return False
        if isinstance(ev, F.Close):
            self.chan.send(F.Close("bye"))
            return True
        if isinstance(ev, F.Error):
            raise TransportError(f"sender aborted: {ev.code} {ev.message}".strip())
        raise TransportError(f"connection closed by the sender{during}")

    def grant_hello_ask(self) -> None:
        """Answer now, right after WELCOME, a HELLO that asked for the session's connections
        itself ("streams=N", F.STREAMS_HELLO); its reader must be running (start_reader)."""
        assert self.hello is not None
        count = hello_streams(self.hello.capabilities)
        if count > 1:
            self.grant_streams(F.Streams(count, ""))

    def grant_streams(self, ev: F.Streams) -> None:
        """The sender asks to run this session over ``ev.count`` connections: grant up to
        MAX_STREAMS (1, a refusal, to a session whose frames are not read on a thread) and offer
        the extra ones a key (stream_join.py); frames then come numbered (SEQ)."""
        count = max(1, min(ev.count, MAX_STREAMS)) if self._frames is not None else 1
        if count > 1 and self.stream_key is None:
            self.stream_key = secrets.token_hex(16)
            assert self.hello is not None and self._frames is not None
            self.host.streams.offer(self.stream_key, self.hello.target, self.hello.session_id, count, self._frames)
        self.chan.send(F.Streams(count, self.stream_key or "" if count > 1 else ""))

    def _drain(self, seconds: float) -> None:
        """After an ERROR frame: read and drop what the sender still sends until it hangs up.

        Closing with unread data would reset the connection, and the sender
        could lose the ERROR frame that says why.
        """
        if self.host.stopping.is_set():
            seconds = min(seconds, STOP_DRAIN)
        deadline = time.monotonic() + seconds
        frames = self._frames
        while time.monotonic() < deadline:
            if frames is None:
                try:
                    ev: object = self.chan.recv()
                except ReplicationError:
                    return
            else:
                try:
                    ev = frames.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    return
            # after its CLOSE (an early one: "early-close") a sender sends nothing more, and the
            # reader stopped there: waiting on would hold the target for nothing
            if isinstance(ev, (BaseException, ConnectionClosed, F.Close)):
                return

    def start_reader(self, depth: int, clock: StageClock | None = None) -> FrameOrder:
        """Frames read (and decrypted) by a thread of their own, up to ``depth`` ahead of the
        loop that applies them, in the session's order (frame_order.py: with extra connections
        too); ``clock`` counts the seconds spent receiving."""
        frames = FrameOrder(depth)
        self._frames = frames
        self._reader_stop = threading.Event()
        threading.Thread(target=self._read_into, args=(frames, self._reader_stop, clock), daemon=True,
                         name="smsrepl-rx-reader").start()
        return frames

    def next_frame(self, frames: FrameOrder) -> F.Event:
        """The next frame the reader handed over; what it raised, or why the session was ended,
        raised here."""
        ev = frames.get()
        if self.ended is not None:
            raise self.ended
        if isinstance(ev, BaseException):
            raise ev
        assert isinstance(ev, F.Event)
        return ev

    def _read_into(self, frames: FrameOrder, stop: threading.Event, clock: StageClock | None) -> None:
        chan = self.chan
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                ev = chan.recv()
                if isinstance(ev, F.Seq):  # the session runs over several connections
                    frame = chan.recv()
                    if isinstance(frame, (F.Seq, ConnectionClosed)):
                        raise RemoteProtocolError(f"SEQ followed by {type(frame).__name__}")
                    if clock is not None:
                        clock.add("receive", time.perf_counter() - t0)
                    if not frames.put_seq(ev.seq, frame) or isinstance(frame, (F.Close, F.Error)):
                        return
                    continue
                if clock is not None:
                    clock.add("receive", time.perf_counter() - t0)
                if frames.sequenced and isinstance(ev, (ConnectionClosed, F.Error)):
                    frames.put_nowait(ev)  # the sender is gone: what waits for its turn never comes
                    return
                if not frames.put(ev) or isinstance(ev, (ConnectionClosed, F.Close, F.Error)):
                    return
        except BaseException as exc:  # handed to the applying thread
            frames.put_nowait(exc)


def hello_streams(capabilities: list[str]) -> int:
    """The connections a HELLO asked for ("streams=N"), 0 where it asked for none."""
    for cap in capabilities:
        if cap.startswith(F.STREAMS_ASK):
            count = cap[len(F.STREAMS_ASK):]
            if count.isascii() and count.isdigit() and len(count) <= 3:  # ("²" is a digit too)
                return int(count)
            raise RemoteProtocolError(f"HELLO asks for {cap!r} connections: not a count")
    return 0


def name_target(exc: TargetWriteError, name: str, path: str | None) -> None:
    """Have the message of a failed write name the target it was for (a file's error names the
    file in the tree, a block write's its offset: neither says which target)."""
    if f"target {name!r}" not in exc.message:
        exc.message = f"target {name!r}{f' ({path})' if path else ''}: {exc.message}"
        exc.args = (exc.message,)


def detached(exc: ReplicationError) -> ReplicationError:
    """``exc`` without its traceback, nor the exceptions it was raised during or from: those
    hold the session's frames and so its buffers (megabytes a session) for as long as the
    outcome is kept. The message already says what went wrong."""
    exc.__traceback__ = None
    exc.__context__ = exc.__cause__ = None
    exc.__suppress_context__ = True
    return exc
