"""A connected socket (normally TLS) pumping bytes through a protocol Connection.

The only place where protocol events meet a socket. Thread-safe: one
thread may send while another receives.
"""
from __future__ import annotations

import fcntl
import socket
import ssl
import sys
import termios
import threading
import time
from collections.abc import Callable

from smsrepl.errors import TransportError
from smsrepl.throttle import ScheduledLimiter
from smsrepl.transport.tls_errors import classify_ssl_error
from smsrepl.transport.tlsio import TLSStream
from smsrepl.protocol import RECEIVER, Connection, ConnectionClosed
from smsrepl.protocol.connection import DIRECT_BODY_MIN
from smsrepl.protocol.frames import Event, frame_size

#: bytes per speed-limiter payment when a limit applies
THROTTLE_SLICE = 64 << 10
#: bytes a large frame is written in when no limit applies (counted in wire_sent as each goes)
UNPACED_SLICE = 256 << 10
#: bytes read at a time outside a large frame body (a body is read in place): what a read
#: takes beyond the frame header goes through the connection's buffer and is copied into the
#: body; 1 MiB reads passed most of each 8 MiB frame's first MiB that way, into a buffer
#: mapped afresh each time (a page fault per 4 KiB)
HEAD_READ = DIRECT_BODY_MIN


