"""What the block sender and the file sender share: the connection, its opening, and stopping.

Both open a session the same way (connect over mutual TLS, send HELLO, read WELCOME or the
receiver's ERROR), run it under a speed schedule that can be replaced while it runs, and can
be stopped from another thread: the running round breaks at once, and what the receiver made
durable stays for the next run.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from smsrepl.errors import RemoteError, RemoteProtocolError, ReplicationError, TransportError
from smsrepl.protocol import PROTOCOL_VERSION, SENDER, Connection, ConnectionClosed
from smsrepl.protocol import frames as F
from smsrepl.throttle import CpuCap, ScheduledLimiter, SpeedSchedule
from smsrepl.transport.channel import Channel
from smsrepl.transport.connect import Ahead, Gate, begin_connects, check_target_name, close_all, connect
from smsrepl.transport.stripes import Stripes
from smsrepl.transport.tlsio import TLSStream
from smsrepl.transport.streams_auto import StreamCount, initial_streams

log = logging.getLogger("smsrepl.sender")


class SenderBase:
    def __init__(self, target: str, address: tuple[str, int], context: ssl.SSLContext, *,
                 speed_limit: SpeedSchedule | None, cpu_cap: CpuCap | None,
                 streams: StreamCount = 1) -> None:
        self.target = check_target_name(target)
        self.address = address
        self.context = context
        #: the running session's speed schedule; replace_schedule() changes it live
        self.limiter = ScheduledLimiter(speed_limit)
        self.cpu_cap = cpu_cap
        self.stop_requested = False
        self._stopped = threading.Event()  # ends a CPU cap's pacing (the cap may outlive this sender)
        self._chan: Channel | None = None
        #: connections a session runs over: a count, or "auto" (streams_auto.py)
        self.streams = streams
        #: the STREAMS the running session asked for, until the receiver answers (_spread)
        self._joining: tuple[Stripes, str, int, int] | None = None
        #: the extra connections' TCP and TLS handshakes, begun with the session's (_prejoin)
        self._early: list[Future] = []
        #: what their TLS handshakes wait for: the session's HELLO (connect.Gate)
        self._gate = Gate()
        #: the connections the running session runs over, once counted (_prejoin)
        self._planned: int | None = None
        #: a connection begun before this sender existed (take_connection), for its first session
        self._ahead: Ahead | None = None

    def stop(self) -> None:
        """Pause: break the running round from another thread. What the receiver made durable
        stays (blocks up to its checkpoint, files already renamed); the next run resumes."""
        self.stop_requested = True
        self._stopped.set()
        self.limiter.release()
        chan = self._chan
        if chan is not None:
            chan.abort()

    def replace_schedule(self, schedule: SpeedSchedule) -> None:
        """Change the speed schedule of the running session, effective at once."""
        self.limiter.replace_schedule(schedule)

    def take_connection(self, ahead: Ahead) -> None:
        """Open the first session over ``ahead`` (connect.connect_ahead), not a new connection;
        drop_connection() closes it if no session took it."""
        self._ahead = ahead

    def drop_connection(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.drop()

    def _open(self, kind: str, session_id: str, size: int, capabilities: list[str],
              *then: F.Event, prejoin: bool = False) -> Channel:
        """A connection to the receiver with HELLO sent, and the frames ``then`` after it (the
        protocol lets a TREE_REQUEST come before WELCOME). With ``prejoin`` (a session that
        may run over several connections) the extra ones are begun once its TCP connection
        is made (_prejoin)."""
        self._drop_early()
        self._planned = None
        try:
            sock = self._session_connection(prejoin)
        except BaseException:
            self._drop_early()
            raise
        if (self._planned or 1) > 1:  # asked in HELLO: one round trip sooner (F.STREAMS_HELLO)
            capabilities = capabilities + [f"{F.STREAMS_ASK}{self._planned}"]
        chan = Channel(sock, Connection(SENDER))
        try:
            chan.send(F.Hello([PROTOCOL_VERSION], kind, self.target, session_id, size, F.FINE_BLOCK, capabilities))
            for frame in then:
                chan.send(frame)
        except BaseException:
            chan.close()
            self._drop_early()
            raise
        self._gate.open()  # the extra connections' TLS handshakes, beside WELCOME (connect.Gate)
        return chan

    def _session_connection(self, prejoin: bool) -> TLSStream:
        """The session's connection: the one begun ahead (take_connection) with the extra ones
        it began, or a new one."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return connect(self.address, self.context, on_tcp=self._prejoin if prejoin else None)
        try:
            if ahead.tcp.exception() is None:
                if prejoin and ahead.streams == self.streams:  # begun ahead already
                    self._planned, self._early, self._gate = ahead.planned, ahead.early, ahead.gate
                else:
                    ahead.drop_extra()
                    if prejoin:
                        self._prejoin(ahead.tcp.result())
            return ahead.result()
        except BaseException:  # a stop's KeyboardInterrupt while it waited: closed once made
            ahead.drop()  # (extra connections begun after it too)
            raise

    def _prejoin(self, raw: socket.socket) -> None:
        """Begin the extra connections' handshakes as soon as the session's TCP connection
        (``raw``) is made, by the round trip its SYN measured: beside the session's own TLS
        handshake, HELLO and WELCOME (two round trips: the first frames go over them a round
        trip after the receiver's answer to STREAMS, not four); _spread uses them, or the
        session's end closes them."""
        self._drop_early()
        count = self._planned = initial_streams(self.streams, raw) if self.streams != 1 else 1
        self._gate = Gate()
        self._early = begin_connects(self.address, self.context, count - 1, self._gate)

    def _drop_early(self) -> None:
        """Close the extra connections begun early and not used."""
        early, self._early = self._early, []
        self._gate.shut()
        close_all(early)

    def _end_streams(self) -> None:
        """At a session's end: its stripes, its pending STREAMS question and its early
        connections go (the channel itself was closed)."""
        self._chan = self._joining = self._planned = None
        self._drop_early()

    def _spread(self, chan: Channel, session_id: str, size: int, peer_caps: frozenset) -> Channel:
        """The session's channel over as many connections as ``streams`` says, when more than
        one and the receiver can (it listed "streams"). STREAMS asks the receiver for them and
        every frame after it is numbered, at once: the Stripes returned runs over ``chan``
        alone until the answer, read by whoever reads ``chan``, comes to streams_granted(),
        which joins the extra connections on a thread of its own. Returns ``chan`` itself
        where one connection it is."""
        self._joining = None  # a question an earlier session asked, that ended before the answer
        count = self._planned or 1  # _prejoin counted them
        if count <= 1 or "streams" not in peer_caps:
            self._drop_early()
            return chan
        stripes = Stripes(chan, [])
        self._joining = (stripes, session_id, size, count)  # before the answer can come
        self._chan = stripes  # what the session closes at its end, whatever happens next
        if F.STREAMS_HELLO not in peer_caps:  # else HELLO asked, and the answer comes unasked
            chan.send(F.Streams(count, ""))  # unnumbered, before any frame of the stripes
        return stripes

    def streams_granted(self, ev: F.Streams) -> None:
        """The receiver's answer to the session's STREAMS: join the connections it granted."""
        pending, self._joining = self._joining, None
        if pending is None:
            raise RemoteProtocolError("STREAMS from the receiver, which this session did not ask for")
        stripes, session_id, size, asked = pending
        if ev.count > asked:
            raise RemoteProtocolError(f"the receiver granted {ev.count} connections, {asked} were asked for")
        early, self._early = self._early, []
        close_all(early[max(0, ev.count - 1):])  # more than granted
        if ev.count <= 1:
            log.info("the receiver runs session %s over one connection", session_id)
            return
        threading.Thread(target=self._join_all, args=(stripes, ev, session_id, size, early[:ev.count - 1]),
                         daemon=True, name="smsrepl-stream-join").start()

    def _join_all(self, stripes: Stripes, grant: F.Streams, session_id: str, size: int,
                  early: list[Future]) -> None:
        with ThreadPoolExecutor(grant.count - 1) as pool:
            joins = [pool.submit(self._join, i, grant.key, session_id, size, early[i - 1])
                     for i in range(1, grant.count)]
        for i, join in enumerate(joins, 1):
            try:
                stripes.add(join.result())
            except ReplicationError as exc:  # the session goes on over the others
                # one that ended first (a short round) needed none: nothing to warn of
                log.log(logging.INFO if stripes.ended else logging.WARNING,
                        "extra connection %d of session %s not joined: %s", i, session_id, exc)
        log.info("session %s runs over %d connections", session_id, stripes.streams)

    def _join(self, index: int, key: str, session_id: str, size: int, early: Future) -> Channel:
        """Extra connection ``index`` of session ``session_id``, joined over the connection
        _prejoin began."""
        chan = Channel(early.result(), Connection(SENDER))
        try:
            chan.send(F.Hello([PROTOCOL_VERSION], "stream", self.target, session_id, size, F.FINE_BLOCK, ["streams"]))
            chan.send(F.Streams(index, key))
            welcome(chan.recv())
            chan.conn.join_stream()
        except BaseException:
            chan.close()
            raise
        return chan


def raise_if_error(ev: object) -> None:
    """The receiver's ERROR frame, or the end of the connection, as the exception it means."""
    if isinstance(ev, F.Error):
        raise RemoteError(f"receiver: {ev.message}", code=ev.code or None, exit_code=ev.exit_code,
                          resumable=ev.resumable)
    if isinstance(ev, ConnectionClosed):
        raise TransportError("the receiver closed the connection")


def welcome(ev: object) -> F.Welcome:
    """``ev``, the receiver's answer to HELLO, as the WELCOME it must be."""
    raise_if_error(ev)
    if not isinstance(ev, F.Welcome):
        raise RemoteProtocolError(f"expected WELCOME, got {type(ev).__name__}")
    return ev
