"""The fault matrix: each fault, its expected outcome, and the target after the resumed run.

Faults are injected into real `smsrepl receive` / `smsrepl send block` processes with
SMSREPL_FAULTS (see smsrepl/faults.py): a process killing itself at a named phase, or
reads and writes failing as a broken or full disk would. Network faults go through a
loopback proxy (delay, stall) or, where the kernel has it, netem between two network
namespaces (loss, reordering, duplication). The wall-clock jump and the control plane
outage have their own tests (here and in tests/agent).
"""
import datetime as dt
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import zlib

import pytest

from smsrepl.throttle import OverSpeedGuard, ScheduledLimiter, SpeedSchedule
from smsrepl.lab.testdata import write_image

from integration.procs import CLI, ReceiverProc, send, sha256

reliability = pytest.mark.reliability
SIZE = 24 << 20


@pytest.fixture
def lab(tmp_path, certkey_file):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_image(str(src), SIZE, seed=11, mix={"zero": 0.2, "text": 0.4, "random": 0.4})
    return {"src": str(src), "dst": str(dst), "ck": certkey_file, "rx_state": str(tmp_path / "rx"),
            "tx_state": str(tmp_path / "tx"), "tmp": tmp_path}


def _receiver(lab, port=0, faults=None):
    return ReceiverProc(lab["ck"], {"disk0": lab["dst"]}, lab["rx_state"], port=port,
                        env={"SMSREPL_FAULTS": faults} if faults else None)


def _send(lab, rx, faults=None):
    return send(lab["src"], rx.address, lab["ck"], lab["tx_state"], env={"SMSREPL_FAULTS": faults} if faults else None)


