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
        if tx.poll() is None:
            tx.kill()
        rx.stop()
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


@pytest.mark.parametrize("seed", range(KILL_RUNS))
def test_kills_during_continuous_sync_end_byte_identical(tmp_path, certkey_file, seed):
    _run(tmp_path, certkey_file, seed=100 + seed, kills=2)
