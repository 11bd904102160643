"""Opening a sender's connection: addresses, target names, and the TLS connection to a
receiver with its role checked. Kept apart from the block sender so that a file session or
a network check does not import the block machinery."""
from __future__ import annotations

import re
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import Future

from smsrepl.errors import ConfigError, ConnectError, ReplicationError
from smsrepl.transport.streams_auto import StreamCount, initial_streams
from smsrepl.transport.tls import check_peer_role
from smsrepl.transport.tls_errors import classify_ssl_error
from smsrepl.transport.tlsio import TLSStream

DEFAULT_PORT = 8900
CONNECT_TIMEOUT = 10.0
IO_TIMEOUT = 300.0
TARGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_target_name(name: str) -> str:
    if not TARGET_NAME.match(name) or name in (".", ".."):
        raise ConfigError(f"target name {name!r} is invalid: use letters, digits, '.', '_' and '-' only")
    return name


#: what ``receive --listen PORT`` listens on: every address, IPv6 and IPv4 (a dual-stack socket;
#: the receiver falls back to 0.0.0.0 where the kernel has no IPv6)
ANY_ADDRESS = "::"


def parse_address(text: str, default_port: int = DEFAULT_PORT, *, listen: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for an IPv6 address) as (host, port). A sender's HOST alone
    means the default port; a bare PORT is refused for a sender (it would be taken as a host) and
    means every address for a listener."""
    if text.isdigit():
        if not listen:
            raise ConfigError(f"address {text!r} is a port only: expected HOST:PORT (e.g. 192.0.2.10:{text})")
        text = f"[{ANY_ADDRESS}]:{text}"
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    host = host.strip("[]")
    try:
        p = int(port)
        if not (0 if listen else 1) <= p < 65536:
            raise ValueError
    except ValueError:
        lowest = 0 if listen else 1
        raise ConfigError(f"address {text!r}: port must be a number from {lowest} to 65535") from None
    if not host:
        raise ConfigError(f"address {text!r} has no host")
    return host, p


#: a peer that vanished without a word (power off, a cut link) is found within about
#: KEEPIDLE + KEEPINTVL * KEEPCNT seconds while idle, and within USER_TIMEOUT while data waits
KEEPIDLE, KEEPINTVL, KEEPCNT = 10, 5, 3
USER_TIMEOUT_MS = 30_000


def tune_socket(raw: socket.socket) -> None:
    """TCP options of every data connection, on both ends: no Nagle delay, and dead peers found in
    seconds instead of the kernel's two hours (keepalive) or fifteen minutes (retransmissions)."""
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", KEEPIDLE), ("TCP_KEEPINTVL", KEEPINTVL), ("TCP_KEEPCNT", KEEPCNT),
                       ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS)):
        if hasattr(socket, opt):  # Linux has them all
            try:
                raw.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
            except OSError:
                pass