def _rewrite_one_percent(path, seed):
    rng = random.Random(seed)
    with open(path, "r+b") as fh:
        for _ in range(SIZE // 4096 // 100):
            fh.seek(rng.randrange(SIZE // 4096) * 4096)
            fh.write(os.urandom(4096))


def _no_temporaries(lab):
    leftovers = [n for n in os.listdir(lab["tmp"]) if n.startswith(".") or n.endswith(".tmp")]
    assert not leftovers, leftovers


PHASES = [
    ("full", "sender", "sender.welcome"),
    ("full", "sender", "sender.data:3"),
    ("full", "sender", "sender.round_end"),
    ("full", "sender", "sender.round_done"),
    ("full", "receiver", "receiver.welcome"),
    ("full", "receiver", "receiver.data:2"),
    ("full", "receiver", "receiver.checkpoint:2"),
    ("full", "receiver", "receiver.round_done"),
    ("sync", "sender", "sender.welcome"),
    ("sync", "sender", "sender.data:1"),
    ("sync", "sender", "sender.round_done"),
    ("sync", "receiver", "receiver.data:1"),
    ("sync", "receiver", "receiver.checkpoint:1"),
    ("sync", "receiver", "receiver.round_done"),
]


@reliability("fault", "process killed at each phase of a round, then both rerun")
@pytest.mark.parametrize("kind, side, phase", PHASES, ids=[f"{k}-{p}" for k, _, p in PHASES])
def test_kill_at_each_phase_then_resume_ends_identical(lab, kind, side, phase):
    rx = _receiver(lab)
    try:
        if kind == "sync":
            assert _send(lab, rx).returncode == 0
            _rewrite_one_percent(lab["src"], seed=zlib.crc32(phase.encode()))
        fault = f"kill@{phase}"
        if side == "receiver":
            rx.stop()
            rx = _receiver(lab, port=rx.port, faults=fault)
        cp = _send(lab, rx, faults=fault if side == "sender" else None)
        if side == "sender":
            assert cp.returncode == -9, (cp.returncode, cp.stderr)
        else:
            assert rx.proc.wait(30) == -9, "the receiver did not reach the phase"
            assert cp.returncode != 0, cp.stdout
            rx = _receiver(lab, port=rx.port)
        cp = _send(lab, rx)
        assert cp.returncode == 0, cp.stderr
    finally:
        rx.stop()
    assert sha256(lab["src"]) == sha256(lab["dst"]), f"{kind} round killed at {phase}: target differs"
    _no_temporaries(lab)


IO_FAULTS = [
    ("sender", "eio@source.read:8388608", 3, "SMS.1901"),
    ("receiver", "eio@target.write:8388608", 3, "SMS.2007"),
    ("receiver", "enospc@target.write:8388608", 3, "SMS.2007"),
]


@reliability("fault", "I/O error reading the source or writing the target; target disk full")
@pytest.mark.parametrize("side, fault, exit_code, code", IO_FAULTS, ids=[f[1].split(":")[0] for f in IO_FAULTS])
def test_io_faults_are_resumable_errors_with_their_code(lab, side, fault, exit_code, code):
    rx = _receiver(lab, faults=fault if side == "receiver" else None)
    try:
        cp = _send(lab, rx, faults=fault if side == "sender" else None)
        assert cp.returncode == exit_code and cp.stderr.startswith(code), (cp.returncode, cp.stderr)
        assert "8388608" in cp.stderr or side == "receiver" or "read failed" in cp.stderr
        if side == "receiver":
            assert rx.proc.poll() is None, "the receiver must survive a target's write error"
            rx.stop()
            rx = _receiver(lab, port=rx.port)  # the disk was replaced or space freed
        cp = _send(lab, rx)
        assert cp.returncode == 0, cp.stderr
        resent = [ln for ln in cp.stdout.splitlines() if ln.startswith("{")]
    finally:
        rx.stop()
    assert sha256(lab["src"]) == sha256(lab["dst"])
    assert resent  # the resumed run's summary


@reliability("fault", "target disk really full (tmpfs)")
def test_a_really_full_file_system_is_sms_2007_and_resumable(lab):
    mnt = lab["tmp"] / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        small = dict(lab, dst=str(mnt / "dst.img"))
        rx = _receiver(small)
        try:
            cp = _send(small, rx)
            assert cp.returncode == 3 and cp.stderr.startswith("SMS.2007"), cp.stderr
            assert "No space left" in cp.stderr or "space" in cp.stderr.lower()
        finally:
            rx.stop()
        # space is made: the target moves to a larger file system with what it holds
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        rx = _receiver(small, port=rx.port)
        try:
            cp = _send(small, rx)
        finally:
            rx.stop()
        assert cp.returncode == 0, cp.stderr
        assert sha256(small["src"]) == sha256(small["dst"])
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


class DelayProxy:
    """Loopback TCP proxy: every chunk waits ``delay`` s each way; ``stall`` pauses forwarding for
    that long once ``stall_at`` bytes went towards the receiver (a link that goes quiet)."""

    def __init__(self, upstream: int, delay: float = 0.0, stall_at: int | None = None, stall: float = 0.0,
                 mangle_at: int | None = None, mangle: str = ""):
        self.upstream, self.delay, self.stall_at, self.stall = upstream, delay, stall_at, stall
        #: once mangle_at bytes went towards the receiver: "duplicate" sends the next chunk
        #: twice, "reorder" swaps the next two chunks (a broken middlebox, where netem is absent)
        self.mangle_at, self.mangle = mangle_at, mangle
        self._held: bytes | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.forwarded = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def _serve(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, a, b, towards_receiver):
        try:
            while data := a.recv(65536):
                time.sleep(self.delay)
                if towards_receiver and self.stall_at is not None and self.forwarded >= self.stall_at:
                    self.stall_at = None
                    time.sleep(self.stall)
                if towards_receiver:
                    self.forwarded += len(data)
                    if self.mangle_at is not None and self.forwarded >= self.mangle_at:
                        if self.mangle == "duplicate":
                            self.mangle_at = None
                            b.sendall(data)
                        elif self._held is None:
                            self._held = data  # reorder: this chunk goes after the next one
                            continue
                        else:
                            self.mangle_at = None
                            b.sendall(data)
                            data = self._held
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.listener.close()


@reliability("fault", "link delay (5 ms per chunk each way) and a 5 s stall mid-transfer")
def test_a_slow_and_stalling_link_still_ends_identical(lab):
    rx = _receiver(lab)
    proxy = DelayProxy(rx.port, delay=0.005, stall_at=SIZE // 4, stall=5.0)
    try:
        cp = send(lab["src"], proxy.address, lab["ck"], lab["tx_state"])
    finally:
        proxy.close()
        rx.stop()
    assert cp.returncode == 0, cp.stderr
    assert sha256(lab["src"]) == sha256(lab["dst"])


@reliability("fault", "bytes duplicated or reordered in the stream (a broken middlebox)")
@pytest.mark.parametrize("mangle", ["duplicate", "reorder"])
def test_duplicated_or_reordered_stream_bytes_are_caught_and_the_rerun_ends_identical(lab, mangle):
    rx = _receiver(lab)
    proxy = DelayProxy(rx.port, mangle_at=1 << 20, mangle=mangle)
    try:
        # the proxy keeps the sender's side open and stops reading once the receiver hung up:
        # the sender must notice at once (not at its 300 s socket timeout)
        cp = send(lab["src"], proxy.address, lab["ck"], lab["tx_state"], timeout=60)
        # TLS refuses the damaged records: a resumable transport error, nothing wrong applied
        assert cp.returncode == 3 and cp.stderr.startswith("SMS."), (cp.returncode, cp.stderr)
        cp = _send(lab, rx)
    finally:
        proxy.close()
        rx.stop()
    assert cp.returncode == 0, cp.stderr
    assert sha256(lab["src"]) == sha256(lab["dst"])


NS_TX, NS_RX = "smsrel-tx", "smsrel-rx"


def _netem_link():
    """Two namespaces on a veth pair, netem on both ends; a skip reason where that is not possible."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    _netem_down()
    steps = [f"ip netns add {NS_TX}", f"ip netns add {NS_RX}", "ip link add smsrel-a type veth peer name smsrel-b",
             f"ip link set smsrel-a netns {NS_TX}", f"ip link set smsrel-b netns {NS_RX}",
             f"ip -n {NS_TX} addr add 10.78.0.1/24 dev smsrel-a", f"ip -n {NS_RX} addr add 10.78.0.2/24 dev smsrel-b",
             f"ip -n {NS_TX} link set smsrel-a up", f"ip -n {NS_RX} link set smsrel-b up",
             f"ip -n {NS_RX} link set lo up",
             f"tc -n {NS_TX} qdisc add dev smsrel-a root netem delay 5ms 2ms reorder 25% 50% duplicate 3% loss 1%",
             f"tc -n {NS_RX} qdisc add dev smsrel-b root netem delay 5ms 2ms reorder 25% 50% duplicate 3% loss 1%"]
    for step in steps:
        r = subprocess.run(step.split(), capture_output=True, text=True)
        if r.returncode:
            _netem_down()
            return f"{step!r} is not permitted here: {r.stderr.strip()}"
    return None


def _netem_down():
    for ns in (NS_TX, NS_RX):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@reliability("fault", "loss, reordering and duplication (netem between namespaces)")
def test_loss_reordering_and_duplication_on_a_netem_link(lab):
    reason = _netem_link()
    if reason:
        pytest.skip(f"netem link unavailable: {reason}")
    try:
        rx = subprocess.Popen(["ip", "netns", "exec", NS_RX, *CLI, "receive", "--listen", "10.78.0.2:0", "--certkey",
                               lab["ck"], "--state-dir", lab["rx_state"], "--create", "--target", f"disk0={lab['dst']}"],
                              stderr=subprocess.PIPE, text=True)
        port = int(rx.stderr.readline().rsplit(":", 1)[1])
        cp = subprocess.run(["ip", "netns", "exec", NS_TX, *CLI, "send", "block", "--json", lab["src"], "--to",
                             f"10.78.0.2:{port}", "--target", "disk0", "--certkey", lab["ck"], "--state-dir",
                             lab["tx_state"]], capture_output=True, text=True, timeout=600)
        rx.terminate()
        rx.wait(10)
    finally:
        _netem_down()
    assert cp.returncode == 0, cp.stderr
    assert sha256(lab["src"]) == sha256(lab["dst"])


# --- the wall clock jumping during a speed schedule ---------------------------------------

@reliability("fault", "wall clock jumps forwards and backwards during a speed schedule")
def test_wall_clock_jumps_change_the_window_but_never_stall_burst_or_trip_the_guard():
    # 08:00-18:00 at 8 Mbit/s (1 MB/s), no limit outside; the bucket and the guard run on the
    # monotonic clock, the window on the wall clock, which jumps
    sched = SpeedSchedule.from_json('{"speed_limit":[{"start":"08:00","end":"18:00","speed":8,'
                                    '"over_speed_threshold":20}]}')
    mono = [1000.0]
    wall = [dt.datetime(2026, 11, 27, 12, 0, 0)]

    def sleep(s):
        mono[0] += s
        wall[0] += dt.timedelta(seconds=s)

    lim = ScheduledLimiter(sched, clock=lambda: mono[0], wallclock=lambda: wall[0], sleep=sleep)
    guard = OverSpeedGuard()
    chunk = 64 << 10

    def send_for(seconds):
        """Send as fast as the limiter lets for ``seconds`` of monotonic time; the rate seen."""
        start, sent = mono[0], 0
        while mono[0] - start < seconds:
            lim.throttle(chunk)
            mono[0] += 0.0005  # the send itself
            sent += chunk
            guard.record(mono[0], chunk)
            limit, threshold = lim.current()
            guard.check(mono[0], limit, threshold)
            if sent > 1 << 30:
                break
        return sent / max(mono[0] - start, 1e-9)

    assert send_for(12) == pytest.approx(1e6, rel=0.1)
    wall[0] = dt.datetime(2026, 11, 27, 21, 0, 0)  # NTP step forwards out of the window
    fast = send_for(2)
    assert fast > 50e6, "the limit must lift as soon as the wall clock leaves the window"
    wall[0] = dt.datetime(2026, 11, 27, 9, 0, 0)  # and backwards into it again
    t0 = mono[0]
    lim.throttle(chunk)
    assert mono[0] - t0 < 1.0, "a backward jump must not make the limiter wait for hours"
    assert send_for(12) == pytest.approx(1e6, rel=0.1)  # the guard never tripped on the burst
    wall[0] = dt.datetime(2026, 11, 26, 23, 0, 0)  # a whole day back: outside the window
    assert send_for(1) > 50e6


@pytest.mark.parametrize("spec", ["kill", "kill@", "kill@x:y", "nosuch@target.write:1", "eio@source.read",
                                  "eio@source.read:-5"])
def test_a_malformed_fault_spec_names_the_item(spec):
    from smsrepl import faults

    try:
        with pytest.raises(ValueError, match="SMSREPL_FAULTS item"):
            faults.configure(spec)
    finally:
        faults.configure("")
    assert not faults._KILLS and not faults._IO  # nothing half-configured stays active


def test_a_malformed_fault_spec_stops_the_cli_before_it_touches_anything(lab):
    cp = subprocess.run(CLI + ["send", "block", "--json", lab["src"], "--to", "127.0.0.1:1", "--target", "disk0", "--certkey",
                               lab["ck"], "--state-dir", lab["tx_state"]], capture_output=True, text=True,
                        timeout=60, env={**os.environ, "SMSREPL_FAULTS": "kill@x:y"})
    assert cp.returncode != 0 and "SMSREPL_FAULTS item 'kill@x:y'" in cp.stderr
    assert not os.path.exists(lab["tx_state"])
