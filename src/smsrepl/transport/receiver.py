"""The target-side endpoint: accepts TLS sessions and applies them to configured targets only."""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import resource
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from smsrepl import faults, kernels
from smsrepl.blocks.target import BlockTarget
from smsrepl.blocks.manifest import GROUP_BLOCKS
from smsrepl.blocks.replica import Replica
from smsrepl.durable import private_makedirs, write_json_atomic
from smsrepl.errors import (AuthenticationError, ConfigError, ReceiverStopping, RefusedError,
                            RemoteProtocolError, ReplicationError, TakenOver, TargetBusyError,
                            TargetKindError, TargetWriteError, TransportError)
from smsrepl.files.apply import TreeWriter
from smsrepl.files.describe import describe_tree
from smsrepl.files.fdbudget import door_descriptors, process_budget
from smsrepl.files.names import remove_temporaries
from smsrepl.files.opapply import OpApplier
from smsrepl.files.signatures import signature_frames
from smsrepl.transport.memory import release_free_memory
from smsrepl.transport.bodies import body_pool
from smsrepl.protocol import CAPABILITIES, PROTOCOL_VERSION, RECEIVER, Connection, ConnectionClosed
from smsrepl.protocol import frames as F
from smsrepl.transport.channel import Channel
from smsrepl.transport.connect import TARGET_NAME, check_target_name, tune_socket
from smsrepl.transport.tls import check_peer_role, classify_ssl_error
from smsrepl.transport.door import WaitingRoom
from smsrepl.transport import targets as target_checks
from smsrepl.transport.loglimit import LimitedWarnings
from smsrepl.transport.tlsio import TLSStream

log = logging.getLogger("smsrepl.receiver")
#: one line per completed block round, with its stage breakdown (`smsrepl receive` shows it)
rounds_log = logging.getLogger("smsrepl.receiver.rounds")

#: seconds between durable checkpoints while data flows
CHECKPOINT_SECONDS = 2.0
#: from accepting a connection to its HELLO: TLS handshake and the first frame together
HANDSHAKE_TIMEOUT = 15.0
#: a session that completes no frame and moves less than MIN_PROGRESS bytes for this long
#: is dropped: a peer trickling one byte a second is, a slow but steady link (an 8 MiB frame
#: at 512 kbit/s takes 131 s) is not
IDLE_TIMEOUT = 120.0
#: seconds between the PONGs a file session sends while it works without sending (a syncfs that
#: waits for a busy disk, a listing that reads a large file): the sender's I/O timeout is 300 s
KEEPALIVE = 20.0
MIN_PROGRESS = 64 << 10
#: connections served at once, and how many of them may still be before their HELLO:
#: a flood of connections costs a bounded number of threads and is shed at the door
MAX_CONNECTIONS = 64
MAX_UNAUTHENTICATED = 16
#: connections that have said nothing yet wait without a thread (door.py), this many at most
MAX_WAITING = 1024
#: TLS handshakes a second from one peer address (CONNECT_BURST at once): connections past
#: that are closed when they speak, before the handshake; silent ones cost none (door.py)
CONNECT_RATE = 20.0
CONNECT_BURST = 64
#: network checks in a pool of their own, outside MAX_CONNECTIONS: idle or abusive checks
#: cannot hold the slots of data sessions. A check lasts seconds; one is dropped after
#: NETCHECK_SECONDS
MAX_NETCHECKS = 4
NETCHECK_SECONDS = 120.0
#: session outcomes kept for serve_forever(once=True) and embedders; older ones are dropped
KEEP_OUTCOMES = 100
WATCHDOG_SECONDS = 0.5
#: how long a session whose target failed (a full disk, an I/O error) reads what its sender
#: still streams after the ERROR frame
DRAIN_STREAMING = 10.0
#: how long a session waits for its target to be let go by another before it is told "busy"
BUSY_WAIT = 3.0
MAX_MANIFEST_ENTRIES = 1 << 18  # per MANIFEST_DATA frame: 4 MiB coarse, 2 MiB fine
#: a session told to end (the receiver stops, or another sender takes its target over) that has
#: not let go after this long is cut: its peer may be gone and a send to it blocked
LET_GO_SECONDS = 1.0
#: how long a stopping receiver reads what a sender still streams after its ERROR frame
STOP_DRAIN = 0.5
#: the longest stop() waits for sessions' last checkpoints (each one fsyncs the target)
STOP_GRACE = 60.0


class RootTargets(Mapping):
    """``receive --root DIR``: every valid target name is DIR/NAME (an image file for block
    sessions, a directory for file sessions), and nothing outside DIR."""

    def __init__(self, root: str) -> None:
        if not os.path.isdir(root):
            raise ConfigError(f"--root {root!r} is not a directory")
        self.root = os.path.abspath(root)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(TARGET_NAME.match(name)) and name not in (".", "..")

    def __getitem__(self, name: str) -> str:
        if name not in self:
            raise KeyError(name)
        return os.path.join(self.root, name)

    def __iter__(self):
        return iter(())  # open-ended: names are not listed

    def __len__(self) -> int:
        return 0