class Gate:
    """Where a session's extra connections begun early wait between their TCP connection and
    their TLS handshake: one whose ClientHello went counts at the receiver's door among the
    connections that have not said HELLO, and a door full of those keeps newcomers waiting,
    then evicts the oldest, which was the session's own before its HELLO (a connection that
    has said nothing waits at the door without counting). Opened once the session's HELLO went: their handshakes then run
    beside its WELCOME and the answer to STREAMS, no later; shut where they are not needed."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._shut = False

    def open(self) -> None:
        self._event.set()

    def shut(self) -> None:
        self._shut = True
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """True once opened; False once shut, or after ``timeout`` seconds."""
        return self._event.wait(timeout) and not self._shut


def connect(address: tuple[str, int], context: ssl.SSLContext, *, timeout: float = CONNECT_TIMEOUT,
            on_tcp: Callable[[socket.socket], None] | None = None, gate: Gate | None = None) -> TLSStream:
    """The TLS connection to the receiver at ``address``, its role checked. ``on_tcp(raw)`` is
    called once the TCP connection is made, before the TLS handshake (its SYN measured the round
    trip already: SenderBase plans its extra connections by it); with ``gate`` the handshake
    waits for it to open (Gate)."""
    host, port = address
    try:
        # an ASCII name as bytes (getaddrinfo takes them; typeshed says str only): given a str,
        # socket loads the IDNA codec (4 ms of a sender's start)
        name = host.encode() if host.isascii() else host
        raw = socket.create_connection((name, port), timeout=timeout)  # type: ignore[arg-type]
    except UnicodeError as exc:  # a name IDNA cannot encode
        raise ConnectError(f"cannot reach the target at {host}:{port}: the host name is not valid ({exc})") from None
    except OSError as exc:
        raise ConnectError(f"cannot reach the target at {host}:{port} (is a receiver listening on port {port}?): {exc.strerror or exc}") from None
    tune_socket(raw)
    if on_tcp is not None:
        try:
            on_tcp(raw)
        except BaseException:
            raw.close()
            raise
    if gate is not None and not gate.wait(timeout):
        raw.close()
        raise ConnectError("an extra connection begun early was not needed, or the session's HELLO did not go "
                           f"within {timeout:g} s")
    try:
        sock = TLSStream(raw, context, server_side=False)
        sock.handshake()
        check_peer_role(sock.obj, "target-data")
    except ReplicationError:
        raw.close()
        raise
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        raise classify_ssl_error(exc, server_side=False) from None
    sock.settimeout(IO_TIMEOUT)
    return sock


def _on_thread(fut: Future, call: Callable[[], TLSStream], name: str) -> None:
    """``fut`` given what ``call()`` returns or raises, on a daemon thread of its own: a
    connection nobody takes never holds the exit."""
    def run() -> None:
        try:
            fut.set_result(call())
        except BaseException as exc:  # whoever takes it raises it, as connect() would have
            fut.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()


def begin_connects(address: tuple[str, int], context: ssl.SSLContext, count: int,
                   gate: Gate | None = None) -> list[Future]:
    """``count`` connect()s begun at once, their TLS handshakes waiting for ``gate``."""
    futures: list[Future] = [Future() for _ in range(max(0, count))]
    for fut in futures:
        _on_thread(fut, lambda: connect(address, context, gate=gate), "smsrepl-stream-connect")
    return futures


class Ahead(Future):
    """connect_ahead()'s connection: the TLS connection, once made; ``tcp`` the TCP socket as
    soon as it is connected, before its TLS handshake; and the session's extra connections
    (parallel streams), begun then for ``streams``: ``planned`` in all, ``early`` the extra ones."""

    def __init__(self, streams: StreamCount = 1) -> None:
        super().__init__()
        self.tcp: Future = Future()
        self.streams = streams
        self.planned = 1
        self.early: list[Future] = []
        #: what the extra connections' TLS handshakes wait for (the session's HELLO)
        self.gate = Gate()
        self.add_done_callback(self._tcp_failed_too)

    def _tcp_failed_too(self, fut: Future) -> None:
        """A connection that failed before its TCP one was made failed that too."""
        if fut.exception() is not None and not self.tcp.done():
            self.tcp.set_exception(fut.exception())

    def drop_extra(self) -> None:
        """The extra connections are not taken: closed once made."""
        self.gate.shut()
        self.tcp.add_done_callback(lambda _: close_all(self.early))  # (begun before tcp is set)

    def drop(self) -> None:
        """Nobody takes it: its connection and its extra ones closed, once made."""
        self.add_done_callback(close_connected)
        self.drop_extra()


def connect_ahead(address: tuple[str, int], context: ssl.SSLContext, streams: StreamCount = 1) -> Ahead:
    """connect() begun now on a thread of its own, for a sender to take (SenderBase.take_connection):
    its TCP and TLS handshakes (two round trips) run while the command imports the rest of
    itself (0.1 s of CPU), and with ``streams`` other than 1 the extra connections are begun as
    soon as its TCP connection gives the round trip."""
    fut = Ahead(streams)

    def on_tcp(raw: socket.socket) -> None:
        if streams != 1:
            fut.planned = initial_streams(streams, raw)
            fut.early = begin_connects(address, context, fut.planned - 1, fut.gate)
        fut.tcp.set_result(raw)

    _on_thread(fut, lambda: connect(address, context, on_tcp=on_tcp), "smsrepl-connect-ahead")
    return fut


def close_all(connects: list[Future]) -> None:
    """The connections ``connects`` make, closed once made."""
    for fut in connects:
        fut.add_done_callback(close_connected)


def close_connected(fut: Future) -> None:
    """A done callback: the connection ``fut`` made, closed (a failed one made none)."""
    if not fut.cancelled() and fut.exception() is None:
        fut.result().close()
