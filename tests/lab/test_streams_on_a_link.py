"""Parallel streams where they matter: a long, lossy, emulated link (lab.linkemu), on which one
TCP connection stays well below the rate. --streams auto reads the round trip, runs over
several connections and finishes sooner, and the target is byte-identical."""
from __future__ import annotations

import filecmp
import json
import os
import re
import subprocess
import sys
import time

import pytest

from smsrepl.lab.linkemu import LinkEmulator, unavailable
from smsrepl.lab.testdata import write_image
from smsrepl.transport.streams_auto import AUTO_MAX

CLI = [sys.executable, "-m", "smsrepl"]
pytestmark = pytest.mark.skipif(bool(unavailable()), reason=f"link emulator unavailable: {unavailable()}")


def _send(link: LinkEmulator, tmp, ck: str, src: str, streams: str, run: int) -> tuple[float, str]:
    base = tmp / f"run{run}"
    base.mkdir()
    target = str(base / "t.img")
    rx = link.run_in("b", CLI + ["receive", "--listen", f"{link.addr('b')}:8900", "--certkey", ck, "--create",
                                 "--target", f"disk0={target}", "--state-dir", str(base / "rx"), "--once"],
                     stderr=subprocess.PIPE, text=True)
    try:
        assert "listening" in rx.stderr.readline()
        t0 = time.perf_counter()
        tx = link.run_in("a", CLI + ["send", "block", "--json", src, "--to", f"{link.addr('b')}:8900", "-v",
                                     "--target", "disk0", "--certkey", ck, "--state-dir", str(base / "tx"),
                                     "--level", "0", "--streams", streams],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = tx.communicate(timeout=300)
        wall = time.perf_counter() - t0
        assert tx.returncode == 0, err
        json.loads(out.strip().splitlines()[-1])
        rx.wait(30)
        assert filecmp.cmp(src, target, shallow=False)
        return wall, err
    finally:
        if rx.poll() is None:
            rx.kill()
        rx.wait()
        os.unlink(target)


def test_auto_streams_beat_one_connection_on_a_long_lossy_link(tmp_path, certkey_file):
    src = str(tmp_path / "src.img")
    write_image(src, 96 << 20, seed=3, mix={"text": 0.3, "random": 0.6, "zero": 0.1})
    with LinkEmulator(1e9, 25.0, loss=0.001, cc="cubic") as link:
        one, auto = [], []
        for run in range(4):  # interleaved: what the machine does meanwhile hits both alike
            one.append(_send(link, tmp_path, certkey_file, src, "1", 2 * run)[0])
            wall, err = _send(link, tmp_path, certkey_file, src, "auto", 2 * run + 1)
            auto.append(wall)
            # 50 ms: four; the SYN's round trip, which auto counts by, only ever reads longer (a
            # forwarder starved by other work added 10 ms once: five), never shorter
            got = re.search(r"runs over (\d+) connections", err)
            assert got and 4 <= int(got.group(1)) <= AUTO_MAX, err
            # two pairs, and up to two more where other work starved the emulator's forwarder
            # (then the CPU, not the link, bounds both: beside two other test runs, 2.3 s each)
            if run >= 1 and min(auto) < 0.85 * min(one):
                break
    # measured on a loaded 2-core machine: one connection 35-57% of the rate, four 67-72%
    assert min(auto) < 0.85 * min(one), (one, auto)