@dataclass(frozen=True, slots=True)
class SessionOutcome:
    target: str
    peer: str
    ok: bool
    error: ReplicationError | None
    rounds: int
    bytes_written: int


class Receiver:
    """Serves sessions, one per target at a time, writing only to ``targets``."""

    def __init__(
        self,
        targets: dict[str, str] | RootTargets,
        context: ssl.SSLContext,
        state_dir: str,
        *,
        on_session: Callable[[SessionOutcome], None] | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        max_unauthenticated: int = MAX_UNAUTHENTICATED,
        max_waiting: int = MAX_WAITING,
        connect_rate: float = CONNECT_RATE,
        create: bool = False,
    ) -> None:
        """``create``: a target path that does not exist is created (an image file sized to the
        source, or a directory) instead of refused; names below a RootTargets are created either way."""
        for what, value in (("idle timeout", idle_timeout), ("handshake timeout", handshake_timeout)):
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ConfigError(f"{what} {value!r} s must be a positive number of seconds")
        for what, value in (("connection limit", max_connections), ("unauthenticated connection limit",
                                                                     max_unauthenticated),
                            ("waiting connection limit", max_waiting)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{what} {value!r} must be a whole number of at least 1")
        if not 0 < checkpoint_seconds <= 60:
            raise ConfigError(f"checkpoint interval {checkpoint_seconds} s is outside 0-60 s")
        if isinstance(targets, RootTargets):
            self.targets = targets
        elif not targets:
            raise ConfigError("the receiver needs at least one --target NAME=PATH, or --root DIR")
        else:
            self.targets = {check_target_name(n): os.path.abspath(p) for n, p in targets.items()}
            target_checks.check_at_start(self.targets, create=create)
        self.create = create or isinstance(self.targets, RootTargets)
        self.context = context
        self.state_dir = os.path.abspath(state_dir)
        private_makedirs(self.state_dir)
        self._fd_budget = process_budget()  # raises the soft limit of open files to the hard one
        self.on_session = on_session
        self.idle_timeout = idle_timeout
        self.checkpoint_seconds = checkpoint_seconds
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.max_unauthenticated = min(max_unauthenticated, max_connections)
        self.max_waiting = max_waiting
        if not (isinstance(connect_rate, (int, float)) and 0 < connect_rate < float("inf")):
            raise ConfigError(f"connection rate {connect_rate!r} a second must be a positive number")
        self.connect_rate = connect_rate
        self._room: WaitingRoom | None = None
        #: live connections: raw socket -> _Conn (the watchdog's view of them)
        self._conns: dict[socket.socket, _Conn] = {}
        self._conns_lock = threading.Lock()
        self.shed = 0  # connections closed at the door because of the limits
        #: what strangers at the door cause is said once every few seconds, with a count
        self.warnings = LimitedWarnings(log)
        self._busy: dict[str, "_Session"] = {}
        self._busy_lock = threading.Condition()
        self._netchecks = 0
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._stop_reason = "stop requested"
        #: the latest sessions' outcomes (a receiver that runs for weeks keeps KEEP_OUTCOMES)
        self.outcomes: queue.Queue[SessionOutcome] = queue.Queue(KEEP_OUTCOMES)

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
                                            on_drop=self._dropped_at_door, rate=self.connect_rate,
                                            burst=CONNECT_BURST)
        except (OSError, ValueError):
            return None  # stopped before serving began
        log.info("open files: limit %d, of which %d shared by the file sessions' waiting files; "
                 "up to %d connections wait at the door", soft, self._fd_budget.total, limit)
        watchdog = threading.Thread(target=self._watchdog, daemon=True, name="smsrepl-rx-watchdog")
        watchdog.start()
        try:
            return self._serve(room, once)
        finally:
            room.close()
            self._room = None

    def _serve(self, room: WaitingRoom, once: bool) -> SessionOutcome | None:
        pending: list = []  # connections whose peer has spoken, in the order they did
        try:
            while not self._stopping.is_set():
                if not pending:
                    try:
                        pending = room.ready(0.2)
                    except OSError:
                        break
                    if not pending:
                        if once and not self.outcomes.empty():
                            return self.outcomes.get()
                        continue
                raw, addr, accepted = pending.pop(0)
                if not self._admit(raw, addr, accepted):
                    continue
                t = threading.Thread(target=self._handle, args=(raw, addr), daemon=True)
                try:
                    t.start()
                except RuntimeError as exc:  # no thread for it: it must not hold a place at the door
                    log.warning("%s:%s: refused: %s", addr[0], addr[1], exc)
                    with self._conns_lock:
                        self._conns.pop(raw, None)
                    raw.close()
                    continue
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
                if once:
                    t.join()
                    try:
                        return self.outcomes.get_nowait()
                    except queue.Empty:
                        continue  # the connection never got as far as naming a target
        finally:
            for raw, _, _ in pending:  # spoke, but the receiver stops (or returned) first
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
        if self._stopping.is_set():
            return
        self._stop_reason = why
        self._stopping.set()
        threading.Thread(target=self._end_sessions, name="smsrepl-rx-stop", daemon=True).start()

    def stop(self) -> None:
        """Stop serving, and return once every session made its data durable and wrote its
        checkpoint (within about LET_GO_SECONDS and a checkpoint's fsync)."""
        self.request_stop()
        if self._listener is not None:
            self._listener.close()
        deadline = time.monotonic() + STOP_GRACE
        for t in list(self._threads):
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def _end_sessions(self) -> None:
        with self._busy_lock:
            self._busy_lock.notify_all()  # a session waiting for a busy target gives up
        with self._conns_lock:
            conns = list(self._conns.values())
        log.info("stopping (%s): %d connection(s) end, sessions with a checkpoint", self._stop_reason, len(conns))
        for c in conns:
            c.end(ReceiverStopping(f"the receiver is stopping ({self._stop_reason}); rerun to resume"))
        time.sleep(LET_GO_SECONDS)
        with self._conns_lock:
            left = [c for c in self._conns.values()]
        for c in left:  # stuck in a send to a peer that is gone: cut it
            if c.chan is not None:
                c.chan.abort("the receiver is stopping")

    # --- admission and the watchdog -----------------------------------------
    def _dropped_at_door(self, why: str, addr) -> None:
        with self._conns_lock:
            self.shed += 1
        self.warnings.warning("door", "%s:%s: closed at the door: %s", addr[0], addr[1], why)

    def _admit(self, raw: socket.socket, addr, accepted: float) -> bool:
        evict = None
        with self._conns_lock:
            pending = [c for c in self._conns.values() if not c.authenticated and c.reason is None]
            live = sum(1 for c in self._conns.values() if c.reason is None and c.kind != "netcheck")
            if live < self.max_connections:
                if len(pending) >= self.max_unauthenticated:
                    # the door is full of connections that have not said HELLO: the oldest
                    # goes, so idle connections cannot keep real senders out for long
                    evict = min(pending, key=lambda c: c.accepted)
                    self.shed += 1
                self._conns[raw] = _Conn(raw, accepted, self.warnings)
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

    def _watchdog(self) -> None:
        """Drop connections that stall the door (no HELLO in time) or trickle frames."""
        while not self._stopping.wait(WATCHDOG_SECONDS):
            now = time.monotonic()
            with self._conns_lock:
                conns = list(self._conns.values())
            for c in conns:
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

    def status(self) -> tuple[list, list]:
        """(targets, sessions) as a STATUS frame carries them (transport/status.py)."""
        from smsrepl.transport.status import describe

        with self._busy_lock:
            busy = dict(self._busy)
        root = self.targets.root if isinstance(self.targets, RootTargets) else None
        return describe(self.targets, busy, self.state_dir, root)

    def connections(self) -> tuple[int, int]:
        """(open connections, of which before their HELLO): those served, and those at the door
        that have not said anything yet."""
        room = self._room
        waiting = len(room) if room is not None else 0
        with self._conns_lock:
            return len(self._conns) + waiting, sum(1 for c in self._conns.values() if not c.authenticated) + waiting

    # --- one session --------------------------------------------------------
    def _handle(self, raw: socket.socket, addr) -> None:
        try:
            self._serve_connection(raw, addr)
        finally:
            with self._conns_lock:
                self._conns.pop(raw, None)

    def _serve_connection(self, raw: socket.socket, addr) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        conn = self._conns[raw]
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
                self._tell_refused(sock, exc)
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
        session = _Session(self, chan, peer, on_hello=conn.authenticate)
        conn.session = session
        if self._stopping.is_set():
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

    @staticmethod
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

    def _claim(self, name: str, session: "_Session") -> int:
        with self._busy_lock:
            holder = self._busy.get(name)
            if holder is not None and holder.hello is not None and session.hello is not None \
                    and holder.hello.session_id == session.hello.session_id:
                # the same sender came back: its old connection is dead or dying
                # (a cut the old session has not noticed yet); the newer one wins
                log.info("target %s: session %s reconnected from %s; dropping its old connection from %s", name,
                         session.hello.session_id, session.peer, holder.peer)
                holder.end(TakenOver(f"target {name!r} was taken over by another sender of the same session "
                                     f"({_peer_name(session.chan, session.peer)}); this sender stops here"))
                if not self._busy_lock.wait_for(lambda: name not in self._busy, timeout=LET_GO_SECONDS):
                    holder.chan.abort()  # its peer may be gone, a send to it blocked
                    self._busy_lock.wait_for(lambda: name not in self._busy, timeout=10)
            if name in self._busy:
                # a session that is ending (its sender hung up, its target being closed) lets go
                # within moments: a sender arriving then is not turned away for it
                self._busy_lock.wait_for(lambda: name not in self._busy or self._stopping.is_set(),
                                         timeout=BUSY_WAIT)
            if self._stopping.is_set():
                raise ReceiverStopping(f"the receiver is stopping ({self._stop_reason}); retry later")
            if name in self._busy:
                raise TargetBusyError(f"target {name!r} is busy with another session (from "
                                      f"{self._busy[name].peer}); retry when it ends")
            lock_path = os.path.join(self.state_dir, f"{name}.lock")
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise TargetBusyError(f"target {name!r} is busy with another receiver process; "
                                      f"retry when it ends") from None
            self._busy[name] = session
            return fd

    def _claim_netcheck(self) -> None:
        with self._busy_lock:
            if self._netchecks >= MAX_NETCHECKS:
                raise TargetBusyError(f"{self._netchecks} network checks are running (limit {MAX_NETCHECKS}); "
                                      f"retry in a few seconds")
            self._netchecks += 1

    def _release_netcheck(self) -> None:
        with self._busy_lock:
            self._netchecks -= 1

    def _release(self, name: str, fd: int) -> None:
        with self._busy_lock:
            self._busy.pop(name, None)
            os.close(fd)
            self._busy_lock.notify_all()


