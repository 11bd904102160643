"""What the receiver says during a block session, read on a thread of its own.

While the sender streams a round, the receiver answers: CHECKPOINT (what it made durable,
checked against what was sent: a receiver may not acknowledge data it never got), ROUND_DONE,
MANIFEST_DATA for a manifest request, PONG, CLOSE, or its ERROR. The first failure is kept
(the session's reason: the receiver's ERROR is preferred to the broken pipe it causes here)
and the connection broken, so that a writer blocked on a full socket fails at once.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from smsrepl._lazy import np
from smsrepl.errors import LocalProtocolError, RemoteError, RemoteProtocolError, ReplicationError, TransportError
from smsrepl.protocol import ConnectionClosed
from smsrepl.protocol import frames as F
from smsrepl.transport.channel import Channel
from smsrepl.transport.connect import IO_TIMEOUT
from smsrepl.transport.sender_base import raise_if_error


class Replies:
    def __init__(self) -> None:
        #: the round a CHECKPOINT may name, and the source offset sent so far (set by the sender)
        self.round_id = 0
        self.sent_to = 0
        self.acked = 0  # the highest offset the receiver made durable
        self.round_done: F.RoundDone | None = None
        self.done = threading.Event()  # ROUND_DONE arrived, or the session failed
        self.failure: BaseException | None = None
        self._answers: queue.Queue = queue.Queue()
        #: the receiver's answer to STREAMS goes here (SenderBase.streams_granted)
        self.on_streams: Callable[[F.Streams], None] | None = None
        #: called once, with the round's id, at its first CHECKPOINT: the receiver began it
        self.on_began: Callable[[int], None] | None = None

    def start(self, chan: Channel) -> None:
        threading.Thread(target=self._read, args=(chan,), daemon=True).start()

    def _read(self, chan: Channel) -> None:
        try:
            while True:
                ev = chan.recv()
                if isinstance(ev, F.Checkpoint):
                    if ev.round_id != self.round_id or ev.offset > self.sent_to:
                        raise RemoteProtocolError(
                            f"the receiver acknowledged offset {ev.offset} of round {ev.round_id}, but round "
                            f"{self.round_id} has sent only up to {self.sent_to}: it claims data it never got")
                    self.acked = max(self.acked, ev.offset)
                    if self.on_began is not None:
                        began, self.on_began = self.on_began, None
                        began(ev.round_id)
                elif isinstance(ev, F.RoundDone):
                    self.round_done = ev
                    self.done.set()
                elif isinstance(ev, F.Streams) and self.on_streams is not None:
                    self.on_streams(ev)
                elif isinstance(ev, (F.ManifestData, F.Pong, F.Close)):
                    self._answers.put(ev)
                    if isinstance(ev, F.Close):
                        return
                elif isinstance(ev, (F.Error, ConnectionClosed)):
                    raise_if_error(ev)
        except BaseException as exc:
            self.failure = exc
            self._answers.put(exc)
            self.done.set()
            # the session is over: a writer blocked on a full socket (a peer or middlebox that
            # stopped reading) must fail now, not at the socket timeout minutes later
            chan.abort()

    def request(self, chan: Channel, level: str, first: int, count: int) -> np.ndarray:
        """``count`` manifest digests of ``level`` from ``first``, asked of the receiver."""
        chan.send(F.ManifestRequest(level, first, count))
        ev = self._answers.get(timeout=IO_TIMEOUT)
        if isinstance(ev, BaseException):
            raise ev
        if not isinstance(ev, F.ManifestData) or ev.level != level or ev.first != first or len(ev.entries) != count:
            raise RemoteProtocolError("manifest answer does not match the request")
        return ev.entries

    def peer_reason(self, exc: ReplicationError, *, stopped: bool) -> ReplicationError:
        """The receiver's ERROR, where it sent one, rather than what the end of the connection did
        here: a send that failed because the reader, on that ERROR, shut the socket down (or
        because the receiver hung up after it) says only "broken pipe", and one made as the
        reader took the ERROR in, "cannot send ... in state error"."""
        if isinstance(exc, (TransportError, LocalProtocolError)) and not stopped:
            self.done.wait(2.0)  # the reader may still be taking the ERROR in
        failure = self.failure
        return failure if isinstance(failure, RemoteError) else exc

    def close(self, chan: Channel, *, sent: bool = False) -> None:
        """Send CLOSE (unless ``sent`` already) and wait for the receiver's."""
        try:
            if not sent:
                chan.send(F.Close("done"))
            ev = self._answers.get(timeout=30)
            if isinstance(ev, BaseException):
                raise ev
        except (ReplicationError, queue.Empty):
            pass  # the round is durable already; a lost goodbye changes nothing
