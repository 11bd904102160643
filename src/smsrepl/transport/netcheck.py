"""Network check (5.9.1): latency, jitter, bandwidth and loss over the real TLS channel.

A netcheck session is a HELLO of kind "netcheck" to a receiver, then:

1. ``pings`` PING frames one after another, each answered by a PONG: the
   round trips give ``network_delay`` (mean, ms) and ``network_jitter``
   (mean difference between consecutive round trips, ms, as RFC 3550 does).
2. A timed bulk transfer: PING frames padded to ``bulk`` bytes for
   ``seconds``; the clock stops when the PONG of the last one is back, so
   every byte has reached the receiver. ``migration_speed`` is payload bits
   per second (Mbit/s, capped at the API's 10000).
3. ``loss_percentage``: TCP segments the kernel had to retransmit during the
   check, per segment sent (TCP_INFO of the connection); 0 where the
   platform does not say.
4. With ``streams`` more than one (or "auto" on a link whose round trip asks for more, see
   streams_auto.py), the bulk transfer again over that many connections at once (extra
   netcheck sessions beside this one): ``streams_speed_mbit``. ``migration_speed`` is then
   the better of the two: what a session with --streams auto would get.
5. ``cpu_usage`` and ``mem_usage``: this host's CPU use during the check and
   memory in use, percent (psutil).

``evaluation_result`` grades the link (6-8 characters, thresholds in GRADES):
the first grade whose limits all hold.
"""
from __future__ import annotations

import socket
import ssl
import statistics
import struct
import threading
import time
import uuid
from dataclasses import dataclass

from smsrepl.errors import RemoteProtocolError, TransportError
from smsrepl.protocol import CAPABILITIES, PROTOCOL_VERSION, SENDER, Connection, ConnectionClosed
from smsrepl.protocol import frames as F
from smsrepl.transport.streams_auto import StreamCount, auto_count

#: grade: (max delay ms, max jitter ms, max loss %, min bandwidth Mbit/s); checked in order
GRADES: tuple[tuple[str, float, float, float, float], ...] = (
    ("OPTIMAL", 50.0, 10.0, 0.1, 100.0),
    ("NORMAL", 200.0, 50.0, 1.0, 10.0),
    ("DEGRADED", 1000.0, 200.0, 5.0, 1.0),
)
#: what a link that misses every grade above gets
UNUSABLE = "UNUSABLE"
MAX_SPEED = 10000.0  # the API's ceiling for migration_speed (Mbit/s)

# struct tcp_info (linux/tcp.h): tcpi_total_retrans (u32) and tcpi_segs_out (u32)
_TCPI_TOTAL_RETRANS = 100
_TCPI_SEGS_OUT = 136


def grade(delay_ms: float, jitter_ms: float, loss_pct: float, speed_mbit: float) -> str:
    for name, max_delay, max_jitter, max_loss, min_speed in GRADES:
        if delay_ms <= max_delay and jitter_ms <= max_jitter and loss_pct <= max_loss and speed_mbit >= min_speed:
            return name
    return UNUSABLE


@dataclass(frozen=True, slots=True)
class NetcheckResult:
    delay_ms: float
    jitter_ms: float
    speed_mbit: float
    loss_pct: float
    cpu_pct: float
    mem_pct: float
    rtts_ms: tuple[float, ...]
    bulk_bytes: int
    bulk_seconds: float
    #: connections of the second bulk transfer (1: none was run) and what they moved together
    streams: int = 1
    streams_speed_mbit: float = 0.0

    @property
    def best_speed_mbit(self) -> float:
        return max(self.speed_mbit, self.streams_speed_mbit)

    @property
    def evaluation(self) -> str:
        return grade(self.delay_ms, self.jitter_ms, self.loss_pct, self.best_speed_mbit)

    def body(self) -> dict:
        """The 5.9.1 request body."""
        return {
            "destination_connectivity": True,
            "network_delay": round(self.delay_ms, 2),
            "network_jitter": round(self.jitter_ms, 2),
            "migration_speed": round(min(self.best_speed_mbit, MAX_SPEED), 2),
            "loss_percentage": round(self.loss_pct, 2),
            "cpu_usage": round(self.cpu_pct, 2),
            "mem_usage": round(self.mem_pct, 2),
            "evaluation_result": self.evaluation,
        }


def _tcp_counters(sock) -> tuple[int, int] | None:
    raw = getattr(sock, "raw", sock)
    try:
        info = raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 192)
    except (OSError, AttributeError):
        return None
    if len(info) < _TCPI_SEGS_OUT + 4:
        return None
    return struct.unpack_from("=I", info, _TCPI_TOTAL_RETRANS)[0], struct.unpack_from("=I", info, _TCPI_SEGS_OUT)[0]


def _open_check(address: tuple[str, int], context: ssl.SSLContext):
    """A netcheck session's connection, welcomed."""
    from smsrepl.transport.channel import Channel
    from smsrepl.transport.connect import connect

    chan = Channel(connect(address, context), Connection(SENDER))
    try:
        chan.send(F.Hello([PROTOCOL_VERSION], "netcheck", "", uuid.uuid4().hex, 0, F.FINE_BLOCK, list(CAPABILITIES)))
        welcome = chan.recv()
        if isinstance(welcome, F.Error):
            raise TransportError(f"receiver refused the network check: {welcome.message}")
        if not isinstance(welcome, F.Welcome):
            raise RemoteProtocolError(f"expected WELCOME, got {type(welcome).__name__}")
    except BaseException:
        chan.close()
        raise
    return chan


