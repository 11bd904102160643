"""What a send prints: one human summary line a round (stdout; stderr with --progress json), the
JSON summary only with --json, --progress json stdout of 5.4.8 reports only, and a progress bar
that log lines never run through and that is closed before the summary."""
import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from smsrepl.control.progress import EMITTED_FIELDS, report_problems
from smsrepl.lab.testdata import write_image

from tests.report_checks import assert_reports_follow_the_socket

from .procs import CLI, ReceiverProc, sha256, wait_until

MiB = 1 << 20
BLOCK_LINE = re.compile(r"^sent (?P<sent>[\d.]+ (B|KiB|MiB)) of 16\.0 MiB \(wire [\d.]+ (B|KiB|MiB), (?P<ratio>[\d.]+x|-)\) "
                        r"in [\d.]+ s, [\d.]+ (bit/s|kbit/s|Mbit/s|Gbit/s); round (?P<round>\d+) (?P<kind>full|sync)(?P<cutover>, the cutover)?$")
FILES_LINE = re.compile(r"^sent (?P<files>\d+) files?, [\d.]+ (B|KiB|MiB) \(wire [\d.]+ (B|KiB|MiB), ([\d.]+x|-)\), "
                        r"deleted (?P<deleted>\d+), unchanged (?P<unchanged>\d+) in [\d.]+ s, "
                        r"[\d.]+ (bit/s|kbit/s|Mbit/s|Gbit/s); round (?P<round>\d+) (?P<kind>full|sync)$")
BLOCK_SUMMARY_KEYS = {"round", "kind", "resumed_from", "source_bytes", "data_bytes", "wire_bytes", "seconds",
                      "dirty_blocks", "stages", "reconcile"}  # reconcile: a first copy has no local state


@pytest.fixture
def lab(tmp_path, certkey_file):
    source = tmp_path / "source.img"
    write_image(str(source), 16 * MiB, seed=3, mix={"random": 0.5, "zero": 0.5})
    target = tmp_path / "target.img"
    rx = ReceiverProc(certkey_file, {"disk0": str(target)}, str(tmp_path / "rx"))
    yield {"source": str(source), "target": str(target), "rx": rx, "ck": certkey_file, "tx": str(tmp_path / "tx")}
    rx.stop()


def _block(lab, *extra: str, verbose: bool = False) -> list[str]:
    return CLI + ["-v"] * verbose + ["send", "block", lab["source"], "--to", lab["rx"].address, "--target", "disk0",
                                     "--certkey", lab["ck"], "--state-dir", lab["tx"], *extra]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_a_block_send_prints_one_human_line_on_stdout_and_nothing_else(lab):
    cp = _run(_block(lab))
    assert cp.returncode == 0, cp.stderr
    assert cp.stderr == ""
    lines = cp.stdout.splitlines()
    assert len(lines) == 1, cp.stdout
    m = BLOCK_LINE.match(lines[0])
    assert m, lines[0]
    assert (m["round"], m["kind"]) == ("1", "full")
    assert sha256(lab["source"]) == sha256(lab["target"])

    cp = _run(_block(lab))  # nothing changed: a sync round that sends nothing
    assert cp.returncode == 0, cp.stderr
    m = BLOCK_LINE.match(cp.stdout.strip())
    assert m, cp.stdout
    assert (m["sent"], m["ratio"], m["round"], m["kind"]) == ("0 B", "-", "2", "sync")
    assert sha256(lab["source"]) == sha256(lab["target"])


def test_json_prints_the_json_summary_instead_of_the_line(lab):
    cp = _run(_block(lab, "--json"))
    assert cp.returncode == 0, cp.stderr
    assert cp.stderr == ""
    lines = cp.stdout.splitlines()
    assert len(lines) == 1, cp.stdout
    summary = json.loads(lines[0])
    assert set(summary) == BLOCK_SUMMARY_KEYS
    assert (summary["round"], summary["kind"], summary["source_bytes"]) == (1, "full", 16 * MiB)
    assert sha256(lab["source"]) == sha256(lab["target"])


