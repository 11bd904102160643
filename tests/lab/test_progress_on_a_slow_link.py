"""Progress reports on a slow link with no speed limit, over two connections: each connection
queues a frame or so beyond the one it writes, and the socket takes a frame over a second or
more. Reports counted frames as they were queued: a 12 MiB copy at 10 Mbit/s reported 0%,
then nothing for 10 s, then 100%. They now follow what reached the socket, every second."""
from __future__ import annotations

import filecmp
import json
import subprocess
import sys
import time

import pytest

from smsrepl.lab.linkemu import LinkEmulator, unavailable
from smsrepl.lab.testdata import write_image
from tests.report_checks import assert_reports_follow_the_socket

CLI = [sys.executable, "-m", "smsrepl"]
MiB = 1 << 20
RATE = 10e6  # bits per second, each way
pytestmark = pytest.mark.skipif(bool(unavailable()), reason=f"link emulator unavailable: {unavailable()}")


@pytest.mark.parametrize("kind", ["block", "files"])
def test_reports_follow_the_socket_every_second_on_a_slow_link(tmp_path, certkey_file, kind):
    if kind == "block":
        source = tmp_path / "src.img"
        write_image(str(source), 5 * MiB, seed=6, mix={"random": 1.0})
        target = tmp_path / "dst.img"
        spec = f"t={target}"
    else:
        source = tmp_path / "src"
        (source / "d").mkdir(parents=True)
        write_image(str(source / "d" / "big"), 5 * MiB, seed=6, mix={"random": 1.0})
        (source / "d" / "small").write_bytes(b"x" * 5000)
        target = tmp_path / "dst"
        target.mkdir()
        spec = f"t={target}"
    with LinkEmulator(RATE, 2.0) as link:
        rx = link.run_in("b", CLI + ["receive", "--listen", f"{link.addr('b')}:8900", "--certkey", certkey_file,
                                     "--create", "--target", spec, "--state-dir", str(tmp_path / "rx"), "--once"],
                         stderr=subprocess.PIPE, text=True)
        try:
            assert "listening" in rx.stderr.readline()
            tx = link.run_in("a", CLI + ["send", kind, str(source), "--to", f"{link.addr('b')}:8900", "--target", "t",
                                         "--certkey", certkey_file, "--state-dir", str(tmp_path / "tx"),
                                         "--level", "0", "--streams", "2", "--progress", "json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            arrivals = []
            for line in tx.stdout:
                arrivals.append((time.monotonic(), json.loads(line)))
            assert tx.wait(60) == 0, tx.stderr.read()
            rx.wait(30)
        finally:
            if rx.poll() is None:
                rx.kill()
            rx.wait()
    if kind == "block":
        assert filecmp.cmp(source, target, shallow=False)
    else:
        assert subprocess.run(["diff", "-r", str(source), str(target)]).returncode == 0
    # what the link can have carried, and the two connections' socket buffers beside it
    assert_reports_follow_the_socket(arrivals, RATE / 8)
