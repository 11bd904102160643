"""SIGINT/SIGTERM stop the receiver within about a second: each session makes its data durable
and writes its checkpoint, its sender hears why (exit 3, resumable), and a rerun resumes there."""
import json
import signal
import subprocess
import time

import pytest

from smsrepl.lab.testdata import write_image

from .procs import ReceiverProc, first_summary, send, send_args, sha256, wait_until

SIZE = 48 << 20


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_receiver_checkpoints_its_sessions_and_exits_promptly(tmp_path, certkey_file, signum):
    src, dst, rx_state = str(tmp_path / "source.img"), str(tmp_path / "target.img"), str(tmp_path / "rx")
    write_image(src, SIZE, seed=2, mix={"random": 1.0})
    limit = tmp_path / "limit.json"
    limit.write_text(json.dumps({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 40}]}))
    rx = ReceiverProc(certkey_file, {"disk0": dst}, rx_state)
    sender = subprocess.Popen(send_args(src, rx.address, certkey_file, str(tmp_path / "tx"), "disk0",
                                        "--speed-limit", str(limit)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / "rx" / "disk0" / "state.json"

    def checkpoint() -> int:
        try:
            return json.loads(state.read_text())["checkpoint"]
        except (OSError, ValueError, KeyError):
            return 0

    try:
        assert wait_until(lambda: checkpoint() >= 4 << 20, 60), "the copy did not start"
        t0 = time.monotonic()
        rx.proc.send_signal(signum)
        code = rx.proc.wait(30)
        took = time.monotonic() - t0
        print(f"\nreceiver stopped {took:.2f} s after {signal.Signals(signum).name}")
        assert code == 0, "".join(rx.log)
        assert took < 5.0  # 2 s on an idle machine; room for a loaded one
        _, err = sender.communicate(timeout=30)
    finally:
        if sender.poll() is None:
            sender.kill()
        rx.kill()
    log = "".join(rx.log)
    assert "round 1 checkpointed at" in log, log
    stopped_at = checkpoint()
    assert 4 << 20 <= stopped_at < SIZE
    assert f"round 1 checkpointed at {stopped_at} of {SIZE} bytes" in log, log
    assert "Traceback" not in log
    # the sender: one line saying why, resumable
    assert sender.returncode == 3, err
    assert f"the receiver is stopping ({signal.Signals(signum).name}); rerun to resume" in err, err
    assert f"checkpointed at {stopped_at} of {SIZE} bytes" in err, err

    rx = ReceiverProc(certkey_file, {"disk0": dst}, rx_state)
    try:
        result = first_summary(send(src, rx.address, certkey_file, str(tmp_path / "tx"), "disk0"))
    finally:
        rx.stop()
    assert result["kind"] == "full" and result["resumed_from"] == stopped_at
    assert sha256(src) == sha256(dst)