_CONTROL = (F.Ping, F.Close, F.Error, ConnectionClosed)


class _Conn:
    """One accepted connection as the watchdog sees it."""

    def __init__(self, raw: socket.socket, accepted: float, warnings: LimitedWarnings) -> None:
        self.raw = raw
        self.warnings = warnings
        self.accepted = accepted
        self.authenticated = False  # a HELLO arrived over mutual TLS
        self.kind: str | None = None  # the session kind its HELLO named
        self.chan: Channel | None = None
        self.session: _Session | None = None
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
            try:
                self.raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def drop(self, reason: str) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        self.warnings.warning("dropped", "dropping a connection: %s", reason)
        if self.chan is not None:
            self.chan.abort(reason)
        else:
            try:
                self.raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _peer_name(chan: Channel, peer: str) -> str:
    """``peer`` and the subject CN (or OU) of its certificate, where there is one."""
    try:
        cert = chan.sock.getpeercert() or {}
    except (AttributeError, ValueError):
        return peer
    names = {key: value for rdn in cert.get("subject", ()) for key, value in rdn}
    name = names.get("commonName") or names.get("organizationalUnitName")
    return f"{peer}, certificate {name!r}" if name else peer


def _read_record(path: str) -> dict:
    """A file target's round record; a missing or damaged one means no completed round (a full copy)."""
    try:
        with open(path, "rb") as fh:
            rec = json.load(fh)
        return rec if isinstance(rec, dict) and isinstance(rec.get("round_id", 0), int) else {}
    except (OSError, ValueError):
        return {}


