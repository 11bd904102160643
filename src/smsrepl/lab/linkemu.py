"""A link emulator for benchmarks and tests: two network namespaces joined by TUN devices
and a userspace forwarder that imposes, each way, a rate, a one-way delay, jitter (never
reordering), random loss and a drop-tail queue, while TCP runs end to end between them.

    with LinkEmulator(100e6, delay_ms=10, loss=0.001, cc="cubic") as link:
        server = link.run_in("b", ["python", "-m", "http.server", "--bind", link.addr("b")])
        link.run_in("a", ["curl", f"http://{link.addr('b')}:8000/"]).wait()
    print(link.stats)          # per direction: packets, bytes, lost, dropped, ... and the forwarder's CPU

Why not netem: the kernels this runs on have tbf and htb but no netem, so no delay. The
forwarder is C (_native/linkfwd.c) in a process of its own (``python -m smsrepl.lab.linkemu``),
so its CPU shows apart and it holds nobody's GIL. It needs root and /dev/net/tun.

What it models: a bottleneck of ``rate_bps`` (bits of IP packets, headers included, no
link-layer overhead) with a queue of ``queue_ms`` of that rate (default: one round trip,
at least 4 packets), a fixed delay plus uniform jitter in [-jitter, +jitter] held in order,
and independent random loss; the same each way. Not modelled: link-layer framing, reordering,
bursty loss, cross traffic, and small MTUs (the devices use a 65000-byte MTU so that
1 Gbit/s is ~2000 packets a second; TCP segments are ~64 KB, as with TSO on a real NIC).

Spec strings for command lines (``parse_spec``): ``RATE:RTT[:LOSS%][:jitter=Nms][:queue=Nms]``,
e.g. ``1gbit:50ms:0.1%`` is 1 Gbit/s each way, 25 ms each way, 0.1% loss each way.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
SIDES = ("a", "b")
READY = "forwarding"  # the forwarder's first line on stdout
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_count = 0


class LinkUnavailable(RuntimeError):
    """This machine cannot run the emulator (not root, no /dev/net/tun, no `ip`, or the
    congestion control asked for is not in the kernel); the message says which."""


@dataclass(frozen=True)
class LinkSpec:
    rate_bps: float
    delay_ms: float  # one way
    loss: float = 0.0
    jitter_ms: float = 0.0
    queue_ms: float | None = None

    def __str__(self) -> str:
        out = f"{_rate_text(self.rate_bps)}:{2 * self.delay_ms:g}ms"
        if self.loss:
            out += f":{self.loss * 100:g}%"
        if self.jitter_ms:
            out += f":jitter={self.jitter_ms:g}ms"
        if self.queue_ms is not None:
            out += f":queue={self.queue_ms:g}ms"
        return out


def _rate_text(bps: float) -> str:
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bps >= scale:
            return f"{bps / scale:g}{unit}"
    return f"{bps:g}bit"


def parse_rate(text: str) -> float:
    """'100mbit', '1gbit', '1.5g', '800kbit' -> bits per second."""
    m = re.fullmatch(r"([0-9.]+)\s*([kmgt]?)(?:bit|bps|b)?(?:/s)?", text.strip().lower())
    if not m:
        raise ValueError(f"not a rate: {text!r} (e.g. 100mbit, 1gbit)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)\s*(ms|s|us)?", text.strip().lower())
    if not m:
        raise ValueError(f"not a duration: {text!r} (e.g. 20ms)")
    return float(m.group(1)) * {"ms": 1.0, None: 1.0, "s": 1e3, "us": 1e-3}[m.group(2)]


def parse_spec(text: str) -> LinkSpec:
    """``RATE:RTT[:LOSS%][:jitter=Nms][:queue=Nms]``: the time is the round trip (half of it
    each way), the loss applies each way. '100mbit:20ms', '1gbit:50ms:0.1%'."""
    parts = text.split(":")
    if len(parts) < 2:
        raise ValueError(f"link spec {text!r}: RATE:RTT[:LOSS%][:jitter=Nms][:queue=Nms]")
    kw: dict[str, Any] = {"rate_bps": parse_rate(parts[0]), "delay_ms": _ms(parts[1]) / 2}
    for part in parts[2:]:
        if part.endswith("%"):
            kw["loss"] = float(part[:-1]) / 100
        elif part.startswith(("jitter=", "queue=")):
            key, _, value = part.partition("=")
            kw[f"{key}_ms"] = _ms(value)
        else:
            raise ValueError(f"link spec {text!r}: unknown part {part!r}")
    if not 0 <= kw.get("loss", 0) <= 1 or kw["rate_bps"] <= 0:
        raise ValueError(f"link spec {text!r}: rate must be > 0 and loss in [0%, 100%]")
    return LinkSpec(**kw)


def unavailable(cc: str = "cubic") -> str | None:
    """Why the emulator cannot run here, or None."""
    if os.geteuid() != 0:
        return "the link emulator needs root (network namespaces, TUN devices)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    if not shutil.which("ip"):
        return "no `ip` command (iproute2)"
    if cc not in _available_cc():
        if shutil.which("modprobe"):
            subprocess.run(["modprobe", f"tcp_{cc}"], capture_output=True)
        if cc not in _available_cc():
            return f"congestion control {cc!r} is not in this kernel (available: {' '.join(_available_cc())})"
    return None


def _available_cc() -> list[str]:
    try:
        with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as fh:
            return fh.read().split()
    except OSError:
        return []


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise LinkUnavailable(f"ip {' '.join(args)}: {r.stderr.strip()}")


class LinkEmulator:
    """Namespaces ``a`` (address ``10.SUBNET.0.1``) and ``b`` (``10.SUBNET.0.2``) joined by
    the emulated link, the same shaping each way; a context manager that removes the
    namespaces, devices and the processes started with :meth:`run_in` even on error.

    ``cc``: the TCP congestion control of both namespaces. ``tcp_buffer_max``: None keeps
    the namespaces' TCP buffer sysctls at the kernel's defaults (what servers run); a number
    of bytes raises the largest autotuned send and receive buffers to it."""

    def __init__(self, rate_bps: float, delay_ms: float, jitter_ms: float = 0.0, loss: float = 0.0,
                 queue_ms: float | None = None, cc: str = "cubic", mtu: int = 65000,
                 tcp_buffer_max: int | None = None, subnet: int = 77, seed: int | None = None,
                 realtime: bool = True) -> None:
        if rate_bps <= 0 or delay_ms < 0 or jitter_ms < 0 or not 0 <= loss <= 1:
            raise ValueError("rate must be > 0, delay and jitter >= 0, loss in [0, 1]")
        self.spec = LinkSpec(rate_bps, delay_ms, loss, jitter_ms, queue_ms)
        self.cc, self.mtu, self.tcp_buffer_max, self.subnet = cc, mtu, tcp_buffer_max, subnet
        self.realtime = realtime
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") | 1
        global _count
        _count += 1
        tag = f"{os.getpid()}x{_count}"
        self._ns = {s: f"smsle{tag}{s}" for s in SIDES}
        self._dev = {s: f"le{tag}{s}"[-15:] for s in SIDES}
        self._procs: list[subprocess.Popen] = []
        self._fwd: subprocess.Popen | None = None
        self._stop_w: int | None = None
        #: after exit: per direction ("a->b", "b->a") the forwarder's counts, and its CPU seconds
        self.stats: dict[str, Any] | None = None

    @classmethod
    def from_spec(cls, spec: str | LinkSpec, **kw: Any) -> LinkEmulator:
        s = parse_spec(spec) if isinstance(spec, str) else spec
        return cls(s.rate_bps, s.delay_ms, s.jitter_ms, s.loss, s.queue_ms, **kw)

    @property
    def queue_bytes(self) -> int:
        s = self.spec
        ms = s.queue_ms if s.queue_ms is not None else max(2 * s.delay_ms, 1.0)
        return max(int(s.rate_bps / 8 * ms / 1000), 4 * self.mtu)

    def addr(self, side: str) -> str:
        return f"10.{self.subnet}.0.{SIDES.index(side) + 1}"

    def ns(self, side: str) -> str:
        return self._ns[side]

    def run_in(self, side: str, argv: list[str], **popen_kw: Any) -> subprocess.Popen:
        """Start argv in namespace ``side``; killed at exit if still running."""
        p = subprocess.Popen(["ip", "netns", "exec", self._ns[side], *argv], **popen_kw)
        self._procs.append(p)
        return p

    def forwarder_cpu(self) -> float:
        """CPU seconds (user + system) the running forwarder has used so far."""
        if self._fwd is None:
            return 0.0
        with open(f"/proc/{self._fwd.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> LinkEmulator:
        why = unavailable(self.cc)
        if why:
            raise LinkUnavailable(why)
        try:
            self._up()
        except BaseException:
            self._down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._down()

    def _up(self) -> None:
        fds = []
        try:
            for side in SIDES:
                ns, dev = self._ns[side], self._dev[side]
                _ip("netns", "add", ns)
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
                fds.append(fd)
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", dev.encode(), IFF_TUN | IFF_NO_PI))
                _ip("link", "set", dev, "netns", ns)  # the fd keeps serving the device in its namespace
                peer = self.addr("b" if side == "a" else "a")
                _ip("-n", ns, "link", "set", dev, "mtu", str(self.mtu), "txqueuelen", "1000", "up")
                _ip("-n", ns, "addr", "add", self.addr(side), "peer", peer, "dev", dev)
                _ip("-n", ns, "link", "set", "lo", "up")
                # a namespace may take as its default only the algorithms of the root's
                # tcp_allowed_congestion_control; the route's congctl has no such limit
                _ip("-n", ns, "route", "replace", peer, "dev", dev, "src", self.addr(side), "congctl", self.cc)
                self._sysctl(ns, "net.ipv4.tcp_congestion_control", self.cc, may_refuse=True)
                if self.tcp_buffer_max:
                    for key in ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"):
                        low, default, _ = self._read_sysctl(ns, key).split()
                        self._sysctl(ns, key, f"{low} {default} {self.tcp_buffer_max}")
            stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
            s = self.spec
            one_way = ",".join(str(int(v)) for v in (
                s.rate_bps, s.delay_ms * 1e6, s.jitter_ms * 1e6, round(s.loss * 2 ** 32), self.queue_bytes))
            self._fwd = subprocess.Popen(
                [sys.executable, "-m", "smsrepl.lab.linkemu", "--fds", f"{fds[0]},{fds[1]},{stop_r}",
                 "--ab", one_way, "--ba", one_way, "--seed", str(self.seed), "--mtu", str(self.mtu),
                 *(["--realtime"] if self.realtime else [])],
                pass_fds=(*fds, stop_r), stdout=subprocess.PIPE, text=True)
            os.close(stop_r)
            assert self._fwd.stdout is not None
            if self._fwd.stdout.readline().strip() != READY:
                raise RuntimeError(f"the link's forwarder did not start (exit status {self._fwd.wait()})")
        finally:
            for fd in fds:  # the forwarder holds them now; the devices go when it exits
                os.close(fd)

    def _sysctl(self, ns: str, key: str, value: str, may_refuse: bool = False) -> None:
        r = subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={value}"],
                           capture_output=True, text=True)
        if r.returncode and not (may_refuse and "not permitted" in r.stderr):
            raise LinkUnavailable(f"sysctl {key}={value} in {ns}: {r.stderr.strip()}")

    @staticmethod
    def _read_sysctl(ns: str, key: str) -> str:
        return subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-n", key], capture_output=True,
                              text=True, check=True).stdout.strip()

    def _down(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self._procs.clear()
        if self._stop_w is not None:
            os.close(self._stop_w)  # the forwarder sees the pipe hang up and prints its counts
            self._stop_w = None
        if self._fwd is not None:
            fwd, self._fwd = self._fwd, None
            try:
                out, _ = fwd.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                fwd.kill()
                out, _ = fwd.communicate()
            if out.strip():
                self.stats = json.loads(out)
        for ns in self._ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _forward(argv: list[str]) -> int:
    """The forwarder process: runs the C loop until the stop pipe hangs up, then prints its
    counts and CPU seconds as one JSON object."""
    from smsrepl._native import _core

    ap = argparse.ArgumentParser(prog="python -m smsrepl.lab.linkemu", description="the link emulator's forwarder")
    ap.add_argument("--fds", required=True, help="TUN fd of side a, of side b, stop pipe")
    ap.add_argument("--ab", required=True, help="rate_bps,delay_ns,jitter_ns,loss_p32,queue_bytes")
    ap.add_argument("--ba", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mtu", type=int, default=65000)
    ap.add_argument("--realtime", action="store_true", help="run as a SCHED_FIFO thread when permitted")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it (Ctrl-C reaches the whole group)
    if args.realtime:
        # a link's timing should not wait for the host's scheduler: on a busy machine a normal
        # thread woke up to 15 ms late; the loop sleeps between packets (and the kernel keeps 5%
        # of each second from real-time threads), so it takes little from the endpoints
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except OSError:
            pass
    fd_a, fd_b, stop = (int(x) for x in args.fds.split(","))
    ab, ba = (tuple(int(x) for x in d.split(",")) for d in (args.ab, args.ba))
    print(READY, flush=True)
    t0, ru0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    st_ab, st_ba = _core.link_forward(fd_a, fd_b, stop, ab, ba, args.seed, args.mtu)  # type: ignore[arg-type]
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime
    print(json.dumps({"a->b": st_ab, "b->a": st_ba, "cpu_s": cpu, "wall_s": time.monotonic() - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(_forward(sys.argv[1:]))
