"""`smsrepl status --to HOST:PORT --certkey FILE`: a receiver's targets and running sessions,
over the same mutual TLS as a transfer; a receiver without the "status" capability is named."""
import json
import os
import subprocess

import pytest

from smsrepl.lab.certs import make_bundle, write_certkey
from smsrepl.protocol import frames as F
from smsrepl.lab.testdata import write_image
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.tls import server_context

from .procs import CLI, ReceiverProc, send, send_args, wait_until

MiB = 1 << 20


def status(address: str, certkey: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["status", "--to", address, "--certkey", certkey, *extra],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def two_targets(tmp_path, certkey_file):
    """A receiver with a directory target (one completed files round) and an image target busy
    with a sender held at 8 Mbit/s mid-transfer."""
    (tmp_path / "src-tree").mkdir()
    (tmp_path / "src-tree" / "a.txt").write_text("a")
    big = tmp_path / "big.img"
    write_image(str(big), 32 * MiB, seed=3, mix={"random": 1.0})
    (tmp_path / "tree").mkdir()
    rx = ReceiverProc(certkey_file, {"disk0": str(tmp_path / "disk0.img"), "tree": str(tmp_path / "tree")},
                      str(tmp_path / "rx"))
    limit = tmp_path / "slow.json"
    limit.write_text(json.dumps({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 8}]}))
    slow = None
    try:
        cp = subprocess.run(CLI + ["send", "files", str(tmp_path / "src-tree"), "--to", rx.address, "--target", "tree",
                                   "--certkey", certkey_file], capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stderr
        slow = subprocess.Popen(send_args(str(big), rx.address, certkey_file, str(tmp_path / "tx-big"), "disk0",
                                          "--level", "0", "--speed-limit", str(limit)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        yield rx, tmp_path, slow
    finally:
        if slow is not None:
            slow.kill()
            slow.wait(10)
        rx.stop()


def _busy_report(rx, certkey_file, slow) -> dict:
    got = {}

    def running() -> bool:
        cp = status(rx.address, certkey_file, "--json")
        assert cp.returncode == 0, cp.stderr
        got.update(json.loads(cp.stdout))
        return bool(got["sessions"]) and got["sessions"][0]["bytes_received"] > MiB  # data flows

    assert wait_until(running, 60), (got, slow.poll() is None or slow.stderr.read())
    return got


def test_status_lists_both_targets_and_the_running_session(two_targets, certkey_file):
    rx, tmp_path, slow = two_targets
    report = _busy_report(rx, certkey_file, slow)
    targets = {t["name"]: t for t in report["targets"]}
    assert set(targets) == {"disk0", "tree"}
    disk, tree = targets["disk0"], targets["tree"]
    assert disk["kind"] == "block" and disk["busy"] and disk["path"] == str(tmp_path / "disk0.img")
    assert tree["kind"] == "directory" and not tree["busy"] and tree["path"] == str(tmp_path / "tree")
    assert tree["last_round"]["round_id"] == 1 and tree["last_round"]["kind"] == "files"
    assert tree["last_round"]["complete"] and tree["last_round"]["time"].endswith("Z")
    last = disk["last_round"]  # the slow round has begun: its record is the running one
    assert last["kind"] == "full" and last["round_id"] == 1 and not last["complete"] and not last["verified"]
    [session] = report["sessions"]
    assert session["target"] == "disk0" and session["kind"] == "block"
    assert session["peer"].startswith("127.0.0.1:") and session["started"].endswith("Z")
    assert session["rounds"] == 0
    # the table: both targets, the busy one's session and its peer
    cp = status(rx.address, certkey_file)
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    assert lines[0].split()[:3] == ["TARGET", "KIND", "SIZE"]
    assert any(line.split()[:2] == ["disk0", "block"] and "running" in line for line in lines), cp.stdout
    assert any(line.split()[:2] == ["tree", "directory"] for line in lines), cp.stdout
    assert any(line.startswith("disk0") and session["peer"] in line for line in lines), cp.stdout
    assert cp.stderr == ""


def test_status_of_an_idle_receiver_shows_the_last_completed_round(tmp_path, certkey_file):
    src = tmp_path / "src.img"
    write_image(str(src), 1 * MiB, seed=5, mix={"random": 1.0})
    rx = ReceiverProc(certkey_file, {"disk0": str(tmp_path / "t.img")}, str(tmp_path / "rx"))
    try:
        assert send(str(src), rx.address, certkey_file, str(tmp_path / "tx")).returncode == 0
        cp = status(rx.address, certkey_file, "--json")
        table = status(rx.address, certkey_file)
    finally:
        rx.stop()
    assert cp.returncode == 0 and table.returncode == 0, cp.stderr + table.stderr
    assert table.stdout.splitlines()[-1] == "no running sessions"
    assert "1.0 MiB" in table.stdout.splitlines()[1] and table.stdout.splitlines()[1].endswith("yes")
    report = json.loads(cp.stdout)
    assert report["sessions"] == []
    [disk] = report["targets"]
    assert disk["size"] == MiB and not disk["busy"]
    assert disk["last_round"]["round_id"] == 1 and disk["last_round"]["complete"] and disk["last_round"]["verified"]


def test_a_status_request_with_another_bundle_is_refused_exit_4(tmp_path, certkey_file):
    other = str(write_certkey(str(tmp_path / "other"), make_bundle()))
    target = tmp_path / "t.img"
    rx = ReceiverProc(certkey_file, {"disk0": str(target)}, str(tmp_path / "rx"))
    try:
        cp = status(rx.address, other)
        assert rx.proc.poll() is None
    finally:
        rx.stop()
    assert cp.returncode == 4, cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("SMS.0304"), cp.stderr
    assert cp.stdout == "" and not target.exists()


def test_a_receiver_without_the_status_capability_is_named(tmp_path, bundle, certkey_file, monkeypatch):
    """An older receiver answers a HELLO of kind "status" as any unknown kind: refused."""
    from smsrepl.transport import server
    from smsrepl.transport.status import fetch_status
    from smsrepl.transport.tls import client_context
    from smsrepl.errors import RefusedError

    monkeypatch.delitem(server.SESSION_KINDS, "status")
    rx = Receiver({"disk0": str(tmp_path / "t.img")}, server_context(bundle), str(tmp_path / "rx"), create=True)
    addr = rx.start()
    try:
        with pytest.raises(RefusedError) as exc:
            fetch_status(addr, client_context(bundle))
    finally:
        rx.stop()
    assert exc.value.exit_code == 4
    assert str(exc.value) == (f"the receiver at {addr[0]}:{addr[1]} cannot report its status (it does not list "
                              "the 'status' capability: its smsrepl is older than this one)")
    assert not (tmp_path / "t.img").exists()


def test_a_status_request_does_not_end_a_receive_once(tmp_path, certkey_file):
    rx = ReceiverProc(certkey_file, {"disk0": str(tmp_path / "t.img")}, str(tmp_path / "rx"), "--once")
    try:
        assert status(rx.address, certkey_file).returncode == 0
        assert not wait_until(lambda: rx.proc.poll() is not None, 1)
    finally:
        rx.stop()
    assert not os.path.exists(tmp_path / "t.img")