def _name_target(exc: TargetWriteError, name: str, path: str | None) -> None:
    """Have the message of a failed write name the target it was for (a file's error names the
    file in the tree, a block write's its offset: neither says which target)."""
    if f"target {name!r}" not in exc.message:
        exc.message = f"target {name!r}{f' ({path})' if path else ''}: {exc.message}"
        exc.args = (exc.message,)


def _detached(exc: ReplicationError) -> ReplicationError:
    """``exc`` without its traceback, nor the exceptions it was raised during or from: those
    hold the session's frames and so its buffers (megabytes a session) for as long as the
    outcome is kept. The message already says what went wrong."""
    exc.__traceback__ = None
    exc.__context__ = exc.__cause__ = None
    exc.__suppress_context__ = True
    return exc


class _Session:
    def __init__(self, rx: Receiver, chan: Channel, peer: str, *,
                 on_hello: Callable[[str], None] | None = None) -> None:
        self.rx = rx
        self.on_hello = on_hello
        self.chan = chan
        self.peer = peer
        self.outcome: SessionOutcome | None = None
        self.replica: Replica | None = None
        self.hello: F.Hello | None = None
        self.rounds = 0
        self.written = 0
        self._frames: queue.Queue | None = None
        self._reader_stop: threading.Event | None = None
        self.lock_fd: int | None = None
        #: the block session whose rounds this connection runs: the HELLO's, or the one a
        #: sender without state of its own took over (_adopt)
        self.session_id = ""
        self._netcheck = False  # holds one of the receiver's network-check places
        #: why the session must end now (the receiver stops, another sender takes over): the
        #: applying loop raises it at its next frame
        self._ended: ReplicationError | None = None
        self.started = time.time()

    def end(self, why: ReplicationError) -> None:
        """End the session from another thread: its loop stops at the next frame, the target is
        checkpointed and the sender hears ``why`` (no ERROR frame can be sent on a channel whose
        loop is not reading frames: a consistency check, a network check, a handshake)."""
        self._ended = why
        frames = self._frames
        if frames is None:
            self.chan.abort(why.message)
            return
        try:
            frames.put_nowait(why)  # wakes a loop waiting for the sender's next frame
        except queue.Full:
            pass  # the loop is busy with frames: it sees _ended before the next one

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
            if ev.kind == "netcheck":
                self.rx._claim_netcheck()
                self._netcheck = True
                self.chan.send(F.Welcome(PROTOCOL_VERSION, ev.session_id, 0, "new", 0, "full", 0, "",
                                         capabilities=list(CAPABILITIES)))
                log.info("%s: network check", self.peer)
                clean = self._netcheck_loop()
            elif ev.kind == "status":
                clean = self._status()
            elif ev.kind == "files":
                self._open_file_session(ev)
                clean = self._files_loop()
            elif ev.kind == "verify":
                self._open_block_session(ev, verify=True)
                clean = self._verify_loop()
            else:
                self._open_block_session(ev)
                clean = self._loop()
        except Exception as exc:  # noqa: BLE001 - every failure must reach the sender, not kill the thread
            if self._ended is not None:
                exc = self._ended_error()
            if not isinstance(exc, ReplicationError):
                log.exception("%s: target %s: internal error", self.peer, target_name)
                exc = ReplicationError(f"receiver internal error: {type(exc).__name__}: {exc}")
                exc.resumable = True  # nothing says a rerun would fail again
            if isinstance(exc, TargetWriteError):
                _name_target(exc, target_name, self.rx.targets.get(target_name) if self.hello else None)
            error = exc
            if isinstance(exc, TargetBusyError):  # a crowd at a busy target says it once in a while
                self.rx.warnings.warning("busy", "%s: target %s: %s", self.peer, target_name, exc)
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
        finally:
            if self._reader_stop is not None:
                self._reader_stop.set()  # a reader still waiting to hand over a frame gives up
            try:
                self._close_replica()
            except Exception:  # noqa: BLE001 - the target is released whatever closing it did
                log.exception("%s: target %s: closing it failed", self.peer, target_name)
            finally:
                if self.lock_fd is not None:
                    self.rx._release(target_name, self.lock_fd)
                if self._netcheck:
                    self.rx._release_netcheck()
        if self.hello is not None and self.hello.kind != "status":  # a question, not a session
            if error is not None:
                error = _detached(error)
            self.outcome = SessionOutcome(target_name, self.peer, clean and error is None, error, self.rounds, self.written)
        # the reason it was ended was raised in its loop: its traceback holds that loop's frame and
        # so this session; the frames queue may hold it too. Let go of both, or only a full gc
        # frees the session's buffers
        if self._ended is not None:
            _detached(self._ended)
        self._frames = None

    def _ended_error(self) -> ReplicationError:
        """The reason the session was ended, with where a cut block round stands now that its
        data is durable (the sender resumes there)."""
        why = self._ended
        rec = self.replica.record if self.replica is not None else None
        if rec is None or not rec.active:
            return why
        try:
            offset = self.replica.checkpoint()
        except ReplicationError:
            return why  # _close_replica says so
        return type(why)(f"{why.message} (round {rec.round_id} of target {self.hello.target!r} "
                         f"checkpointed at {offset} of {rec.source_size} bytes)")

    def _close_replica(self) -> None:
        if self.replica is None:
            return
        rec = self.replica.record
        try:
            offset = self.replica.checkpoint()  # keep what arrived intact before the cut
            if rec is not None and rec.active:
                (log.warning if self._ended is not None else log.info)(
                    "%s: target %s: round %d checkpointed at %d of %d bytes", self.peer, self.hello.target,
                    rec.round_id, offset, rec.source_size)
        except ReplicationError as exc:
            log.warning("%s: final checkpoint failed: %s", self.peer, exc)
        try:
            self.replica.close()
        finally:
            self.replica.target.close()

    def _loop(self) -> bool:
        replica = self.replica
        assert replica is not None and self.hello is not None
        frames = self._start_reader(3)
        last_ckpt = time.monotonic()
        in_round: F.RoundBegin | None = None
        try:
            while True:
                ev = frames.get()
                if self._ended is not None:
                    raise self._ended
                if isinstance(ev, BaseException):
                    raise ev
                if isinstance(ev, F.BlockData):
                    replica.apply_data(ev.offset, ev.raw_len, ev.codec, ev.digests, ev.payload,
                                       zeros=ev.zeros, check=ev.check)
                    faults.point("receiver.data")
                elif isinstance(ev, F.BlockSet):
                    replica.apply_set(ev.offset, ev.index, ev.codec, ev.digests, ev.payload)
                    faults.point("receiver.data")
                    faults.point("receiver.set")  # a map-driven sync round's scattered blocks
                elif isinstance(ev, F.ZeroRange):
                    replica.apply_zero(ev.offset, ev.length)
                elif isinstance(ev, F.Scanned):
                    replica.scanned(ev.offset)
                elif isinstance(ev, F.RoundBegin):
                    replica.begin(self.session_id, self.hello.source_size, ev.round_id, ev.kind, ev.start)
                    in_round = ev
                    last_ckpt = time.monotonic()
                elif isinstance(ev, F.RoundEnd):
                    root = replica.finish(ev.round_id)
                    self.written += replica.bytes_written
                    self.rounds += 1
                    in_round = None
                    faults.point("receiver.round_done")  # durable and recorded, not yet confirmed
                    self.chan.send(F.RoundDone(ev.round_id, root))
                    rounds_log.info("%s: round %d done, %d bytes written; stage seconds: %s", self.hello.target,
                                    ev.round_id, replica.bytes_written, replica.clock.line(),
                                    extra={"target": self.hello.target, "peer": self.peer, "round_id": ev.round_id,
                                           "bytes_written": replica.bytes_written})
                elif isinstance(ev, F.ManifestRequest):
                    self._answer_manifest(ev)
                elif isinstance(ev, _CONTROL):
                    if self._control(ev, " mid-round" if in_round else ""):
                        return True
                if in_round is not None and time.monotonic() - last_ckpt >= self.rx.checkpoint_seconds:
                    offset = replica.checkpoint()
                    self.chan.send(F.Checkpoint(in_round.round_id, offset, replica.bytes_written))
                    last_ckpt = time.monotonic()
        finally:
            self.written += replica.bytes_written if in_round is not None else 0

    def _open_file_session(self, ev: F.Hello) -> None:
        """Claim a directory target and welcome the sender, saying whether a round completed before."""
        if ev.target not in self.rx.targets:
            raise target_checks.unknown(ev.target, self.rx.targets)
        root = self.rx.targets[ev.target]
        target_checks.check_kind(ev.target, root, "files")
        if os.path.lexists(root) and not os.path.isdir(root):
            raise TargetKindError(f"target {ev.target!r} ({root}) is not a directory: file sessions need one")
        if not self.rx.create and not os.path.lexists(root):
            raise target_checks.missing(ev.target, root)
        self.lock_fd = self.rx._claim(ev.target, self)
        self._dry = F.DRY_RUN in ev.capabilities  # a dry run: list, change nothing
        try:
            if not self._dry:
                os.mkdir(root, 0o755)
        except FileExistsError:
            pass
        except OSError as exc:
            raise TargetWriteError(f"target {ev.target!r}: cannot create {root!r}: {exc.strerror}") from None
        self._described = False  # describe_tree removes what a killed round left
        self._files_state = os.path.join(self.rx.state_dir, f"{ev.target}.files.json")
        rec = _read_record(self._files_state)
        last = int(rec.get("round_id", 0))
        caps = [c for c in CAPABILITIES if kernels.TREE or c != "tree-subset"]  # listed by directory scans
        self.chan.send(F.Welcome(PROTOCOL_VERSION, ev.session_id, 0, "synced" if rec.get("complete") else "new",
                                 last, "files", 0, "", capabilities=caps))
        log.info("%s: file session %s for target %s (%s)", self.peer, ev.session_id, ev.target, root)

    def _files_loop(self) -> bool:
        root = self.rx.targets[self.hello.target]
        applier: OpApplier | None = None
        round_id = 0
        # the next frame is read and decrypted while this one's files are written
        frames = self._start_reader(2)
        try:
            while True:
                ev = frames.get()
                if self._ended is not None:
                    raise self._ended
                if isinstance(ev, BaseException):
                    raise ev
                if isinstance(ev, F.TreeRequest) and applier is None:
                    with self._keeping_alive():
                        for frame in describe_tree(root, checksum=ev.checksum, keep_temporaries=self._dry,
                                                   stream="tree-stream" in self.hello.capabilities):
                            self.chan.send(frame)
                    self._described = True
                elif isinstance(ev, F.TreeSubset) and applier is None and kernels.TREE:
                    # temporaries a killed round left are removed by the listing of a whole-tree
                    # round, and a failed round is always followed by one (files.journal)
                    for frame in describe_tree(root, dirs=ev.dirs, keep_temporaries=self._dry,
                                               stream="tree-stream" in self.hello.capabilities):
                        self.chan.send(frame)
                    self._described = True
                elif isinstance(ev, F.RoundBegin) and self._dry:
                    raise RemoteProtocolError("a dry run may not begin a round")
                elif isinstance(ev, F.RoundBegin) and applier is None:
                    if not self._described:  # a sender that did not ask for the tree first
                        remove_temporaries(root)
                        self._described = True
                    rec = _read_record(self._files_state)
                    write_json_atomic(self._files_state, {**rec, "round_id": ev.round_id, "complete": rec.get(
                        "complete", False) and ev.kind == "sync"})
                    applier, round_id = OpApplier(TreeWriter(root)), ev.round_id
                elif isinstance(ev, F.FileOps) and applier is not None:
                    applier.apply(ev)
                elif isinstance(ev, F.SigRequest) and applier is not None:
                    for frame in signature_frames(applier.w, ev):
                        self.chan.send(frame)
                elif isinstance(ev, F.RoundEnd) and applier is not None and ev.round_id == round_id:
                    with self._keeping_alive():  # syncfs waits for every writer of the file system
                        applier.w.finish()
                    applier.w.close()
                    self.written += applier.bytes
                    applier = None
                    write_json_atomic(self._files_state, {"round_id": round_id, "complete": True})
                    self.rounds += 1
                    self.chan.send(F.RoundDone(round_id, ""))
                elif isinstance(ev, _CONTROL):
                    if self._control(ev, " mid-round" if applier else ""):
                        return True
                else:
                    raise RemoteProtocolError(f"{type(ev).__name__} out of place in a file session")
        except OSError as exc:  # listing, signatures, temporaries: the sender hears SMS.2007
            where = f" {os.fsdecode(exc.filename)!r}" if exc.filename else ""
            raise TargetWriteError(f"target {self.hello.target!r} ({root}):{where} {exc.strerror or exc}") from None
        finally:
            if applier is not None:
                applier.close()
                try:  # files received whole and checked keep their names, even in a cut round
                    applier.w.flush_pending()
                except (ReplicationError, OSError) as exc:
                    log.warning("%s: files of the cut round not kept: %s", self.peer, exc)
                applier.w.close()

    def _open_block_session(self, ev: F.Hello, *, verify: bool = False) -> bool:
        """Claim the target (self.lock_fd), open it and its replica, and welcome the sender.

        ``verify``: a consistency check by any sender of the source certificate, whatever its
        session: the target is opened read-only in effect (no round may begin), and one that
        does not exist is described as new without being created. False when there is none."""
        if ev.kind not in ("block", "verify"):
            raise RefusedError(f"session kind {ev.kind!r} is not supported by this receiver")
        if ev.target not in self.rx.targets:
            raise target_checks.unknown(ev.target, self.rx.targets)
        if ev.block_size != F.FINE_BLOCK:
            raise RefusedError(f"block size {ev.block_size} unsupported (need {F.FINE_BLOCK})")
        self.lock_fd = self.rx._claim(ev.target, self)
        path = self.rx.targets[ev.target]
        target_checks.check_kind(ev.target, path, ev.kind)
        if not (verify or self.rx.create or os.path.exists(path)):
            raise target_checks.missing(ev.target, path)
        if verify and not os.path.exists(path):
            self.chan.send(F.Welcome(PROTOCOL_VERSION, ev.session_id, 0, "new", 0, "full", 0, "",
                                     capabilities=list(CAPABILITIES)))
            return False
        # exclusive: a mounted or claimed device is refused, and stays claimed while the session writes
        target = BlockTarget(path, need_size=None if verify else ev.source_size, create=self.rx.create and not verify,
                             direct=not verify, name=ev.target, exclusive=not verify)
        try:
            self.replica = Replica(target, os.path.join(self.rx.state_dir, ev.target))
        except BaseException:
            target.close()
            raise
        self.session_id = ev.session_id
        if F.ADOPT_SESSION in ev.capabilities and (not verify or F.DRY_RUN in ev.capabilities):
            self._adopt(ev)  # a dry run is told what its round would be told (nothing is kept)
        # a dry run (a check that says what a round of this session would send) is described
        # as the session's round would be
        desc = self.replica.describe(self.session_id, ev.source_size,
                                     any_session=verify and F.DRY_RUN not in ev.capabilities)
        self.chan.send(F.Welcome(PROTOCOL_VERSION, self.session_id, target.size, capabilities=list(CAPABILITIES), **desc))
        faults.point("receiver.welcome")
        log.info("%s: %s %s for target %s (%s)", self.peer, "consistency check" if verify else "session",
                 self.session_id, ev.target, desc["state"])
        return True

    def _adopt(self, ev: F.Hello) -> None:
        """A sender without a completed round of its own (its state lost, or another host's)
        takes this target's session over where the manifest allows (Replica.why_not_reconcilable):
        its next round is a sync round against what the target holds, not a full copy."""
        rec = self.replica.record
        if rec is None or rec.session_id == ev.session_id:
            return  # nothing to take over, or its own session: a resume as usual
        why = self.replica.why_not_reconcilable(ev.source_size)
        if why:
            log.warning("%s: target %s: a sender without local state cannot reconcile with this target (%s); "
                        "it copies the whole source", self.peer, ev.target, why)
            return
        log.info("%s: target %s: session %s, without local state, takes over session %s and reconciles "
                 "with its manifest", self.peer, ev.target, ev.session_id, rec.session_id)
        self.session_id = rec.session_id

    def _verify_loop(self) -> bool:
        """Answer manifest requests until the sender closes; no data, no round."""
        while True:
            ev = self.chan.recv()
            if isinstance(ev, F.ManifestRequest):
                self._answer_manifest(ev)
            elif isinstance(ev, _CONTROL):
                if self._control(ev, ""):
                    return True
            else:
                raise RemoteProtocolError(f"{type(ev).__name__} in a consistency check session")

    def _status(self) -> bool:
        """Welcome, one STATUS frame (the receiver's targets and running sessions), then CLOSE."""
        self.chan.send(F.Welcome(PROTOCOL_VERSION, self.hello.session_id, 0, "new", 0, "full", 0, "",
                                 capabilities=list(CAPABILITIES)))
        self.chan.send(F.Status(*self.rx.status()))
        log.info("%s: status request", self.peer)
        ev = self.chan.recv()
        if not isinstance(ev, _CONTROL):
            raise RemoteProtocolError(f"{type(ev).__name__} after a status report")
        return self._control(ev, " after a status report")

    def _netcheck_loop(self) -> bool:
        """Answer every PING (padded ones are the bulk transfer) until the sender closes."""
        while True:
            ev = self.chan.recv()
            if not isinstance(ev, _CONTROL):
                raise RemoteProtocolError(f"{type(ev).__name__} during a network check")
            if self._control(ev, " during a network check"):
                return True

    @contextlib.contextmanager
    def _keeping_alive(self):
        """While the body runs, a PONG to the sender every KEEPALIVE seconds it sent nothing
        else, so that a long wait for the disk is not taken for a dead peer."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(KEEPALIVE):
                if time.monotonic() - self.chan.sent_at >= KEEPALIVE:
                    try:
                        self.chan.send(F.Pong(0, time.monotonic_ns(), 0))
                    except (ReplicationError, OSError):
                        return

        thread = threading.Thread(target=beat, name="keepalive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def _control(self, ev, during: str) -> bool:
        """PING, CLOSE, ERROR and the end of the stream, alike in every session; True once closed."""
        if isinstance(ev, F.Ping):
            self.chan.send(F.Pong(ev.nonce, ev.clock_ns, 0))
            return False
        if isinstance(ev, F.Close):
            self.chan.send(F.Close("bye"))
            return True
        if isinstance(ev, F.Error):
            raise TransportError(f"sender aborted: {ev.code} {ev.message}".strip())
        raise TransportError(f"connection closed by the sender{during}")

    def _drain(self, seconds: float = 2.0) -> None:
        """After an ERROR frame: read and drop what the sender still sends until it hangs up.

        Closing with unread data would reset the connection, and the sender
        could lose the ERROR frame that says why.
        """
        if self.rx._stopping.is_set():
            seconds = min(seconds, STOP_DRAIN)
        deadline = time.monotonic() + seconds
        frames = self._frames
        while time.monotonic() < deadline:
            if frames is None:
                try:
                    ev = self.chan.recv()
                except ReplicationError:
                    return
            else:
                try:
                    ev = frames.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    return
            if isinstance(ev, (BaseException, ConnectionClosed)):
                return

    def _start_reader(self, depth: int) -> queue.Queue:
        """Frames read (and decrypted) by a thread of their own, up to ``depth`` ahead of the
        loop that applies them."""
        frames: queue.Queue = queue.Queue(maxsize=depth)
        self._frames = frames
        self._reader_stop = threading.Event()
        threading.Thread(target=self._read_into, args=(frames, self._reader_stop), daemon=True,
                         name="smsrepl-rx-reader").start()
        return frames

    def _read_into(self, frames: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():  # the loop may be gone (an error): never block forever
                try:
                    frames.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            while True:
                t0 = time.perf_counter()
                ev = self.chan.recv()
                if self.replica is not None:
                    self.replica.clock.add("receive", time.perf_counter() - t0)
                if not put(ev) or isinstance(ev, (ConnectionClosed, F.Close, F.Error)):
                    return
        except BaseException as exc:  # handed to the applying thread
            put(exc)

    def _answer_manifest(self, req: F.ManifestRequest) -> None:
        man = self.replica.manifest if self.replica else None
        if man is None:
            raise RemoteProtocolError("manifest requested but this target has none")
        total = man.ngroups if req.level == "coarse" else man.nblocks
        if req.level not in ("coarse", "fine") or req.count > MAX_MANIFEST_ENTRIES or req.first + req.count > total:
            raise RemoteProtocolError(f"manifest request {req.level} {req.first}+{req.count} is out of range")
        if req.level == "coarse":
            entries = man.coarse[req.first:req.first + req.count]
        else:
            entries = man.read_fine(req.first, req.count, verify=req.first % GROUP_BLOCKS == 0)
        self.chan.send(F.ManifestData(req.level, req.first, entries))
