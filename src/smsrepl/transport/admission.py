"""Admission and the watchdog: which accepted connections the receiver serves, and for how long.

A connection whose peer has spoken (door.py) is admitted while fewer than ``max_connections``
sessions run (network checks have a pool of their own, claims.py); when ``max_unauthenticated``
of them have not said HELLO yet, it waits for one of those to say it, and once the oldest of
those is EVICT_AFTER seconds old, or it waited that long since it spoke, the oldest goes. The
watchdog then drops a connection that says no HELLO in time, a network check that goes on too
long, and a session that trickles: no frame completed and less than MIN_PROGRESS bytes in ``idle_timeout``.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Protocol

from smsrepl.errors import ReplicationError
from smsrepl.transport.channel import Channel
from smsrepl.transport.limits import EVICT_AFTER, MIN_PROGRESS, NETCHECK_SECONDS, WATCHDOG_SECONDS
from smsrepl.transport.loglimit import LimitedWarnings

log = logging.getLogger("smsrepl.receiver")


class Endable(Protocol):
    def end(self, why: ReplicationError) -> None: ...


class Admitted:
    """One admitted connection as the watchdog sees it."""

    def __init__(self, raw: socket.socket, accepted: float, warnings: LimitedWarnings) -> None:
        self.raw = raw
        self.warnings = warnings
        self.accepted = accepted
        #: when it was admitted: it began its handshake then (it may have waited silent at the
        #: door long before, as the extra connections of a session do until its HELLO went)
        self.admitted = time.monotonic()
        self.authenticated = False  # a HELLO arrived over mutual TLS
        self.kind: str | None = None  # the session kind its HELLO named
        self.chan: Channel | None = None
        self.session: Endable | None = None
        self.reason: str | None = None
        #: when the watchdog last saw MIN_PROGRESS more bytes arrive (or no frame pending)
        self.progress_at = accepted
        self.progress_bytes = 0

    def authenticate(self, kind: str) -> None:
        self.kind = kind
        self.authenticated = True

    def end(self, why: ReplicationError) -> None:
        """Ask its session to end now (it checkpoints and tells its sender ``why``)."""
        if self.session is not None:
            self.session.end(why)
        elif self.chan is not None:
            self.chan.abort(why.message)
        else:
            self._shutdown()

    def drop(self, reason: str) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        self.warnings.warning("dropped", "dropping a connection: %s", reason)
        if self.chan is not None:
            self.chan.abort(reason)
        else:
            self._shutdown()

    def _shutdown(self) -> None:
        try:
            self.raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Admission:
    """The admitted connections (raw socket -> Admitted), their limits and their watchdog."""

    def __init__(self, *, max_connections: int, max_unauthenticated: int, handshake_timeout: float,
                 idle_timeout: float, warnings: LimitedWarnings) -> None:
        self.max_connections = max_connections
        self.max_unauthenticated = min(max_unauthenticated, max_connections)
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.warnings = warnings
        self.conns: dict[socket.socket, Admitted] = {}
        self.lock = threading.Lock()
        self.shed = 0  # connections closed at the door because of the limits

    def dropped_at_door(self, why: str, addr: tuple) -> None:
        with self.lock:
            self.shed += 1
        self.warnings.warning("door", "%s:%s: closed at the door: %s", addr[0], addr[1], why)

    def admit(self, raw: socket.socket, addr: tuple, accepted: float, spoke: float) -> bool | None:
        """Admit the connection (True), or close it (False): too many sessions run; None: not
        yet, the connections before their HELLO are as many as allowed, none is old, and this
        one has waited less than EVICT_AFTER since it spoke (``spoke``: when it did)."""
        evict = None
        with self.lock:
            pending = [c for c in self.conns.values() if not c.authenticated and c.reason is None]
            live = sum(1 for c in self.conns.values() if c.reason is None and c.kind != "netcheck")
            if live < self.max_connections:
                if len(pending) >= self.max_unauthenticated:
                    # the door is full of connections that have not said HELLO. Young ones are
                    # handshaking (several sessions' extra connections joining at once over a long
                    # link): this one waits for them. An old one goes, so idle connections cannot
                    # keep real senders out for long; so does the oldest once this one waited
                    # EVICT_AFTER since it spoke (counted from when the one ahead of it got a place,
                    # a queue of idle speakers held a sender EVICT_AFTER for each of them)
                    oldest = min(pending, key=lambda c: c.admitted)
                    now = time.monotonic()
                    if now - oldest.admitted < EVICT_AFTER and now - spoke < EVICT_AFTER:
                        return None
                    evict = oldest
                    self.shed += 1
                self.conns[raw] = Admitted(raw, accepted, self.warnings)
                admitted = True
            else:
                admitted = False
                self.shed += 1
            shed = self.shed
        if evict is not None:
            evict.drop(f"evicted before its HELLO: {len(pending)} connections were waiting at the door")
        if admitted:
            return True
        self.warnings.warning("door", "%s:%s: refused at the door: %d connections open (limit %d); %d refused so far",
                              addr[0], addr[1], live, self.max_connections, shed)
        try:
            raw.close()
        except OSError:
            pass
        return False

    def forget(self, raw: socket.socket) -> None:
        with self.lock:
            self.conns.pop(raw, None)

    def live(self) -> list[Admitted]:
        with self.lock:
            return list(self.conns.values())

    def counts(self) -> tuple[int, int]:
        """(admitted connections, of which before their HELLO)."""
        with self.lock:
            return len(self.conns), sum(1 for c in self.conns.values() if not c.authenticated)

    def watch(self, stopping: threading.Event) -> None:
        """The watchdog, until ``stopping``: drop connections that stall the door (no HELLO in
        time) or trickle frames."""
        while not stopping.wait(WATCHDOG_SECONDS):
            now = time.monotonic()
            for c in self.live():
                if not c.authenticated:
                    if now - c.accepted > self.handshake_timeout:
                        c.drop(f"no HELLO within {self.handshake_timeout:g} s of connecting")
                    continue
                if c.kind == "netcheck" and now - c.accepted > NETCHECK_SECONDS:
                    c.drop(f"a network check went on for more than {NETCHECK_SECONDS:g} s")
                    continue
                chan = c.chan
                since = chan.recv_since if chan is not None else None  # read once: recv() clears it
                got = chan.wire_received if chan is not None else 0
                if since is None or got - c.progress_bytes >= MIN_PROGRESS:
                    c.progress_at, c.progress_bytes = now, got
                elif now - max(since, c.progress_at) > self.idle_timeout:
                    c.drop(f"the peer completed no frame and sent less than {MIN_PROGRESS >> 10} KiB "
                           f"in {self.idle_timeout:g} s")
