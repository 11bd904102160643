"""contrib/systemd/smsrepl-receive.service: its ExecStart, with receive.conf's values, is a command
smsrepl accepts and runs; the service restarts on failure but not on a usage error; it is
hardened without hiding the block devices the receiver writes; systemd-analyze accepts it."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from smsrepl.cli.parser import build_parser

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
UNIT = CONTRIB / "smsrepl-receive.service"
CONF = CONTRIB / "receive.conf"


def _unit(path: Path = UNIT) -> dict[str, list[str]]:
    """KEY -> its values in order (a key may repeat), [Section] headers and comments left out."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _env(text: str) -> dict[str, str]:
    """An EnvironmentFile's assignments (comments and blank lines left out, quotes removed)."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


def _argv(env: dict[str, str]) -> list[str]:
    """ExecStart as systemd expands it: ${VAR} is one argument, $VAR is split at whitespace."""
    [line] = _unit()["ExecStart"]
    out = []
    for word in line.split():
        m = re.fullmatch(r"\$\{(\w+)\}|\$(\w+)", word)
        if m and m.group(1):
            out.append(env[m.group(1)])
        elif m:
            out += env.get(m.group(2), "").split()
        else:
            assert "$" not in word, word
            out.append(word)
    return out


def test_exec_start_with_the_example_conf_is_accepted_by_smsrepls_parser():
    env = _env(CONF.read_text())
    argv = _argv(env)
    assert argv[0] == "/usr/local/bin/smsrepl"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "receive" and args.func.__name__ == "cmd_receive"
    assert args.listen == "0.0.0.0:8900" and args.certkey == "/etc/smsrepl/certkey.json"
    assert args.target == ["disk0=/dev/vdb", "root=/srv/smsrepl/root"]
    # the state directory is the one systemd makes (StateDirectory=), so it is writable
    state_dirs = _unit()["StateDirectory"][0].split()
    assert any(args.state_dir == f"/var/lib/{d}" for d in state_dirs), (args.state_dir, state_dirs)
    # the commented alternative (a log file in LogsDirectory=) parses too
    log_line = next(line for line in CONF.read_text().splitlines() if "--log-file" in line).lstrip("#")
    args = build_parser().parse_args(_argv({**env, **_env(log_line)})[1:])
    assert args.log_file == f"/var/log/{_unit()['LogsDirectory'][0]}/receive.log" and args.log_format == "json"


def test_restart_stop_and_hardening_settings():
    u = {k: v[-1] for k, v in _unit().items()}
    assert u["Restart"] == "on-failure" and u["KillSignal"] == "SIGTERM"
    assert 10 <= int(u["TimeoutStopSec"]) <= 300
    assert {"2", "4"} <= set(u["RestartPreventExitStatus"].split())  # restarting will not fix them
    assert u["EnvironmentFile"] == "/etc/smsrepl/receive.conf"
    assert u["NoNewPrivileges"] == "yes" and u["ProtectSystem"] == "strict" and u["PrivateTmp"] == "yes"
    assert "smsrepl" in u["StateDirectory"].split()
    # the receiver writes block devices: /dev stays (no PrivateDevices), block devices allowed
    assert u.get("PrivateDevices", "no") == "no"
    assert u["DevicePolicy"] == "closed" and u["DeviceAllow"] == "block-* rw"
    # and it recreates trees with their setuid bits and owners: nothing that forbids that
    assert "RestrictSUIDSGID" not in u and "User" not in u


def test_exec_start_runs_a_receiver(tmp_path, certkey_file):
    """The expanded command line starts a receiver (paths moved into tmp_path)."""
    (tmp_path / "disk0.img").write_bytes(b"\0" * 8192)
    (tmp_path / "root").mkdir()
    env = {"SMSREPL_LISTEN": "127.0.0.1:0", "SMSREPL_CERTKEY": certkey_file,
           "SMSREPL_TARGETS": f"--target disk0={tmp_path / 'disk0.img'} --target root={tmp_path / 'root'}",
           "SMSREPL_OPTIONS": f"--log-file {tmp_path / 'receive.log'} --log-format json"}
    argv = [a.replace("/var/lib/smsrepl/receive", str(tmp_path / "state")) for a in _argv(env)]
    proc = subprocess.Popen([sys.executable, "-m", "smsrepl", *argv[1:]], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert re.match(r"listening on 127\.0\.0\.1:\d+$", line), line + proc.stderr.read()
    finally:
        proc.terminate()
        proc.wait(30)
    assert "listening on" in (tmp_path / "receive.log").read_text()
    assert sorted(os.listdir(tmp_path)) == ["disk0.img", "receive.log", "root", "state"]
    assert (tmp_path / "disk0.img").read_bytes() == b"\0" * 8192 and os.listdir(tmp_path / "root") == []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    # the binary must exist for verify: the one of this environment stands in for /usr/local/bin
    exe = shutil.which("smsrepl") or str(Path(sys.executable).parent / "smsrepl")
    if not os.access(exe, os.X_OK):
        pytest.skip("no smsrepl executable to stand in for /usr/local/bin/smsrepl")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/smsrepl", exe))
    cp = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0 and "smsrepl-receive.service" not in cp.stderr, cp.stderr
