"""The receiver's endpoint server: listen, admit, authenticate, dispatch by session kind.

Connections wait at the door (door.py) until their peer speaks; the accept loop then admits
them (admission.py, whose watchdog runs beside it) and gives each a thread, which completes
the TLS handshake, checks that the peer holds a source certificate and hands the channel to a
Session (session.py). The session's HELLO names its kind, and SESSION_KINDS names the handler
that serves it. Stopping ends every session with a checkpoint and its sender told why.
"""
from __future__ import annotations

import logging
import queue
import resource
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping

from smsrepl.errors import AuthenticationError, ConfigError, ReceiverStopping, ReplicationError
from smsrepl.files.fdbudget import door_descriptors, process_budget
from smsrepl.protocol import RECEIVER, Connection
from smsrepl.protocol import frames as F
from smsrepl.transport.admission import Admission
from smsrepl.transport.block_session import BlockSession, ConsistencyCheck
from smsrepl.transport.bodies import body_pool
from smsrepl.transport.channel import Channel
from smsrepl.transport.claims import TargetClaims
from smsrepl.transport.connect import tune_socket
from smsrepl.transport.door import WaitingRoom
from smsrepl.transport.file_session import FileSession
from smsrepl.transport.limits import CONNECT_BURST, KEEP_OUTCOMES, LET_GO_SECONDS, STOP_GRACE
from smsrepl.transport.loglimit import LimitedWarnings
from smsrepl.transport.memory import release_free_memory
from smsrepl.transport.probe_sessions import NetworkCheck, StatusReport
from smsrepl.transport.session import Handler, Session, SessionOutcome
from smsrepl.transport.stream_join import StreamJoin
from smsrepl.transport.stream_offers import StreamOffers
from smsrepl.transport.tls import check_peer_role
from smsrepl.transport.tls_errors import classify_ssl_error
from smsrepl.transport.tlsio import TLSStream

log = logging.getLogger("smsrepl.receiver")

#: seconds between a waiting connection's tries for a place (Admission.admit)
ADMIT_POLL = 0.02

def _spoken(room: WaitingRoom, timeout: float) -> list[tuple[socket.socket, tuple, float, float]]:
    """The door's connections whose peer has spoken (WaitingRoom.ready), each with when it was
    seen to (Admission.admit counts a wait for a place from then)."""
    spoke = room.ready(timeout)
    now = time.monotonic()
    return [(raw, addr, accepted, now) for raw, addr, accepted in spoke]


#: HELLO's session kind -> the handler that serves it; a kind not here is refused
SESSION_KINDS: dict[str, type[Handler]] = {
    "block": BlockSession,
    "verify": ConsistencyCheck,
    "files": FileSession,
    "netcheck": NetworkCheck,
    "status": StatusReport,
    "stream": StreamJoin,
}


