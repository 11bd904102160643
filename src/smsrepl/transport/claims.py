"""Target claims: one session a target at a time, within this receiver and across receivers.

A session claims its target before it opens it: another session of this process holding it
is waited for a moment (it may be ending), then refused as busy, except that the same sender
coming back (the same session id) takes it over from its dying connection; a lock file in the
state directory keeps out another receiver process. Network checks claim a place of their own
pool instead of a target.
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Callable
from typing import Protocol

from smsrepl.errors import ReceiverStopping, ReplicationError, TakenOver, TargetBusyError
from smsrepl.protocol import frames as F
from smsrepl.transport.channel import Channel
from smsrepl.transport.limits import BUSY_WAIT, LET_GO_SECONDS, MAX_NETCHECKS

log = logging.getLogger("smsrepl.receiver")


class Holder(Protocol):
    """What a claim knows of the session holding a target."""

    hello: F.Hello | None
    peer: str
    chan: Channel
    started: float  # time.time(); with rounds, what a status report says of it
    rounds: int

    def end(self, why: ReplicationError) -> None: ...


class TargetClaims:
    def __init__(self, state_dir: str, stopping: threading.Event, stop_reason: Callable[[], str]) -> None:
        self.state_dir = state_dir
        self._stopping = stopping
        self._stop_reason = stop_reason
        self._busy: dict[str, Holder] = {}
        self._lock = threading.Condition()
        self._netchecks = 0

    def holders(self) -> dict[str, Holder]:
        """Target name -> the session holding it, now."""
        with self._lock:
            return dict(self._busy)

    def wake(self) -> None:
        """A session waiting for a busy target looks again (and gives up when the receiver stops)."""
        with self._lock:
            self._lock.notify_all()

    def claim(self, name: str, session: Holder) -> int:
        """Claim target ``name`` for ``session``; the lock file's descriptor, for release()."""
        with self._lock:
            holder = self._busy.get(name)
            if holder is not None and holder.hello is not None and session.hello is not None \
                    and holder.hello.session_id == session.hello.session_id:
                # the same sender came back: its old connection is dead or dying
                # (a cut the old session has not noticed yet); the newer one wins
                log.info("target %s: session %s reconnected from %s; dropping its old connection from %s", name,
                         session.hello.session_id, session.peer, holder.peer)
                holder.end(TakenOver(f"target {name!r} was taken over by another sender of the same session "
                                     f"({peer_name(session.chan, session.peer)}); this sender stops here"))
                if not self._lock.wait_for(lambda: name not in self._busy, timeout=LET_GO_SECONDS):
                    holder.chan.abort()  # its peer may be gone, a send to it blocked
                    self._lock.wait_for(lambda: name not in self._busy, timeout=10)
            if name in self._busy:
                # a session that is ending (its sender hung up, its target being closed) lets go
                # within moments: a sender arriving then is not turned away for it
                self._lock.wait_for(lambda: name not in self._busy or self._stopping.is_set(), timeout=BUSY_WAIT)
            if self._stopping.is_set():
                raise ReceiverStopping(f"the receiver is stopping ({self._stop_reason()}); retry later")
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

    def release(self, name: str, fd: int) -> None:
        with self._lock:
            self._busy.pop(name, None)
            os.close(fd)
            self._lock.notify_all()

    def claim_netcheck(self) -> None:
        with self._lock:
            if self._netchecks >= MAX_NETCHECKS:
                raise TargetBusyError(f"{self._netchecks} network checks are running (limit {MAX_NETCHECKS}); "
                                      f"retry in a few seconds")
            self._netchecks += 1

    def release_netcheck(self) -> None:
        with self._lock:
            self._netchecks -= 1


def peer_name(chan: Channel, peer: str) -> str:
    """``peer`` and the subject CN (or OU) of its certificate, where there is one."""
    try:
        cert = chan.sock.getpeercert() or {}
    except (AttributeError, ValueError):
        return peer
    names = {key: value for rdn in cert.get("subject", ()) for key, value in rdn}
    name = names.get("commonName") or names.get("organizationalUnitName")
    return f"{peer}, certificate {name!r}" if name else peer