def test_freeze_of_a_source_with_nothing_mounted_says_there_is_nothing_to_freeze(lab):
    # an image file: no file system is mounted from it here, so --freeze cannot make its copy consistent
    cp = _run(_block(lab, "--freeze", "--json"))
    assert cp.returncode == 0, cp.stderr
    assert cp.stderr.strip() == (f"note: --freeze: no file system is mounted from {lab['source']} here; "
                                 f"there is nothing to freeze"), cp.stderr
    assert "quiesced" not in json.loads(cp.stdout)
    assert sha256(lab["source"]) == sha256(lab["target"])


def _only_reports(stdout: str) -> list[dict]:
    reports = []
    for line in stdout.splitlines():
        rep = json.loads(line)  # every line parses
        assert set(rep) == set(EMITTED_FIELDS), line
        assert report_problems(rep, require_all=True) == [], line
        reports.append(rep)
    assert reports and reports[-1]["progress"] == 100
    return reports


@pytest.mark.parametrize("as_json", [False, True], ids=["line", "json"])
def test_progress_json_stdout_carries_only_5_4_8_reports_and_the_summary_goes_to_stderr(lab, as_json):
    cp = _run(_block(lab, "--progress", "json", *(["--json"] if as_json else [])))
    assert cp.returncode == 0, cp.stderr
    _only_reports(cp.stdout)
    lines = cp.stderr.splitlines()
    assert len(lines) == 1, cp.stderr
    if as_json:
        assert set(json.loads(lines[0])) == BLOCK_SUMMARY_KEYS
    else:
        assert BLOCK_LINE.match(lines[0]), lines[0]
    assert sha256(lab["source"]) == sha256(lab["target"])


