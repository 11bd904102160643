"""How many connections a session runs over: a count given, or "auto", from the measured link.

One TCP connection moves at most its window per round trip, and after a loss it grows back
slowly (cubic: seconds at 50 ms): on a long fat link it stays well below the link however
fast both ends are, while on a LAN or loopback it is not the bound and more connections only
cost threads. "auto" reads the least round trip the kernel measured on the session's connection
(TCP_INFO: its SYN's, before the TLS handshake) and opens more connections the longer it is; one to a
peer on this host.
"""
from __future__ import annotations

import socket
import struct

from smsrepl.errors import ConfigError

StreamCount = int | str
#: "auto" runs one connection below this round trip (a LAN, loopback) ...
AUTO_LAN_RTT_MS = 2.0
#: ... and above it one more per AUTO_STEP_MS of round trip, from AUTO_MIN, at most AUTO_MAX
AUTO_MIN = 2
AUTO_STEP_MS = 20.0
AUTO_MAX = 8
#: the most a user may ask for (the receiver grants at most its own limit, limits.MAX_STREAMS)
MAX_ASK = 16
#: struct tcp_info (linux/tcp.h), microseconds: tcpi_rtt (smoothed) at byte 68, tcpi_min_rtt at 148
_U32 = struct.Struct("=I")
_TCPI_RTT_AT = 68
_TCPI_MIN_RTT_AT = 148


def parse_streams(text: str) -> StreamCount:
    """``--streams N|auto`` as a count or "auto"; ConfigError naming the problem otherwise."""
    if text == "auto":
        return "auto"
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_ASK:
        raise ConfigError(f"--streams {text!r}: give a number of connections from 1 to {MAX_ASK}, or auto")
    return count


def round_trip_ms(raw: socket.socket) -> float | None:
    """The least round trip the kernel measured on ``raw`` (a busy host delays some samples,
    never shortens one), else its smoothed one, in ms; None where unknown."""
    try:
        info = raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)
    except (OSError, AttributeError):
        return None
    at = _TCPI_MIN_RTT_AT if len(info) >= _TCPI_MIN_RTT_AT + 4 else _TCPI_RTT_AT
    if len(info) < at + 4:
        return None
    return _U32.unpack_from(info, at)[0] / 1000.0


def is_loopback(raw: socket.socket) -> bool:
    """Whether ``raw``'s peer is this host (more connections cannot help a link there is not)."""
    import ipaddress  # 3 ms at every start of a sender otherwise

    try:
        return ipaddress.ip_address(raw.getpeername()[0]).is_loopback
    except (OSError, ValueError, IndexError):
        return False


def auto_count(rtt_ms: float | None) -> int:
    if rtt_ms is None or rtt_ms < AUTO_LAN_RTT_MS:
        return 1
    return min(AUTO_MAX, AUTO_MIN + int(rtt_ms // AUTO_STEP_MS))


def initial_streams(want: StreamCount, raw: socket.socket | None) -> int:
    """The connections to ask the receiver for: ``want``, or for "auto" by the round trip
    measured on ``raw``, the session's TCP connection."""
    if isinstance(want, int):
        return want
    if raw is None or is_loopback(raw):
        return 1
    return auto_count(round_trip_ms(raw))
