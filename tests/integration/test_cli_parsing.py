"""The command line's reading of what it is given: -v after the subcommand, a bare port for
--listen (every address, IPv4 and IPv6) and for --to (refused), usage errors on one line, verify
naming a missing TARGET as the target."""
import re
import socket
import subprocess

import pytest

from smsrepl.lab.testdata import write_image

from .procs import CLI, send, sha256

MiB = 1 << 20


def _run(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout)


def _receiver(*args) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(CLI + ["receive", "--create", *args], stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if "listening on" not in line:
        proc.kill()
        raise AssertionError(f"receiver did not start: {line}{proc.stderr.read()}")
    return proc, line


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_is_accepted_before_and_after_the_subcommand(tmp_path, certkey_file, where):
    args = ["--listen", "127.0.0.1:0", "--certkey", certkey_file, "--target", f"d={tmp_path / 't.img'}",
            "--state-dir", str(tmp_path / "rx"), "--create"]
    proc = subprocess.Popen(CLI + (["-v", "receive", *args] if where == "before" else ["receive", *args, "-v"]),
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        assert "listening on" in first, first + (proc.stderr.read() if proc.poll() is not None else "")
        # -v: the INFO lines of the receiver's start
        assert " INFO " in proc.stderr.readline()
    finally:
        _stop(proc)


def test_without_verbose_no_info_lines(tmp_path):
    src = tmp_path / "a.img"
    write_image(str(src), MiB, seed=1)
    cp = _run("verify", "block", str(src), str(src))
    assert cp.returncode == 0 and " INFO " not in cp.stderr, cp.stderr


def test_a_bare_listen_port_is_every_address(tmp_path, certkey_file):
    with socket.socket() as s:  # a free port (the receiver cannot report one it chose: 0 is "any")
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = tmp_path / "t.img"
    proc, line = _receiver("--listen", str(port), "--certkey", certkey_file, "--target", f"disk0={target}",
                           "--state-dir", str(tmp_path / "rx"))
    try:
        assert re.search(rf"listening on (\[::\]|0\.0\.0\.0):{port}$", line.strip()), line
        source = str(tmp_path / "s.img")
        write_image(source, MiB, seed=2)
        cp = send(source, f"127.0.0.1:{port}", certkey_file, str(tmp_path / "tx4"))  # IPv4
        assert cp.returncode == 0, cp.stderr
        if socket.has_ipv6 and "[::]" in line:
            write_image(source, MiB, seed=3)
            cp = send(source, f"[::1]:{port}", certkey_file, str(tmp_path / "tx6"))  # and IPv6
            assert cp.returncode == 0, cp.stderr
        assert sha256(source) == sha256(str(target))
    finally:
        _stop(proc)


@pytest.mark.parametrize("cmd", [["send", "block", "x.img", "--target", "disk0"], ["send", "files", ".", "--target", "t"],
                                 ["netcheck"], ["verify", "block", "x.img", "--target", "disk0"]])
def test_a_bare_port_for_to_is_refused(tmp_path, certkey_file, cmd):
    cp = _run(*cmd, "--to", "8912", "--certkey", certkey_file)
    assert cp.returncode == 2, cp.stderr
    lines = cp.stderr.splitlines()
    assert len(lines) == 1, cp.stderr
    assert "--to" in lines[0] and "'8912'" in lines[0] and "HOST:PORT" in lines[0], lines[0]


def test_a_usage_error_is_one_line_naming_the_command(tmp_path):
    cp = _run("send", "files", str(tmp_path), "--to", "127.0.0.1:1", "--target", "t", "--certkey", "x",
              "--progress", "nope")
    assert cp.returncode == 2
    assert cp.stderr.splitlines() == [
        "smsrepl send files: error: argument --progress: invalid choice: 'nope' (choose from 'bar', 'json', "
        "'none') (see 'smsrepl send files --help')"]
    cp = _run("send", "block")
    assert cp.returncode == 2 and len(cp.stderr.splitlines()) == 1, cp.stderr
    assert "required" in cp.stderr and "--to" in cp.stderr


def test_verify_block_names_a_missing_target_as_the_target(tmp_path):
    src = tmp_path / "src.img"
    write_image(str(src), MiB, seed=1)
    missing = tmp_path / "nope.img"
    cp = _run("verify", "block", str(src), str(missing))
    assert cp.returncode == 2
    assert cp.stderr.splitlines() == [f"SMS.0808: target '{missing}' does not exist"]
    assert not missing.exists()
    cp = _run("verify", "block", str(missing), str(src))  # and the source as the source
    assert cp.stderr.splitlines() == [f"SMS.1901: source '{missing}' does not exist"]


def test_verify_files_names_a_missing_target_as_the_target(tmp_path):
    (tmp_path / "src").mkdir()
    missing = tmp_path / "nope"
    cp = _run("verify", "files", str(tmp_path / "src"), str(missing))
    assert cp.returncode == 2
    lines = cp.stderr.splitlines()
    assert len(lines) == 1 and f"target directory '{missing}'" in lines[0], cp.stderr
    assert not missing.exists()