def _visible_lines(text: str) -> list[str]:
    """What a terminal shows of each line: a carriage return starts it over."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n")]


def test_the_bar_never_runs_through_log_lines_and_is_closed_before_the_summary(lab, tmp_path):
    write_image(lab["source"], 16 * MiB, seed=3, mix={"random": 1.0})  # 17 s at 8 Mbit/s, unless let go
    limit = tmp_path / "limit.json"
    limit.write_text(json.dumps({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 8}]}))
    proc = subprocess.Popen(_block(lab, "--level", "0", "--progress", "bar", "--speed-limit", str(limit), verbose=True),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # one stream: the order shows
    out = bytearray()

    def read() -> None:
        while chunk := proc.stdout.read1(65536):
            out.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: b"%|" in out, 60), out.decode()  # the bar is shown
        time.sleep(0.3)
        # the watcher logs "speed limit reloaded" (INFO, -v) while the bar is shown; no limit now
        limit.write_text(json.dumps({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 0}]}))
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    text = out.decode()
    assert rc == 0, text
    visible = _visible_lines(text)
    reloaded = [line for line in visible if "speed limit reloaded" in line]
    assert len(reloaded) == 1, text
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ smsrepl INFO speed limit reloaded", reloaded[0]), text
    for line in visible:  # no line shows bar and log text together
        assert not ("%|" in line and " INFO " in line), repr(line)
    # the summary is the last line; the bar's last drawing is just above it, closed at 100 %
    # with the round's average rate (not the 0 Mbit/s of a round that ended)
    assert visible[-1] == ""
    assert BLOCK_LINE.match(visible[-2]), text
    last_bar = visible[-3]
    assert "100%|" in last_bar and "on the wire, average]" in last_bar, repr(last_bar)
    assert not re.search(r"[ ,]0 (bit|Mbit)/s", last_bar), repr(last_bar)
    assert "%|" not in visible[-2] and text.count("sent ") == 1
    assert sha256(lab["source"]) == sha256(lab["target"])


def test_the_bar_is_drawn_on_a_terminal_that_reports_no_size(lab, tmp_path):
    # a serial console (a cloud VM's) or an unsized pty says 0 columns: tqdm drew a bar of no
    # width, that is nothing, for the whole copy
    write_image(lab["source"], 8 * MiB, seed=3, mix={"random": 1.0})
    limit = tmp_path / "limit.json"
    limit.write_text(json.dumps({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 32}]}))
    leader, follower = os.openpty()  # a new pty's size is 0 x 0
    assert os.get_terminal_size(follower).columns == 0
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    try:
        proc = subprocess.Popen(_block(lab, "--level", "0", "--progress", "bar", "--speed-limit", str(limit)),
                                stdout=subprocess.PIPE, stderr=follower, env=env)
        os.close(follower)
        out = bytearray()
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            out.extend(chunk)
        assert proc.wait(60) == 0, out.decode(errors="replace")
    finally:
        os.close(leader)
    drawings = [d for d in out.decode(errors="replace").split("\r") if "%|" in d]
    assert len(drawings) >= 3, out  # 8 MiB at 32 Mbit/s: 2 s, a drawing a second, the last two
    assert any(re.search(r" [1-9]\d%\|", d) for d in drawings), drawings  # one on the way
    assert all(len(d.strip()) <= 80 for d in drawings), drawings
    assert sha256(lab["source"]) == sha256(lab["target"])


@pytest.mark.parametrize("kind", ["block", "files"])
def test_a_reader_of_the_reports_that_goes_away_stops_the_reports_not_the_transfer(lab, tmp_path, kind):
    # `| head -1`, or an agent's wrapper that died: the next report met EPIPE and the run ended
    # in a traceback (files: exit 1; block: "this sender's state ...: Broken pipe", exit 3)
    limit = tmp_path / "limit.json"
    limit.write_text(json.dumps({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 32}]}))
    rx = None
    if kind == "block":
        write_image(lab["source"], 8 * MiB, seed=3, mix={"random": 1.0})
        args = _block(lab, "--level", "0", "--progress", "json", "--speed-limit", str(limit))
    else:
        src, dst = tmp_path / "src", tmp_path / "dst"
        (src / "d").mkdir(parents=True)
        dst.mkdir()
        write_image(str(src / "d" / "big"), 8 * MiB, seed=3, mix={"random": 1.0})
        rx = ReceiverProc(lab["ck"], {"tree": str(dst)}, str(tmp_path / "rx-files"))
        args = _files(tmp_path, rx, lab["ck"], "--level", "0", "--progress", "json", "--speed-limit", str(limit))
    try:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        json.loads(proc.stdout.readline())  # the first report, and the reader goes
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(60) == 0, err
    finally:
        if rx is not None:
            rx.stop()
    lines = err.splitlines()
    assert lines[0] == "progress reports stopped: stdout is closed (Broken pipe); the transfer goes on", err
    assert len(lines) == 2 and lines[1].startswith("sent "), err  # the summary; no traceback
    if kind == "block":
        assert sha256(lab["source"]) == sha256(lab["target"])
    else:
        assert _same_tree(src, dst)


def test_json_progress_moves_every_second_while_one_frame_is_paced(lab, tmp_path):
    # one 8 MiB frame at 16 Mbit/s: about 4 s on the socket. Reports came only as a read
    # chunk's frames had left, so none between the start and the end of that frame
    write_image(lab["source"], 8 * MiB, seed=4, mix={"random": 1.0})
    limit = tmp_path / "limit.json"
    limit.write_text(json.dumps({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 16}]}))
    proc = subprocess.Popen(_block(lab, "--level", "0", "--progress", "json", "--speed-limit", str(limit)),
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    arrivals: list[tuple[float, dict]] = []
    for line in proc.stdout:
        arrivals.append((time.monotonic(), json.loads(line)))
    assert proc.wait(60) == 0, proc.stderr.read()
    assert sha256(lab["source"]) == sha256(lab["target"])
    assert_reports_follow_the_socket(arrivals, 16e6 / 8, inside=2)  # the frame's own progress, not 0 -> all


def _files(tmp_path, rx, ck, *extra: str) -> list[str]:
    return CLI + ["send", "files", str(tmp_path / "src"), "--to", rx.address, "--target", "tree", "--certkey", ck,
                  *extra]


def _same_tree(a, b) -> bool:
    return subprocess.run(["diff", "-r", str(a), str(b)], capture_output=True).returncode == 0


def test_json_progress_of_a_file_send_follows_the_socket_every_second(tmp_path, certkey_file):
    # one 9 MiB file at 16 Mbit/s (2 MB/s): about 4.5 s on the socket. Files counted as done when
    # read: 99% came 2 s in (the op stream holds batches ahead of the socket), then nothing
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    dst.mkdir()
    write_image(str(src / "d" / "big"), 9 * MiB, seed=5, mix={"random": 1.0})
    for i in range(3):
        (src / "d" / f"small{i}").write_bytes(bytes([i]) * 50_000)
    limit = tmp_path / "limit.json"
    limit.write_text(json.dumps({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 16}]}))
    rx = ReceiverProc(certkey_file, {"tree": str(dst)}, str(tmp_path / "rx"))
    try:
        proc = subprocess.Popen(_files(tmp_path, rx, certkey_file, "--level", "0", "--progress", "json",
                                       "--speed-limit", str(limit)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        arrivals: list[tuple[float, dict]] = []
        for line in proc.stdout:
            arrivals.append((time.monotonic(), json.loads(line)))
        assert proc.wait(60) == 0, proc.stderr.read()
    finally:
        rx.stop()
    assert _same_tree(src, dst)
    assert_reports_follow_the_socket(arrivals, 16e6 / 8)


def test_a_file_send_prints_counts_and_sizes_in_one_line(tmp_path, certkey_file):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    dst.mkdir()
    for i in range(10):
        (src / "d" / f"f{i}").write_bytes(bytes([i]) * (100_000 + i))
    rx = ReceiverProc(certkey_file, {"tree": str(dst)}, str(tmp_path / "rx"))
    try:
        cp = _run(_files(tmp_path, rx, certkey_file))
        assert cp.returncode == 0, cp.stderr
        assert cp.stderr == ""
        m = FILES_LINE.match(cp.stdout.strip())
        assert m and len(cp.stdout.splitlines()) == 1, cp.stdout
        assert (m["files"], m["deleted"], m["unchanged"], m["round"], m["kind"]) == ("10", "0", "0", "1", "full")
        assert _same_tree(src, dst)

        (src / "d" / "f0").unlink()
        (src / "d" / "f1").unlink()
        (src / "d" / "f2").write_bytes(b"changed")
        cp = _run(_files(tmp_path, rx, certkey_file, "--progress", "json"))
        assert cp.returncode == 0, cp.stderr
        _only_reports(cp.stdout)
        m = FILES_LINE.match(cp.stderr.strip())
        assert m and len(cp.stderr.splitlines()) == 1, cp.stderr
        assert (m["files"], m["deleted"], m["unchanged"], m["kind"]) == ("1", "2", "7", "sync")
        assert _same_tree(src, dst)

        cp = _run(_files(tmp_path, rx, certkey_file, "--json"))
        assert cp.returncode == 0, cp.stderr
        summary = json.loads(cp.stdout)
        assert (summary["files_sent"], summary["deleted"], summary["unchanged"]) == (0, 0, 8)
    finally:
        rx.stop()


def test_continuous_prints_a_line_a_round_and_sigterm_is_still_the_cutover(lab):
    """--continuous keeps its signals: SIGTERM runs the cutover round and exits 0 (not 3)."""
    proc = subprocess.Popen(_block(lab, "--continuous", "--interval", "0.2", "--tracking", "scan"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: len(lines) >= 2 or proc.poll() is not None, 60), lines
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    err = proc.stderr.read()
    assert rc == 0, err
    assert "interrupted" not in err and "SIGTERM: running the cutover round" in err, err
    assert len(lines) >= 3, lines  # the copy, a sync round at least, the cutover
    rounds = [BLOCK_LINE.match(line) for line in lines]
    assert all(rounds), lines
    assert [m["kind"] for m in rounds] == ["full"] + ["sync"] * (len(rounds) - 1)
    assert [int(m["round"]) for m in rounds] == list(range(1, len(rounds) + 1))
    assert [bool(m["cutover"]) for m in rounds] == [False] * (len(rounds) - 1) + [True]
    assert sha256(lab["source"]) == sha256(lab["target"])
