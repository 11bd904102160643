"""Probes of an emulated link (smsrepl.lab.linkemu), each end a process in its namespace;
every command prints one JSON object.

    python -m smsrepl.lab.linkprobe tcp-sink HOST PORT          # one connection, counts bytes until EOF
    python -m smsrepl.lab.linkprobe tcp-send HOST PORT SECONDS  # bulk data, then TCP_INFO
    python -m smsrepl.lab.linkprobe udp-echo HOST PORT          # echoes datagrams until killed
    python -m smsrepl.lab.linkprobe udp-ping HOST PORT COUNT INTERVAL_MS [SIZE]

tcp-sink reports the goodput of the whole connection and of its last two thirds (after slow
start); udp-ping the round trips of the echoed datagrams, how many were lost, and whether
they came back in order.
"""
from __future__ import annotations

import array
import fcntl
import json
import socket
import statistics
import struct
import subprocess
import sys
import termios
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from smsrepl.lab.linkemu import LinkEmulator

READY = "ready"  # the line a server prints on stderr once it listens


def tcp_info(sock: socket.socket) -> dict[str, int]:
    """A few fields of Linux's struct tcp_info (linux/tcp.h offsets); times in microseconds."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    u32 = lambda off: struct.unpack_from("I", raw, off)[0]  # noqa: E731
    u64 = lambda off: struct.unpack_from("Q", raw, off)[0]  # noqa: E731
    return {"rtt_us": u32(68), "rttvar_us": u32(72), "snd_cwnd": u32(80), "total_retrans": u32(100),
            "min_rtt_us": u32(148), "data_segs_out": u32(156), "bytes_sent": u64(200),
            "bytes_retrans": u64(208), "snd_mss": u32(16)}


def tcp_sink(host: str, port: int) -> dict:
    srv = socket.create_server((host, port))
    print(READY, file=sys.stderr, flush=True)
    conn, _ = srv.accept()
    buf = bytearray(1 << 20)
    queued = array.array("i", [0])
    total, samples = 0, []
    first = None
    while True:
        n = conn.recv_into(buf)
        if not n:
            break
        now = time.monotonic()
        first = first or now
        total += n
        # bytes arrived by now = read + still queued; a sink that was descheduled reads a
        # backlog that arrived before its wake-up, which must not count as later throughput
        fcntl.ioctl(conn.fileno(), termios.FIONREAD, queued)
        samples.append((now, total + queued[0]))
    end = time.monotonic()
    conn.close()
    srv.close()
    if not samples:
        return {"bytes": 0, "seconds": 0.0, "bps": 0.0, "steady_bps": 0.0}
    assert first is not None
    cut = first + (end - first) / 3
    t1, b1 = next((t, b) for t, b in samples if t >= cut)
    return {"bytes": total, "seconds": end - first, "bps": total * 8 / max(end - first, 1e-9),
            "steady_bps": (total - b1) * 8 / max(end - t1, 1e-9)}


def tcp_send(host: str, port: int, seconds: float) -> dict:
    sock = socket.create_connection((host, port), timeout=30)
    chunk = b"\x5a" * (1 << 20)
    t0 = time.monotonic()
    sent = 0
    while time.monotonic() - t0 < seconds:
        sent += sock.send(chunk)
    info = tcp_info(sock)
    cc = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # the sink closes after EOF: everything sent has been read
    sock.close()
    return {"bytes": sent, "seconds": time.monotonic() - t0, "cc": cc, **info}


def udp_echo(host: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    print(READY, file=sys.stderr, flush=True)
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)


def udp_ping(host: str, port: int, count: int, interval_ms: float, size: int = 64) -> dict:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, port))
    sock.setblocking(False)
    pad = b"\0" * max(size - 12, 0)
    rtts: dict[int, float] = {}
    order: list[int] = []

    def collect() -> None:
        while True:
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                return
            seq, sent = struct.unpack_from("!Id", data)
            rtts[seq] = time.monotonic() - sent
            order.append(seq)

    t0 = time.monotonic()
    for seq in range(count):
        while time.monotonic() < t0 + seq * interval_ms / 1000:
            collect()
            time.sleep(min(0.0005, interval_ms / 4000))
        sock.send(struct.pack("!Id", seq, time.monotonic()) + pad)
        collect()
    end = time.monotonic() + 2.0
    while time.monotonic() < end and len(rtts) < count:
        collect()
        time.sleep(0.001)
    ms = sorted(v * 1e3 for v in rtts.values())
    return {"sent": count, "received": len(rtts), "loss": 1 - len(rtts) / count,
            "in_order": order == sorted(order),
            "rtt_ms": {"min": ms[0], "median": statistics.median(ms), "max": ms[-1]} if ms else None}


def _server(link: LinkEmulator, argv: list[str]) -> subprocess.Popen:
    p = link.run_in("b", [sys.executable, "-m", "smsrepl.lab.linkprobe", *argv],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    line = p.stderr.readline()
    if READY not in line:
        raise RuntimeError(f"probe server in {link.ns('b')} did not start: {line}{p.stderr.read()}")
    return p


def _client(link: LinkEmulator, argv: list[str], timeout: float) -> dict:
    p = link.run_in("a", [sys.executable, "-m", "smsrepl.lab.linkprobe", *argv], stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"probe {argv[0]} failed ({p.returncode})")
    return json.loads(out)


def bulk(link: LinkEmulator, seconds: float = 3.0, port: int = 5201) -> dict:
    """A bulk TCP transfer from side a to side b for ``seconds``: the sink's goodput and the
    sender's TCP_INFO (keys of tcp_sink and tcp_send, the sender's under "sender")."""
    sink = _server(link, ["tcp-sink", link.addr("b"), str(port)])
    sender = _client(link, ["tcp-send", link.addr("b"), str(port), str(seconds)], seconds + 60)
    out, _ = sink.communicate(timeout=30)
    return {**json.loads(out), "sender": sender}


def ping(link: LinkEmulator, count: int = 200, interval_ms: float = 5.0, size: int = 64, port: int = 5202) -> dict:
    """UDP datagrams from side a echoed by side b: round trips, loss (of either way), order."""
    echo = _server(link, ["udp-echo", link.addr("b"), str(port)])
    try:
        return _client(link, ["udp-ping", link.addr("b"), str(port), str(count), str(interval_ms), str(size)],
                       count * interval_ms / 1000 + 60)
    finally:
        echo.kill()
        echo.wait()


def main(argv: list[str]) -> int:
    cmd, host, port, *rest = argv
    if cmd == "udp-echo":
        udp_echo(host, int(port))
        return 0
    if cmd == "tcp-sink":
        out = tcp_sink(host, int(port))
    elif cmd == "tcp-send":
        out = tcp_send(host, int(port), float(rest[0]))
    elif cmd == "udp-ping":
        out = udp_ping(host, int(port), int(rest[0]), float(rest[1]), *(int(x) for x in rest[2:3]))
    else:
        raise SystemExit(f"unknown command {cmd!r}; see the module's doc")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