class EndpointServer:
    """Serves sessions, one per target at a time, writing only to ``targets`` (settings checked
    by the Receiver that builds it)."""

    def __init__(self, targets: Mapping[str, str], context: ssl.SSLContext, state_dir: str, *,
                 create: bool, on_session: Callable[[SessionOutcome], None] | None, idle_timeout: float,
                 checkpoint_seconds: float, handshake_timeout: float, max_connections: int,
                 max_unauthenticated: int, max_waiting: int, connect_rate: float) -> None:
        self.targets = targets
        self.create = create
        self.context = context
        self.state_dir = state_dir
        self._fd_budget = process_budget()  # raises the soft limit of open files to the hard one
        self.on_session = on_session
        self.idle_timeout = idle_timeout
        self.checkpoint_seconds = checkpoint_seconds
        self.handshake_timeout = handshake_timeout
        self.max_waiting = max_waiting
        self.connect_rate = connect_rate
        #: what strangers at the door cause is said once every few seconds, with a count
        self.warnings = LimitedWarnings(log)
        self.admission = Admission(max_connections=max_connections, max_unauthenticated=max_unauthenticated,
                                   handshake_timeout=handshake_timeout, idle_timeout=idle_timeout,
                                   warnings=self.warnings)
        self.stopping = threading.Event()
        self._stop_reason = "stop requested"
        self.claims = TargetClaims(self.state_dir, self.stopping, lambda: self._stop_reason)
        #: sessions that run over several connections, by the key their extra ones present
        self.streams = StreamOffers()
        self._room: WaitingRoom | None = None
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        #: the latest sessions' outcomes (a receiver that runs for weeks keeps KEEP_OUTCOMES)
        self.outcomes: queue.Queue[SessionOutcome] = queue.Queue(KEEP_OUTCOMES)

    @property
    def shed(self) -> int:
        """Connections closed at the door because of the limits."""
        return self.admission.shed

    def status(self) -> tuple[list, list]:
        """(targets, sessions) as a STATUS frame carries them (the Receiver says)."""
        raise NotImplementedError

    # --- listening ----------------------------------------------------------
    def bind(self, host: str, port: int) -> tuple[str, int]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            if host != "::":
                raise
            host, sock = "0.0.0.0", socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # no IPv6 here
        if host == "::":  # every address: IPv4 too, whatever net.ipv6.bindv6only says
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        sock.listen(64)
        self._listener = sock
        return sock.getsockname()[:2]

    def serve_forever(self, *, once: bool = False) -> SessionOutcome | None:
        """Accept sessions until stop(); with ``once``, return after the first session that named a target."""
        assert self._listener is not None, "bind() first"
        try:
            # the door's share of the open-file limit is kept out of the file sessions' budget
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            limit = min(self.max_waiting, door_descriptors(soft))
            room = self._room = WaitingRoom(self._listener, limit=limit, deadline=self.handshake_timeout,
                                            on_drop=self.admission.dropped_at_door, rate=self.connect_rate,
                                            burst=CONNECT_BURST)
        except (OSError, ValueError):
            return None  # stopped before serving began
        log.info("open files: limit %d, of which %d shared by the file sessions' waiting files; "
                 "up to %d connections wait at the door", soft, self._fd_budget.total, limit)
        watchdog = threading.Thread(target=self.admission.watch, args=(self.stopping,), daemon=True,
                                    name="smsrepl-rx-watchdog")
        watchdog.start()
        try:
            return self._serve(room, once)
        finally:
            room.close()
            self._room = None

    def _serve(self, room: WaitingRoom, once: bool) -> SessionOutcome | None:
        pending: list = []  # connections whose peer has spoken, in the order they did, with when
        try:
            while not self.stopping.is_set():
                if not pending:
                    try:
                        pending = _spoken(room, 0.2)
                    except OSError:
                        break
                    if once and not self.outcomes.empty():
                        # its session's extra connections (parallel streams) came in meanwhile
                        return self.outcomes.get()
                    if not pending:
                        continue
                raw, addr, accepted, since = pending[0]
                admitted = self.admission.admit(raw, addr, accepted, since)
                if admitted is None:  # waits for a place among the connections before their HELLO
                    # meanwhile the door goes on: those that speak now are stamped now, not when
                    # the ones ahead of them have their places
                    try:
                        pending += _spoken(room, ADMIT_POLL)
                    except OSError:
                        break
                    continue
                pending.pop(0)
                if not admitted:
                    continue
                t = threading.Thread(target=self._handle, args=(raw, addr), daemon=True)
                try:
                    t.start()
                except RuntimeError as exc:  # no thread for it: it must not hold a place at the door
                    log.warning("%s:%s: refused: %s", addr[0], addr[1], exc)
                    self.admission.forget(raw)
                    raw.close()
                    continue
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
        finally:
            for raw, *_ in pending:  # spoke, but the receiver stops (or returned) first
                raw.close()
        return None

    def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        addr = self.bind(host, port)
        t = threading.Thread(target=self.serve_forever, daemon=True)
        t.start()
        self._threads.append(t)
        return addr

    def request_stop(self, why: str = "stop requested") -> None:
        """Stop serving; every session ends with a checkpoint, its sender told why (callable from
        a signal handler: the sessions are told on a thread of their own)."""
        if self.stopping.is_set():
            return
        self._stop_reason = why
        self.stopping.set()
        threading.Thread(target=self._end_sessions, name="smsrepl-rx-stop", daemon=True).start()

    def stop(self) -> None:
        """Stop serving, and return once every session made its data durable and wrote its
        checkpoint (within about LET_GO_SECONDS and a checkpoint's fsync)."""
        self.request_stop()
        if self._listener is not None:
            self._listener.close()
        deadline = time.monotonic() + STOP_GRACE
        # twice: the serving thread lists a connection's thread only once it started it, so a
        # connection served meanwhile (its session may be over already) is listed only once the
        # serving thread, joined in the first pass, has ended
        for _ in range(2):
            for t in list(self._threads):
                t.join(timeout=max(0.0, deadline - time.monotonic()))

    def _end_sessions(self) -> None:
        self.claims.wake()  # a session waiting for a busy target gives up
        conns = self.admission.live()
        log.info("stopping (%s): %d connection(s) end, sessions with a checkpoint", self._stop_reason, len(conns))
        for c in conns:
            c.end(ReceiverStopping(f"the receiver is stopping ({self._stop_reason}); rerun to resume"))
        time.sleep(LET_GO_SECONDS)
        for c in self.admission.live():  # stuck in a send to a peer that is gone: cut it
            if c.chan is not None:
                c.chan.abort("the receiver is stopping")

    def connections(self) -> tuple[int, int]:
        """(open connections, of which before their HELLO): those served, and those at the door
        that have not said anything yet."""
        room = self._room
        waiting = len(room) if room is not None else 0
        served, unauthenticated = self.admission.counts()
        return served + waiting, unauthenticated + waiting

    # --- one connection -----------------------------------------------------
    def _handle(self, raw: socket.socket, addr: tuple) -> None:
        try:
            self._serve_connection(raw, addr)
        finally:
            self.admission.forget(raw)

    def _serve_connection(self, raw: socket.socket, addr: tuple) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        conn = self.admission.conns[raw]
        try:
            tune_socket(raw)
        except OSError:
            pass  # gone already: the handshake says so
        raw.settimeout(self.handshake_timeout)
        try:
            sock = TLSStream(raw, self.context, server_side=True)
            sock.handshake()
            check_peer_role(sock.obj, "source")
        except ReplicationError as exc:
            self.warnings.warning("refused", "%s: refused: %s", peer, exc)
            if isinstance(exc, AuthenticationError):
                _tell_refused(sock, exc)
            raw.close()
            return
        except (ssl.SSLError, OSError) as exc:
            if conn.reason is None:  # else the watchdog or the door dropped it, and said why
                self.warnings.warning("handshake", "%s: %s", peer, classify_ssl_error(exc, server_side=True))
            raw.close()
            return
        sock.settimeout(self.idle_timeout)
        # large bodies from the process's pool: bounded however many sessions run
        chan = Channel(sock, Connection(RECEIVER, bodies=body_pool().get))
        conn.chan = chan
        if conn.reason is not None:  # the watchdog fired between the handshake and here
            chan.abort(conn.reason)
        session = Session(self, chan, peer, SESSION_KINDS, on_hello=conn.authenticate)
        conn.session = session
        if self.stopping.is_set():
            session.end(ReceiverStopping(f"the receiver is stopping ({self._stop_reason}); retry later"))
        try:
            session.run()
        finally:
            conn.session = None  # conn and session refer to each other: only a full gc would free the buffers
            chan.close()
            body_pool().trim()
            release_free_memory()  # a session's buffers are gone: give the pages back between sessions
            if session.outcome is not None:
                self._keep(session.outcome)
                if self.on_session:
                    self.on_session(session.outcome)

    def _keep(self, outcome: SessionOutcome) -> None:
        while True:
            try:
                self.outcomes.put_nowait(outcome)
                return
            except queue.Full:
                try:
                    self.outcomes.get_nowait()  # the oldest goes
                except queue.Empty:
                    pass


def _tell_refused(sock: TLSStream, exc: AuthenticationError) -> None:
    """Tell a peer whose certificate is of our CA but not a source's why it is refused: an
    ERROR frame (exit 4: rerunning will not help). Without it the sender sees only the
    connection end, exit 3, and retries for ever. Its HELLO is read first, so that closing
    leaves nothing unread (which would reset the connection, and could lose the ERROR)."""
    chan = Channel(sock, Connection(RECEIVER))
    try:
        sock.settimeout(2.0)
        chan.recv()
    except ReplicationError:
        pass
    try:
        chan.send(F.Error(exc.code or "", exc.message, exc.exit_code, False))
    except ReplicationError:
        pass