def run_netcheck(address: tuple[str, int], context: ssl.SSLContext, *, seconds: float = 3.0, pings: int = 20,
                 bulk: int = 1 << 20, ping_gap: float = 0.02, streams: StreamCount = 1) -> NetcheckResult:
    """Measure the link to the receiver at ``address`` (the same TLS and port as a transfer)."""
    import psutil

    if not 0 < bulk <= F.MAX_BODY - 64:
        raise ValueError(f"bulk frame size must be 1..{F.MAX_BODY - 64} bytes")
    psutil.cpu_percent(None)
    chan = _open_check(address, context)
    many, many_speed = 1, 0.0
    try:
        rtts = []
        for nonce in range(pings):
            t0 = time.perf_counter_ns()
            chan.send(F.Ping(nonce, t0))
            _expect_pong(chan.recv(), nonce)
            rtts.append((time.perf_counter_ns() - t0) / 1e6)
            time.sleep(ping_gap)
        counters0 = _tcp_counters(chan.sock)
        sent_bytes, bulk_seconds = _bulk(chan, seconds, bulk, first_nonce=pings)
        counters1 = _tcp_counters(chan.sock)
        many = streams if isinstance(streams, int) else auto_count(statistics.fmean(rtts) if rtts else None)
        if many > 1:
            many_speed = _bulk_over(chan, address, context, many, seconds, bulk, first_nonce=pings + (1 << 40))
        chan.goodbye(F.Close("netcheck done"))
    finally:
        chan.close()
    loss = 0.0
    if counters0 and counters1 and counters1[1] > counters0[1]:
        loss = 100.0 * (counters1[0] - counters0[0]) / (counters1[1] - counters0[1])
    jitter = statistics.fmean(abs(b - a) for a, b in zip(rtts, rtts[1:])) if len(rtts) > 1 else 0.0
    return NetcheckResult(
        delay_ms=statistics.fmean(rtts) if rtts else 0.0,
        jitter_ms=jitter,
        speed_mbit=sent_bytes * 8 / bulk_seconds / 1e6 if bulk_seconds > 0 else 0.0,
        loss_pct=max(0.0, loss),
        cpu_pct=psutil.cpu_percent(None),
        mem_pct=psutil.virtual_memory().percent,
        rtts_ms=tuple(rtts),
        bulk_bytes=sent_bytes,
        bulk_seconds=bulk_seconds,
        streams=many,
        streams_speed_mbit=many_speed,
    )


def _bulk_over(chan, address: tuple[str, int], context: ssl.SSLContext, count: int, seconds: float, bulk: int, *,
               first_nonce: int) -> float:
    """The bulk transfer over ``chan`` and ``count - 1`` more connections at once: Mbit/s of all."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(count) as pool:
        extra = list(pool.map(lambda _: _open_check(address, context), range(count - 1)))
        try:
            t0 = time.perf_counter()
            runs = list(pool.map(lambda c: _bulk(c, seconds, bulk, first_nonce=first_nonce), [chan, *extra]))
            elapsed = time.perf_counter() - t0
        finally:
            for one in extra:
                try:
                    one.goodbye(F.Close("netcheck done"))
                finally:
                    one.close()
    return sum(sent for sent, _ in runs) * 8 / elapsed / 1e6 if elapsed > 0 else 0.0


def _expect_pong(ev, nonce: int) -> None:
    if isinstance(ev, F.Error):
        raise TransportError(f"receiver: {ev.message}")
    if isinstance(ev, ConnectionClosed):
        raise TransportError("the receiver closed the connection during the network check")
    if not isinstance(ev, F.Pong) or ev.nonce != nonce:
        raise RemoteProtocolError(f"expected PONG {nonce}, got {ev!r}")


def _bulk(chan, seconds: float, bulk: int, *, first_nonce: int) -> tuple[int, float]:
    """Send padded PINGs for ``seconds``; PONGs are read on a thread so neither side ever stalls."""
    last_sent = [-1]
    done = threading.Event()
    got: list = []

    def reader() -> None:
        try:
            while True:
                ev = chan.recv()
                if not isinstance(ev, F.Pong):
                    got.append(ev)
                    done.set()
                    return
                if stopped.is_set() and ev.nonce == last_sent[0]:
                    done.set()
                    return
        except BaseException as exc:  # handed to the sending thread
            got.append(exc)
            done.set()

    stopped = threading.Event()
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    sent = 0
    nonce = first_nonce
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds and not done.is_set():
        chan.send(F.Ping(nonce, time.monotonic_ns(), bulk))
        last_sent[0] = nonce
        nonce += 1
        sent += bulk
    last_sent[0] = nonce  # the reader stops at this one's PONG, which comes after every padded one's
    stopped.set()
    chan.send(F.Ping(nonce, time.monotonic_ns()))
    if not done.wait(60):
        raise TransportError("the receiver did not answer the network check in time")
    elapsed = time.perf_counter() - t0
    t.join(5)
    if got:
        if isinstance(got[0], BaseException):
            raise got[0]
        _expect_pong(got[0], nonce)
    return sent, elapsed
