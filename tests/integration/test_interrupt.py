"""SIGINT or SIGTERM during a one-shot send stops it within a second: one line saying where it got
to, exit 3 (resumable), and the same command run again resumes and ends with an identical target.

The copies run under a speed limit (so they are mid-transfer when the signal comes, and the
limiter's paced sleeps are among what must not hold the stop up). The time from the signal to
the exit is asserted with room for a loaded machine (STOP_BOUND); the figures measured are
printed (pytest -s)."""
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from smsrepl.lab.testdata import write_image

from .procs import CLI, ReceiverProc, round_summaries, send_args, sha256, wait_until

MiB = 1 << 20
#: the sender stops in about 0.1 s on an idle machine, and exits on its own at 0.8 s at the latest
#: (interrupt.GRACE); the rest is room for a busy shared machine
STOP_BOUND = 2.5
LINE = re.compile(r"^interrupted at (\d+(\.\d+)? (B|KiB|MiB)) of (\d+(\.\d+)? MiB); rerun the same command to resume$")


def _limit(path, speed: int) -> str:
    path.write_text(json.dumps({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": speed}]}))
    return str(path)


class Run:
    """A send with --progress json whose reports are read as they come."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.reports: list[dict] = []
        self.stdout_lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.stdout_lines.append(line)
            self.reports.append(json.loads(line))

    def interrupt(self, sig: int) -> tuple[int, float, str]:
        """Send ``sig``; (exit code, seconds from the signal to the exit, stderr)."""
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        seconds = time.monotonic() - t0
        self._t.join(10)
        return rc, seconds, self.proc.stderr.read()


def _check_interrupted(rc: int, seconds: float, stderr: str, what: str, total: str) -> str:
    print(f"{what}: stopped {seconds:.3f} s after the signal")
    assert rc == 3, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr  # the line, nothing else (no traceback, no summary)
    m = LINE.match(lines[0])
    assert m, lines[0]
    assert m.group(4) == total, lines[0]
    assert seconds < STOP_BOUND, f"{what}: {seconds:.2f} s from the signal to the exit"
    return m.group(1)


@pytest.mark.reliability("interruption", "a block copy under a speed limit: SIGINT/SIGTERM, exit 3, resumed")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_block_copy_stops_at_once_exits_3_and_the_same_command_resumes(tmp_path, certkey_file, sig):
    source = tmp_path / "source.img"
    write_image(str(source), 32 * MiB, seed=7, mix={"random": 1.0})
    target = tmp_path / "target.img"
    rx = ReceiverProc(certkey_file, {"disk0": str(target)}, str(tmp_path / "rx"))
    limit = tmp_path / "limit.json"
    try:
        args = send_args(str(source), rx.address, certkey_file, str(tmp_path / "tx"), "disk0", "--level", "0",
                         "--progress", "json", "--speed-limit", _limit(limit, 32))  # 32 MiB: 8 s
        run = Run(args)
        # past the first 8 MiB frame (reports move within a frame as it leaves: the receiver's
        # checkpoint, what a rerun resumes from, covers whole frames only)
        assert wait_until(lambda: any(8 * MiB < r["replicatesize"] < r["totalsize"] for r in run.reports), 60), \
            run.proc.stderr.read() if run.proc.poll() is not None else "no progress"
        time.sleep(0.5)  # well inside the paced copy
        rc, seconds, stderr = run.interrupt(sig)
        at = _check_interrupted(rc, seconds, stderr, f"block {sig.name}", "32.0 MiB")
        assert at != "32.0 MiB"
        assert sha256(str(source)) != sha256(str(target))  # it did stop mid-copy
        for line in run.stdout_lines:  # stdout: the 5.4.8 reports before the signal only
            assert set(json.loads(line)) >= {"subtask_name", "progress"}

        _limit(limit, 0)  # speed 0: no limit; the same command, run again
        cp = subprocess.run(args, capture_output=True, text=True, timeout=120)
    finally:
        rx.stop()
    assert cp.returncode == 0, cp.stderr
    summary, after = round_summaries(cp.stderr)  # send_args asks for --json; then the sync round
    assert (summary["round"], summary["kind"]) == (1, "full")
    assert summary["resumed_from"] > 0, summary  # not from the start
    assert (after["round"], after["kind"]) == (2, "sync")
    assert sha256(str(source)) == sha256(str(target))


def _tree(root, files: int, size: int) -> None:
    for i in range(files):
        d = root / f"d{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:03d}").write_bytes(os.urandom(size))


def _files_identical(a, b) -> bool:
    return subprocess.run(["diff", "-r", str(a), str(b)], capture_output=True).returncode == 0


def _files_arrived(root, n: int) -> bool:
    """At least ``n`` files (under temporary names until their directory is done) in ``root``:
    the first n - 1 arrived whole."""
    return sum(len(files) for _, _, files in os.walk(root)) >= n


@pytest.mark.reliability("interruption", "a file copy under a speed limit: SIGINT/SIGTERM, exit 3, resumed")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_file_copy_stops_at_once_exits_3_and_the_same_command_resumes(tmp_path, certkey_file, sig):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src, 40, 512 << 10)  # 20 MiB
    dst.mkdir()
    rx = ReceiverProc(certkey_file, {"tree": str(dst)}, str(tmp_path / "rx"))
    limit = tmp_path / "limit.json"
    try:
        args = CLI + ["send", "files", str(src), "--to", rx.address, "--target", "tree", "--certkey", certkey_file,
                      "--level", "0", "--progress", "json", "--speed-limit", _limit(limit, 8)]  # 21 s
        run = Run(args)
        assert wait_until(lambda: _files_arrived(dst, 3) or run.proc.poll() is not None, 60)
        time.sleep(0.5)
        rc, seconds, stderr = run.interrupt(sig)
        _check_interrupted(rc, seconds, stderr, f"files {sig.name}", "20.0 MiB")
        assert not _files_identical(src, dst)

        _limit(limit, 0)
        cp = subprocess.run(args, capture_output=True, text=True, timeout=120)
    finally:
        rx.stop()
    assert cp.returncode == 0, cp.stderr
    m = re.search(r"^sent (\d+) files, .*unchanged (\d+) in", cp.stderr, re.M)
    assert m and int(m.group(2)) > 0 and int(m.group(1)) < 40, cp.stderr  # what arrived before is kept
    assert _files_identical(src, dst)


def test_a_file_copy_without_progress_reports_says_how_much_it_sent(tmp_path, certkey_file):
    """Without --progress the round's total is not walked: the line says what was dealt with."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src, 40, 512 << 10)
    dst.mkdir()
    rx = ReceiverProc(certkey_file, {"tree": str(dst)}, str(tmp_path / "rx"))
    try:
        proc = subprocess.Popen(CLI + ["send", "files", str(src), "--to", rx.address, "--target", "tree",
                                       "--certkey", certkey_file, "--level", "0",
                                       "--speed-limit", _limit(tmp_path / "limit.json", 8)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert wait_until(lambda: _files_arrived(dst, 1), 60)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        rx.stop()
    assert proc.returncode == 3, err
    assert out == ""
    assert re.fullmatch(r"interrupted after \d+(\.\d+)? (B|KiB|MiB); rerun the same command to resume\n", err), err


def test_an_interrupt_before_the_session_opens_is_exit_3_too(tmp_path, certkey_file):
    """A receiver that never answers the TLS handshake: the sender is still connecting."""
    source = tmp_path / "source.img"
    write_image(str(source), 1 * MiB, seed=1)
    mute = socket.create_server(("127.0.0.1", 0))
    try:
        proc = subprocess.Popen(send_args(str(source), f"127.0.0.1:{mute.getsockname()[1]}", certkey_file,
                                          str(tmp_path / "tx")),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        conn, _ = mute.accept()  # the sender connected and waits for the handshake's answer
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        seconds = time.monotonic() - t0
        conn.close()
    finally:
        mute.close()
    print(f"before the session: stopped {seconds:.3f} s after the signal")
    assert proc.returncode == 3, err
    assert err == "interrupted before the transfer started; rerun the same command to resume\n", err
    assert out == ""
    assert seconds < STOP_BOUND

