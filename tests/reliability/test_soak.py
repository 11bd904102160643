"""Soak: continuous sync of a source that a writer rewrites the whole time.

Runs only with SMSREPL_SOAK_MINUTES=M (30 for the issue's figure). Real `smsrepl receive`
and `smsrepl send block --continuous --dirty-map` processes; every 10 s the test samples
both endpoints' resident memory and open descriptors and the time since the last
completed round. Asserts: RSS at the end within 10% of RSS at the end of the warm-up
(minute 5 of 30, or the first sixth of a shorter run), no descriptor growth, the lag
bounded, and the target byte-identical to the source after the cutover round. The
samples go to SMSREPL_SOAK_OUT (JSON) when set.
"""
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import psutil
import pytest

from smsrepl.blocks.dirtymap import DirtyMap

from integration.procs import ReceiverProc, send_args, sha256

MINUTES = float(os.environ.get("SMSREPL_SOAK_MINUTES", "0"))
SIZE = 256 << 20
INTERVAL = 5.0
SAMPLE = 10.0

pytestmark = pytest.mark.skipif(not MINUTES, reason="soak run: set SMSREPL_SOAK_MINUTES=30 to run it")

WRITER = r"""
import os, random, sys, time
from smsrepl.blocks.dirtymap import DirtyMap, tracked_pwrite
dm = DirtyMap.open({dm!r}, {size})
fd = os.open({src!r}, os.O_RDWR)
rng = random.Random(7)
n = 0
while not os.path.exists({stop!r}):
    if rng.random() < 0.8:
        tracked_pwrite(fd, os.urandom(4096), rng.randrange({size} // 4096) * 4096, dm)
    else:
        off = rng.randrange(0, {size} - (1 << 20), 4096)
        tracked_pwrite(fd, os.urandom(rng.randrange(1, 64) * 4096), off, dm)
    n += 1
    time.sleep(0.004)
os.close(fd)
dm.close()
print(n)
"""


def _figures(proc: psutil.Process) -> tuple[float, int]:
    return proc.memory_info().rss / 2**20, proc.num_fds()


@pytest.mark.reliability("soak", "continuous sync with a concurrent writer")
def test_soak_continuous_sync_stays_flat_and_ends_identical(tmp_path, certkey_file, record_property):
    src, dst, dm = str(tmp_path / "src.img"), str(tmp_path / "dst.img"), str(tmp_path / "dirty.map")
    with open(src, "wb") as fh:
        for _ in range(SIZE >> 22):
            fh.write(os.urandom(1 << 22))
    DirtyMap.open(dm, SIZE).close()
    stop_file = str(tmp_path / "stop")
    rx = ReceiverProc(certkey_file, {"disk0": dst}, str(tmp_path / "rx"))
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(dm=dm, size=SIZE, src=src, stop=stop_file)],
                              stdout=subprocess.PIPE, text=True)
    out_path = tmp_path / "sender.out"
    with open(out_path, "w") as out, open(tmp_path / "sender.err", "w") as err:
        tx = subprocess.Popen(send_args(src, rx.address, certkey_file, str(tmp_path / "tx"), "disk0", "--dirty-map",
                                        dm, "--continuous", "--interval", str(INTERVAL)), stdout=out, stderr=err)
    rounds_seen: list[float] = []

    def count_rounds() -> int:
        with open(out_path) as fh:
            n = sum(1 for line in fh if line.startswith("{"))
        while len(rounds_seen) < n:
            rounds_seen.append(time.monotonic())
        return n

    watching = threading.Event()

    def watch_rounds() -> None:  # timestamps each round's summary line as it appears
        while not watching.wait(0.5):
            count_rounds()

    watcher = threading.Thread(target=watch_rounds, daemon=True)
    watcher.start()
    samples = []
    t0 = time.monotonic()
    end = t0 + MINUTES * 60
    sender, receiver = psutil.Process(tx.pid), psutil.Process(rx.proc.pid)
    try:
        while time.monotonic() < end:
            time.sleep(SAMPLE)
            assert tx.poll() is None, (tmp_path / "sender.err").read_text()[-2000:]
            since = time.monotonic() - rounds_seen[-1] if rounds_seen else time.monotonic() - t0
            (tx_rss, tx_fds), (rx_rss, rx_fds) = _figures(sender), _figures(receiver)
            samples.append({"t": round(time.monotonic() - t0, 1), "tx_rss_mib": round(tx_rss, 1), "tx_fds": tx_fds,
                            "rx_rss_mib": round(rx_rss, 1), "rx_fds": rx_fds, "rounds": len(rounds_seen),
                            "seconds_since_round": round(since, 1)})
        open(stop_file, "w").close()
        writes = int(writer.communicate(timeout=60)[0])
        tx.send_signal(signal.SIGTERM)
        assert tx.wait(300) == 0, (tmp_path / "sender.err").read_text()[-2000:]
    finally:
        watching.set()
        watcher.join()
        for p in (tx, writer):
            if p.poll() is None:
                p.kill()
        rx.stop()
    rounds = count_rounds()
    identical = sha256(src) == sha256(dst)
    warm = min(5.0, MINUTES / 6) * 60
    at_warm = [s for s in samples if abs(s["t"] - warm) <= 30]
    at_end = samples[-3:]
    figures = {
        "minutes": MINUTES, "rounds": rounds, "writes": writes, "identical": identical,
        "tx_rss_warm": statistics.median(s["tx_rss_mib"] for s in at_warm),
        "tx_rss_end": statistics.median(s["tx_rss_mib"] for s in at_end),
        "rx_rss_warm": statistics.median(s["rx_rss_mib"] for s in at_warm),
        "rx_rss_end": statistics.median(s["rx_rss_mib"] for s in at_end),
        # descriptors: a sample taken during a round also counts its connection and files; a
        # leaked descriptor stays, so the typical (median) count is what must not grow
        **{f"{side}_fds_{period}_{how.__name__}": how(s[f"{side}_fds"] for s in samples
                                                      if (s["t"] <= warm + 30) == (period == "warm"))
           for side in ("tx", "rx") for period in ("warm", "after") for how in (statistics.median, max)},
        "max_seconds_since_round": max(s["seconds_since_round"] for s in samples if s["t"] > warm),
        "samples": samples,
    }
    if os.environ.get("SMSREPL_SOAK_OUT"):
        with open(os.environ["SMSREPL_SOAK_OUT"], "w") as fh:
            json.dump(figures, fh, indent=1)
    record_property("tries", rounds)
    print(json.dumps({k: v for k, v in figures.items() if k != "samples"}))
    assert identical, "target differs from the source after the cutover"
    for side in ("tx", "rx"):
        growth = figures[f"{side}_rss_end"] / figures[f"{side}_rss_warm"] - 1
        assert growth < 0.10, f"{side} RSS grew {growth:.1%} after the warm-up"
        assert figures[f"{side}_fds_after_median"] <= figures[f"{side}_fds_warm_median"], f"{side} descriptors grew"
    assert figures["max_seconds_since_round"] < 10 * INTERVAL, "replication lag is not bounded"