class Channel:
    def __init__(self, sock: TLSStream, conn: Connection) -> None:
        self.sock = sock
        self.conn = conn
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._rbuf = bytearray(HEAD_READ)
        #: bytes handed to the socket so far, a paced frame's slices as they go: progress
        #: moves while a frame leaves over seconds
        self.wire_sent = 0
        self.wire_received = 0
        #: frame_size() of every frame handed to send(), and (of those on the socket, the frame
        #: going now's, its encoded size, wire_sent as it began): a sender's progress (SentMarks)
        self.frame_bytes_queued = 0
        self._going = (0, 0, 0, 0)
        # TLS 1.3 clients learn that the server refused their certificate only
        # at their first read: until an event arrives, TLS errors are auth errors
        self._first_read = True
        #: a speed limiter (throttle.limiter.ScheduledLimiter): throttle(n) pays for n bytes
        #: before they are written, current() says whether a limit applies now
        self.limiter: ScheduledLimiter | None = None
        #: called with the frame's size after it was written (an over-speed guard)
        self.on_sent: Callable[[int], None] | None = None
        #: when the pending recv() began waiting (None while not receiving): a watchdog
        #: that sees this too old aborts a peer that trickles a frame byte by byte
        self.recv_since: float | None = None
        #: why abort() broke the connection, for the error the blocked call raises
        self.abort_reason: str | None = None
        #: when the last frame went (time.monotonic()): keepalives are sent only into a silence
        self.sent_at = time.monotonic()

    def frame_bytes_sent(self) -> int:
        """frame_size() of the frames on the socket, the one going now's in part, less what the
        kernel holds unacknowledged (any thread): what the peer has, about. A socket's send
        buffer grows to megabytes on a long link, seconds of a slow one."""
        done, units, size, written0 = self._going
        if units:
            done += units * min(size, max(0, self.wire_sent - written0)) // max(1, size)
        return max(0, done - self.unacknowledged())

    def wire_acknowledged(self) -> int:
        """wire_sent less what the kernel holds unacknowledged: what the peer has, about."""
        return max(0, self.wire_sent - self.unacknowledged())

    def unacknowledged(self) -> int:
        """Bytes in the socket's send queue (TCP: not yet acknowledged by the peer); 0 where
        the socket cannot say."""
        raw: socket.socket | None = getattr(self.sock, "raw", None)  # a TLSStream's TCP socket
        try:
            out = fcntl.ioctl(raw.fileno() if raw is not None else self.sock.fileno(),  # type: ignore[attr-defined]
                              termios.TIOCOUTQ, b"\0\0\0\0")
        except (OSError, ValueError, AttributeError):  # closed, not a socket, a test's stand-in
            return 0
        return int.from_bytes(out, sys.byteorder, signed=True)

    def send(self, event: Event) -> None:
        units = frame_size(event)
        with self._state_lock:
            parts = self.conn.send(event)
            self.frame_bytes_queued += units
        size = sum(len(p) for p in parts)
        limiter = self.limiter
        # unlimited right now: whole frames (a limit set meanwhile applies from the next frame)
        throttle = limiter.throttle if limiter is not None and limiter.current()[0] is not None else None
        with self._send_lock:
            done = self._going[0]
            self._going = (done, units, size, self.wire_sent)
            try:
                for part in parts:
                    if throttle is None and len(part) <= UNPACED_SLICE:
                        self.sock.sendall(part)
                        self.wire_sent += len(part)
                        continue
                    # a large frame leaves in slices, each paid for just before it goes when
                    # a limit applies (at 80 Mbit/s a whole 4 MiB frame would be a 0.4 s
                    # burst), and counted as it goes: progress moves on a slow link too
                    view = memoryview(part).cast("B")
                    step = UNPACED_SLICE if throttle is None else THROTTLE_SLICE
                    for i in range(0, len(view), step):
                        piece = view[i:i + step]
                        if throttle is not None:
                            throttle(len(piece))
                        self.sock.sendall(piece)
                        self.wire_sent += len(piece)
            except (OSError, ssl.SSLError) as exc:
                raise TransportError(f"connection lost while sending: {exc}") from None
            self._going = (done + units, 0, 0, 0)
            self.sent_at = time.monotonic()
        if self.on_sent is not None:
            self.on_sent(size)

    def recv(self) -> Event:
        """Block until the next event; a ConnectionClosed event at the end."""
        self.recv_since = time.monotonic()
        try:
            return self._recv()
        except TransportError:
            if self.abort_reason is not None:
                raise TransportError(self.abort_reason) from None
            raise
        finally:
            self.recv_since = None

    def _recv(self) -> Event:
        while True:
            with self._state_lock:
                ev = self.conn.next_event()
            if isinstance(ev, Event):  # else NEED_DATA
                self._first_read = False
                if isinstance(ev, ConnectionClosed) and self.abort_reason is not None:
                    raise TransportError(self.abort_reason)
                return ev
            with self._state_lock:
                direct = self.conn.receive_buffer()
            target = direct if direct is not None else self._rbuf
            try:
                n = self.sock.recv_into(target)
            except socket.timeout:
                raise TransportError("the peer sent nothing for too long (timeout)") from None
            except ssl.SSLError as exc:
                if self._first_read and "ALERT" in str(exc).upper():
                    raise classify_ssl_error(exc, server_side=self.conn.role is RECEIVER) from None
                raise TransportError(f"connection lost while receiving: {exc}") from None
            except OSError as exc:
                raise TransportError(f"connection lost while receiving: {exc}") from None
            self.wire_received += n
            with self._state_lock:
                if direct is not None and n:
                    self.conn.received(n)  # a large frame body, read in place
                else:
                    self.conn.receive_data(memoryview(self._rbuf)[:n] if n else b"")

    def abort(self, reason: str | None = None) -> None:
        """Break the connection from another thread: blocked reads and writes fail at once
        (with ``reason`` as their error, when given)."""
        if reason is not None:
            self.abort_reason = reason
        try:
            self.sock.raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def goodbye(self, frame: Event) -> None:
        """Send CLOSE and wait for the peer's, or for it to hang up: a question session's end."""
        self.send(frame)
        try:
            self.recv()
        except TransportError:
            pass

    def close(self) -> None:
        # the callbacks are bound methods of the endpoint that owns this channel: dropping
        # them breaks that reference cycle, so the session's buffers (1 MiB and up) go now,
        # not at the next full garbage collection (a continuous session grew by ~0.3 MiB a round)
        self.on_sent = None
        self.limiter = None
        try:
            self.sock.close()
        except OSError:
            pass
