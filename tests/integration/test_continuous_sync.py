"""Continuous sync with a dirty map while a writer process rewrites the source; SIGTERM cutover; kills."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from smsrepl.blocks.dirtymap import DirtyMap

from .procs import CLI, ReceiverProc, send_args, sha256

SIZE = 24 << 20
KILL_RUNS = int(os.environ.get("SMSREPL_CONTINUOUS_RUNS", "30" if os.environ.get("SMSREPL_SLOW") else "2"))

WRITER = r"""
import os, random, sys, time
from smsrepl.blocks.dirtymap import DirtyMap, tracked_pwrite
dm = DirtyMap.open({dm!r}, {size})
fd = os.open({src!r}, os.O_RDWR)
rng = random.Random({seed})
stop_at = time.monotonic() + {seconds}
n = 0
while time.monotonic() < stop_at:
    if rng.random() < 0.7:  # random 4 KiB blocks
        b = rng.randrange({size} // 4096)
        tracked_pwrite(fd, os.urandom(4096), b * 4096, dm)
    else:  # a sequential run
        off = rng.randrange(0, {size} - (1 << 20), 4096)
        tracked_pwrite(fd, os.urandom(rng.randrange(1, 256) * 4096), off, dm)
    n += 1
    time.sleep(0.002)
os.close(fd)
dm.close()
print(n)
"""


def _start_sender(src, rx, certkey, tmp_path, dm):
    args = send_args(src, rx.address, certkey, str(tmp_path / "tx"), "disk0", "--dirty-map", dm,
                     "--continuous", "--interval", "0.2")
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _end(tx, rx) -> None:
    if tx.poll() is None:
        tx.kill()
    rx.stop()


def _run(tmp_path, certkey, seed, kills):
    rng = random.Random(seed)
    src, dst, dm = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), str(tmp_path / "dirty.map")
    with open(src, "wb") as fh:
        fh.write(os.urandom(SIZE))
    DirtyMap.open(dm, SIZE).close()
    rx = ReceiverProc(certkey, {"disk0": dst}, str(tmp_path / "rx"))
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(dm=dm, size=SIZE, src=src, seed=seed, seconds=3.0)],
                              stdout=subprocess.PIPE, text=True)
    tx = _start_sender(src, rx, certkey, tmp_path, dm)
    try:
        for _ in range(kills):  # kill either endpoint mid-round, then bring it back
            time.sleep(rng.uniform(0.3, 1.0))
            if rng.random() < 0.5:
                tx.kill()
                tx.wait()
                tx = _start_sender(src, rx, certkey, tmp_path, dm)
            else:
                rx.kill()
                rx = ReceiverProc(certkey, {"disk0": dst}, str(tmp_path / "rx"), port=rx.port)
        assert writer.wait(60) == 0  # the workload stopped: the source is quiesced
        time.sleep(rng.uniform(0, 0.5))
        tx.send_signal(signal.SIGTERM)
        out, err = tx.communicate(timeout=120)
    finally:
        _end(tx, rx)
    assert tx.returncode == 0, err
    rounds = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert sha256(src) == sha256(dst), f"seed {seed}: target differs after the cutover"
    return rounds


def test_continuous_sync_follows_a_writer_and_cuts_over(tmp_path, certkey_file):
    rounds = _run(tmp_path, certkey_file, seed=1, kills=0)
    assert rounds[0]["kind"] == "full"
    mapped = [r for r in rounds if r["dirty_blocks"] is not None]
    assert len(mapped) >= 2, rounds  # sync rounds read only what the map named
    assert all(r["kind"] == "sync" for r in rounds[1:])


@pytest.mark.reliability("fault", "kills during continuous sync with a concurrent writer")
@pytest.mark.parametrize("seed", range(KILL_RUNS))
def test_kills_during_continuous_sync_end_byte_identical(tmp_path, certkey_file, seed):
    _run(tmp_path, certkey_file, seed=100 + seed, kills=2)


def test_sync_command_runs_a_round_now_and_lag_is_reported(tmp_path, bundle):
    import threading

    from smsrepl.replication.continuous import ContinuousSync
    from smsrepl.transport.receiver import Receiver
    from smsrepl.transport.sender import Sender
    from smsrepl.transport.tls import client_context, server_context

    src, dm_path = str(tmp_path / "src.img"), str(tmp_path / "dirty.map")
    with open(src, "wb") as fh:
        fh.write(os.urandom(4 << 20))
    rx = Receiver({"disk0": str(tmp_path / "t.img")}, server_context(bundle), str(tmp_path / "rx"), create=True)
    addr = rx.start()
    dm = DirtyMap.open(dm_path, 4 << 20)
    reports = []
    box = []

    def make():
        return Sender(src, "disk0", addr, client_context(bundle), str(tmp_path / "tx"), dirty_map=dm,
                      trace=box[0].trace, on_report=reports.append)

    sync = ContinuousSync(make, interval=3600, dirty_map=dm)  # only commands start rounds
    box.append(sync)
    t = threading.Thread(target=sync.run)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while not sync.results and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(src, "r+b") as fh:
            fh.seek(8192)
            fh.write(b"\x01" * 4096)
        dm.mark(8192, 4096)
        assert sync.lag()["dirty_bytes"] == 4096
        t0 = time.monotonic()
        sync.request_round()  # SYNC: well before the hour is up
        while len(sync.results) < 2 and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        assert len(sync.results) == 2 and sync.results[1].dirty_blocks == 1
        sync.request_cutover()
        t.join(30)
    finally:
        sync.abort()
        t.join(30)
        rx.stop()
        dm.close()
    assert len(sync.results) == 3 and not t.is_alive()
    assert sha256(src) == sha256(str(tmp_path / "t.img"))
    traces = [r["process_trace"] for r in reports if r["process_trace"].startswith("lag ")]
    assert traces and '"dirty_bytes"' in traces[-1] and '"seconds_since_round"' in traces[-1]


@pytest.mark.parametrize("extra, message", [
    (["--interval", "5"], "--interval applies to --continuous only"),
    (["--tracking", "scan"], "--tracking applies to --continuous only"),
    (["--continuous", "--freeze-timeout", "5"], "--freeze-timeout applies to --freeze only"),
    (["--freeze-timeout", "5"], "--freeze-timeout applies to --freeze only"),
    (["--continuous", "--interval", "-1"], "must be between 0 and 86400"),
])
def test_bad_continuous_flags_are_usage_errors(tmp_path, certkey_file, extra, message):
    src = tmp_path / "src.img"
    src.write_bytes(b"\x01" * 8192)
    cp = subprocess.run(send_args(str(src), "127.0.0.1:1", certkey_file, str(tmp_path / "tx"), "disk0", *extra),
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2 and message in cp.stderr, cp.stderr


def test_dirty_map_of_another_source_is_refused_untouched(tmp_path, certkey_file):
    src = tmp_path / "src.img"
    src.write_bytes(b"\x01" * 8192)
    dm = str(tmp_path / "dirty.map")
    DirtyMap.open(dm, 1 << 20).close()
    before = open(dm, "rb").read()
    cp = subprocess.run(send_args(str(src), "127.0.0.1:1", certkey_file, str(tmp_path / "tx"), "disk0",
                                  "--dirty-map", dm), capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2 and "tracks 1048576 bytes, the source has 8192" in cp.stderr, cp.stderr
    assert open(dm, "rb").read() == before


def test_dirty_map_in_a_missing_directory_is_a_usage_error(tmp_path, certkey_file):
    src = tmp_path / "src.img"
    src.write_bytes(b"\x01" * 8192)
    dm = tmp_path / "no-such-dir" / "dirty.map"
    cp = subprocess.run(send_args(str(src), "127.0.0.1:1", certkey_file, str(tmp_path / "tx"), "disk0",
                                  "--dirty-map", str(dm)), capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2 and "cannot be opened or created: No such file or directory" in cp.stderr, cp.stderr
    assert "Traceback" not in cp.stderr and not dm.parent.exists()


def test_a_long_running_sync_keeps_only_the_latest_results_and_outcomes(tmp_path, bundle, monkeypatch):
    """Weeks of rounds must not grow either side by one result or outcome a round."""
    import threading

    from smsrepl.replication import continuous
    from smsrepl.replication.continuous import ContinuousSync
    from smsrepl.transport import receiver as receiver_mod, server
    from smsrepl.transport.sender import Sender
    from smsrepl.transport.tls import client_context, server_context

    monkeypatch.setattr(continuous, "KEEP_RESULTS", 3)
    monkeypatch.setattr(server, "KEEP_OUTCOMES", 3)
    src, dm_path = str(tmp_path / "src.img"), str(tmp_path / "dirty.map")
    with open(src, "wb") as fh:
        fh.write(os.urandom(1 << 20))
    rx = receiver_mod.Receiver({"disk0": str(tmp_path / "t.img")}, server_context(bundle), str(tmp_path / "rx"), create=True)
    addr = rx.start()
    dm = DirtyMap.open(dm_path, 1 << 20)
    sync = ContinuousSync(lambda: Sender(src, "disk0", addr, client_context(bundle), str(tmp_path / "tx"),
                                         dirty_map=dm), interval=0, dirty_map=dm,
                          on_round=lambda r: sync.rounds >= 7 and sync.request_cutover())
    t = threading.Thread(target=sync.run)
    t.start()
    try:
        t.join(60)
        assert not t.is_alive()
    finally:
        sync.abort()
        t.join(30)
        rx.stop()
        dm.close()
    assert sync.rounds == 8  # 7, then the cutover round
    assert [r.round_id for r in sync.results] == [6, 7, 8]
    kept = [rx.outcomes.get_nowait() for _ in range(rx.outcomes.qsize())]
    assert len(kept) == 3 and all(o.ok and o.target == "disk0" for o in kept)


def test_a_cutover_asked_for_while_the_sender_starts_is_kept(tmp_path, certkey_file):
    """SIGTERM to a --continuous sender still starting (its imports take a second on a busy
    host) runs the cutover round: it does not end the process."""
    src, dst = str(tmp_path / "src.img"), str(tmp_path / "dst.img")
    with open(src, "wb") as fh:
        fh.write(os.urandom(4 << 20))
    rx = ReceiverProc(certkey_file, {"disk0": dst}, str(tmp_path / "rx"))
    args = send_args(src, rx.address, certkey_file, str(tmp_path / "tx"), "disk0", "--continuous", "--interval", "30")
    tx = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "SMSREPL_FAULTS": "stop@send.start"})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # stopped at the fault point: still starting
            with open(f"/proc/{tx.pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "T":
                    break
            time.sleep(0.02)
        tx.send_signal(signal.SIGTERM)
        tx.send_signal(signal.SIGCONT)
        out, err = tx.communicate(timeout=120)
    finally:
        _end(tx, rx)
    assert tx.returncode == 0, err
    assert "cutover" in err
    assert sha256(src) == sha256(dst)
