"""`receive --log-file FILE` and `--log-format json`: the receiver as a service keeps its log in a
file (appended, reopened after logrotate and on SIGHUP), as text or one JSON object a line."""
import json
import logging
import os
import re
import signal
import subprocess

import pytest

from smsrepl.cli.logsetup import JsonFormatter
from smsrepl.lab.testdata import write_image

from .procs import CLI, ReceiverProc, send, sha256, wait_until

MiB = 1 << 20


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source.img"
    write_image(str(path), 4 * MiB, seed=7, mix={"random": 1.0})
    return str(path)


def _json_lines(path) -> list[dict]:
    lines = path.read_text().splitlines()
    assert lines
    return [json.loads(line) for line in lines]  # every line is one object


def test_json_log_file_holds_the_listen_line_and_rounds_with_their_fields(tmp_path, certkey_file, source):
    log = tmp_path / "rx.log"
    log.write_text(json.dumps({"earlier": True}) + "\n")  # appended to, not replaced
    target = tmp_path / "target.img"
    rx = ReceiverProc(certkey_file, {"disk0": str(target)}, str(tmp_path / "rx"),
                      "--log-file", str(log), "--log-format", "json")
    try:
        cp = send(source, rx.address, certkey_file, str(tmp_path / "tx"))
        assert cp.returncode == 0, cp.stderr
        assert wait_until(lambda: "round 1 done" in log.read_text(), 10)
    finally:
        rx.stop()
    assert sha256(source) == sha256(str(target))
    records = _json_lines(log)
    assert records[0] == {"earlier": True}
    for rec in records[1:]:
        assert {"time", "level", "logger", "message"} <= rec.keys(), rec
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["time"]), rec
    listen = [r for r in records[1:] if r["message"].startswith("listening on 127.0.0.1:")]
    assert len(listen) == 1 and listen[0]["port"] == rx.port and listen[0]["level"] == "INFO"
    done = [r for r in records[1:] if "round 1 done" in r["message"]]
    assert len(done) == 1, records
    assert done[0]["logger"] == "smsrepl.receiver.rounds" and done[0]["target"] == "disk0"
    assert done[0]["round_id"] == 1 and done[0]["bytes_written"] > 0 and done[0]["peer"].startswith("127.0.0.1:")
    # stderr keeps only the listen line (the tests and a shell read it); the rounds are in the file
    assert not any("round 1 done" in line for line in rx.log), rx.log


def test_text_log_file_is_reopened_after_logrotate_and_on_sighup(tmp_path, certkey_file, source):
    log = tmp_path / "rx.log"
    rx = ReceiverProc(certkey_file, {"disk0": str(tmp_path / "target.img")}, str(tmp_path / "rx"),
                      "--log-file", str(log))
    try:
        assert cp_ok(send(source, rx.address, certkey_file, str(tmp_path / "tx")))
        assert wait_until(lambda: "round 1 done" in log.read_text(), 10)
        assert re.search(r"^\S+ \S+ smsrepl.receiver.service INFO listening on 127.0.0.1:\d+$", log.read_text(), re.M)
        os.rename(log, tmp_path / "rx.log.1")  # what logrotate does, then it sends SIGHUP
        rx.proc.send_signal(signal.SIGHUP)
        assert wait_until(log.exists, 10)  # reopened at once, not at the next line
        assert cp_ok(send(source, rx.address, certkey_file, str(tmp_path / "tx")))
        assert wait_until(lambda: "round 2 done" in log.read_text(), 10)
        assert rx.proc.poll() is None  # SIGHUP no longer ends the receiver
    finally:
        rx.stop()
    assert "round 2 done" not in (tmp_path / "rx.log.1").read_text()
    assert "round 1 done" not in log.read_text()


def test_sighup_without_a_log_file_does_not_end_the_receiver(tmp_path, certkey_file, source):
    """systemctl reload sends SIGHUP whatever the logging: the journal case must survive it."""
    rx = ReceiverProc(certkey_file, {"disk0": str(tmp_path / "target.img")}, str(tmp_path / "rx"))
    try:
        rx.proc.send_signal(signal.SIGHUP)
        assert not wait_until(lambda: rx.proc.poll() is not None, 1)
        assert cp_ok(send(source, rx.address, certkey_file, str(tmp_path / "tx")))
    finally:
        rx.stop()
    assert sha256(source) == sha256(str(tmp_path / "target.img"))


def cp_ok(cp) -> bool:
    assert cp.returncode == 0, cp.stderr
    return True


@pytest.mark.parametrize("where", ["missing directory", "a directory", "under a file"])
def test_a_log_file_that_cannot_be_opened_is_one_line_exit_2(tmp_path, certkey_file, where):
    (tmp_path / "plain").write_text("x")
    path = {"missing directory": tmp_path / "nope" / "rx.log", "a directory": tmp_path,
            "under a file": tmp_path / "plain" / "rx.log"}[where]
    before = sorted(os.listdir(tmp_path))
    cp = subprocess.run(CLI + ["receive", "--listen", "127.0.0.1:0", "--certkey", certkey_file,
                               "--state-dir", str(tmp_path / "state"), "--target", f"disk0={tmp_path / 't.img'}",
                               "--log-file", str(path)], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2, cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"--log-file {str(path)!r} cannot be opened"), cp.stderr
    assert sorted(os.listdir(tmp_path)) == before  # no state dir, no target, no log
    assert (tmp_path / "plain").read_text() == "x"


def test_log_format_is_text_or_json(tmp_path, certkey_file):
    cp = subprocess.run(CLI + ["receive", "--listen", "127.0.0.1:0", "--certkey", certkey_file,
                               "--target", f"disk0={tmp_path / 't.img'}", "--log-format", "xml"],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2 and "--log-format: invalid choice: 'xml'" in cp.stderr, cp.stderr
    assert os.listdir(tmp_path) == []


def test_json_formatter_carries_extra_fields_and_the_exception():
    rec = logging.LogRecord("smsrepl.receiver", logging.WARNING, __file__, 1, "%s: target %s: %s",
                            ("10.0.0.1:5", "disk0", "full"), None)
    rec.peer, rec.target, rec.size = "10.0.0.1:5", "disk0", object()
    out = json.loads(JsonFormatter().format(rec))
    assert out["message"] == "10.0.0.1:5: target disk0: full" and out["level"] == "WARNING"
    assert out["logger"] == "smsrepl.receiver" and out["peer"] == "10.0.0.1:5" and out["target"] == "disk0"
    assert out["size"].startswith("<object")  # what JSON cannot hold is given as text
    assert out["time"].endswith("Z") and "args" not in out and "msg" not in out
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec.exc_info = sys.exc_info()
    assert "ValueError: boom" in json.loads(JsonFormatter().format(rec))["exception"]
