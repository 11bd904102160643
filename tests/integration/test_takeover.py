"""A second sender of the same session (the same command run again, or its state directory
copied to another host) takes the target over; the first one's error names it."""
import json
import re
import subprocess

from smsrepl.lab.testdata import write_image

from .procs import ReceiverProc, first_summary, send, send_args, sha256, wait_until

SIZE = 32 << 20


def test_the_sender_replaced_by_another_names_it(tmp_path, certkey_file):
    src, dst = str(tmp_path / "source.img"), str(tmp_path / "target.img")
    write_image(src, SIZE, seed=8, mix={"random": 1.0})
    limit = tmp_path / "limit.json"
    limit.write_text(json.dumps({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 40}]}))
    rx = ReceiverProc(certkey_file, {"disk0": dst}, str(tmp_path / "rx"), verbose=True)
    state = tmp_path / "rx" / "disk0" / "state.json"
    first = subprocess.Popen(send_args(src, rx.address, certkey_file, str(tmp_path / "tx"), "disk0",
                                       "--speed-limit", str(limit)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: state.exists() and json.loads(state.read_text())["checkpoint"] > 0, 60)
        second = send(src, rx.address, certkey_file, str(tmp_path / "tx"), "disk0")  # the same command again
        _, err = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        rx.stop()
    result = first_summary(second)
    assert result["resumed_from"] > 0 and sha256(src) == sha256(dst)
    [newcomer] = re.findall(r"reconnected from (127\.0\.0\.1:\d+)", "".join(rx.log))
    assert first.returncode == 3, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert (f"target 'disk0' was taken over by another sender of the same session ({newcomer}, "
            f"certificate 'smsrepl-source')") in lines[0], err


def test_a_busy_target_names_the_sender_that_holds_it(tmp_path, certkey_file):
    """A sender of another session is turned away (exit 3, nothing written by it) and told who
    holds the target; the holder goes on undisturbed."""
    src, dst = str(tmp_path / "source.img"), str(tmp_path / "target.img")
    write_image(src, SIZE, seed=9, mix={"random": 1.0})
    limit = tmp_path / "limit.json"
    limit.write_text(json.dumps({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 20}]}))
    rx = ReceiverProc(certkey_file, {"disk0": dst}, str(tmp_path / "rx"), verbose=True)
    state = tmp_path / "rx" / "disk0" / "state.json"
    first = subprocess.Popen(send_args(src, rx.address, certkey_file, str(tmp_path / "alice"), "disk0",
                                       "--speed-limit", str(limit)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: state.exists() and json.loads(state.read_text())["checkpoint"] > 0, 60)
        other = send(src, rx.address, certkey_file, str(tmp_path / "bob"), "disk0")
        limit.write_text(json.dumps({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 0}]}))  # finish now
        out, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
        rx.stop()
    [holder] = re.findall(r"(127\.0\.0\.1:\d+): session \w+ for target disk0", "".join(rx.log))[:1]
    assert other.returncode == 3, other.stderr
    assert f"target 'disk0' is busy with another session (from {holder})" in other.stderr
    assert not (tmp_path / "bob" / "disk0" / "target.manifest").exists()
    assert first.returncode == 0, err
    assert sha256(src) == sha256(dst)
