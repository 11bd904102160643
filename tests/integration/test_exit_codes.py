"""The exit code an agent sees for each retryable and permanent failure of the README's table
(rows not covered here are in test_block_errors.py: another CA, expired certificates, plaintext
server, nothing listening, unknown target, target too small, target busy, target write failure;
test_file_sessions.py: bad input; tests/live/test_full_target.py: a really full disk).

3: rerun the same command (it resumes), an interrupted send too; 4: stop, rerunning will not help."""
import dataclasses
import os
import signal
import subprocess
import time

import pytest

from smsrepl.lab.certs import write_certkey
from smsrepl.lab.testdata import write_image

from .procs import CuttingProxy, ReceiverProc, send, send_args, sha256, wait_until

MiB = 1 << 20


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source.img"
    write_image(str(path), 16 * MiB, seed=4, mix={"random": 1.0})
    return str(path)


@pytest.fixture
def rx(tmp_path, certkey_file):
    proc = ReceiverProc(certkey_file, {"disk0": str(tmp_path / "target.img")}, str(tmp_path / "rx"))
    yield proc
    proc.stop()


def _one_line(cp) -> str:
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1, cp.stderr
    return lines[0]


def _resumes(source, rx, certkey_file, tx, target) -> None:
    """The rerun an agent makes after exit 3 completes, identical."""
    cp = send(source, rx.address, certkey_file, tx)
    assert cp.returncode == 0, cp.stderr
    assert sha256(source) == sha256(str(target))


@pytest.mark.reliability("exit codes", "permanent: a certificate of the wrong role (4)")
@pytest.mark.parametrize("wrong", ["server purpose", "client purpose, target role"])
def test_a_certificate_of_the_wrong_role_is_exit_4(tmp_path, source, wrong):
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from smsrepl.lab.certs import OU_TARGET_DATA, LabCA, make_bundle

    ca = LabCA.create()
    bundle = make_bundle(ca=ca)
    if wrong == "server purpose":  # the receiver's own data certificate: refused in the handshake
        cert, key = bundle.target_data_cert, bundle.target_data_private_key
    else:  # fit for a client, but it names the receiver's role: refused after the handshake
        cert, key = ca.issue(OU_TARGET_DATA, ou=OU_TARGET_DATA, eku=(ExtendedKeyUsageOID.CLIENT_AUTH,), san=False)
    good = str(write_certkey(tmp_path / "good", bundle))
    bad = str(write_certkey(tmp_path / "bad", dataclasses.replace(bundle, cert=cert, private_key=key)))
    rx = ReceiverProc(good, {"disk0": str(tmp_path / "target.img")}, str(tmp_path / "rx"))
    try:
        cp = send(source, rx.address, bad, str(tmp_path / "tx"))
    finally:
        rx.stop()
    assert cp.returncode == 4, cp.stderr  # not 3: an agent would retry for ever
    assert _one_line(cp).startswith("SMS.0304"), cp.stderr
    assert not os.path.exists(tmp_path / "target.img") or not any(open(tmp_path / "target.img", "rb").read())


@pytest.mark.reliability("exit codes", "retryable: the connection cut mid-copy (3), then resumed")
def test_a_connection_cut_mid_copy_is_exit_3_and_the_rerun_resumes(tmp_path, rx, certkey_file, source):
    proxy = CuttingProxy(rx.port, 6 * MiB)
    try:
        cp = send(source, f"127.0.0.1:{proxy.port}", certkey_file, str(tmp_path / "tx"), "disk0", "--level", "0")
    finally:
        proxy.close()
    assert cp.returncode == 3, cp.stderr
    assert _one_line(cp).startswith("SMS.0807"), cp.stderr
    _resumes(source, rx, certkey_file, str(tmp_path / "tx"), tmp_path / "target.img")


@pytest.mark.reliability("exit codes", "retryable: an I/O error on the receiver's disk (3)")
def test_an_io_error_on_the_target_is_exit_3_and_the_rerun_resumes(tmp_path, certkey_file, source):
    target = tmp_path / "target.img"
    failing = ReceiverProc(certkey_file, {"disk0": str(target)}, str(tmp_path / "rx"),
                           env={"SMSREPL_FAULTS": f"eio@target.write:{8 * MiB}"})
    try:
        cp = send(source, failing.address, certkey_file, str(tmp_path / "tx"), "disk0", "--level", "0")
    finally:
        failing.stop()
    assert cp.returncode == 3, cp.stderr
    line = _one_line(cp)
    assert line.startswith("SMS.2007") and "Input/output error" in line, line
    healed = ReceiverProc(certkey_file, {"disk0": str(target)}, str(tmp_path / "rx"))
    try:
        _resumes(source, healed, certkey_file, str(tmp_path / "tx"), target)
    finally:
        healed.stop()


@pytest.mark.reliability("exit codes", "retryable: an I/O error reading the source (3)")
def test_an_io_error_reading_the_source_is_exit_3_and_the_rerun_resumes(tmp_path, rx, certkey_file, source):
    cp = send(source, rx.address, certkey_file, str(tmp_path / "tx"), "disk0", "--level", "0",
              env={"SMSREPL_FAULTS": f"eio@source.read:{8 * MiB}"})
    assert cp.returncode == 3, cp.stderr
    line = _one_line(cp)
    assert line.startswith("SMS.1901") and "Input/output error" in line, line
    _resumes(source, rx, certkey_file, str(tmp_path / "tx"), tmp_path / "target.img")


@pytest.mark.reliability("exit codes", "retryable: the target held by another receiver process (3)")
def test_a_target_held_by_another_receiver_process_is_exit_3(tmp_path, rx, certkey_file, source):
    # a second receiver, started by mistake on the same target and state: its sessions are told
    # busy while the first one serves the target
    slow = subprocess.Popen(send_args(source, rx.address, certkey_file, str(tmp_path / "tx-a"), "disk0",
                                      "--level", "0", "--speed-limit", _slow_schedule(tmp_path)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    other = ReceiverProc(certkey_file, {"disk0": str(tmp_path / "target.img")}, str(tmp_path / "rx"))
    try:
        assert wait_until(lambda: os.path.exists(tmp_path / "target.img"), 30)
        cp = send(source, other.address, certkey_file, str(tmp_path / "tx-b"))
    finally:
        other.stop()
        slow.kill()
        slow.wait(10)
    assert cp.returncode == 3, cp.stderr
    assert "busy" in _one_line(cp), cp.stderr


def _slow_schedule(tmp_path) -> str:
    """A 5.4.10 speed_limit body holding the copy at 8 Mbit/s all day."""
    import json

    path = tmp_path / "slow.json"
    path.write_text(json.dumps({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 8}]}))
    return str(path)


@pytest.mark.reliability("exit codes", "interrupted: SIGINT (3), then resumed")
def test_an_interrupted_copy_is_exit_3_and_the_rerun_resumes(tmp_path, rx, certkey_file, source):
    # Ctrl-C during a copy held at 8 Mbit/s (16 s), once its session is open
    proc = subprocess.Popen(send_args(source, rx.address, certkey_file, str(tmp_path / "tx"), "disk0", "--level", "0",
                                      "--speed-limit", _slow_schedule(tmp_path)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = tmp_path / "target.img"
    try:
        assert wait_until(target.exists, 30)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 3
    assert proc.stderr.read().endswith("; rerun the same command to resume\n")
    _resumes(source, rx, certkey_file, str(tmp_path / "tx"), target)
