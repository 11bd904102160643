"""A normal resume is normal: the sender says nothing alarming about its copy of the manifest."""
import json
import subprocess

from smsrepl.lab.testdata import write_image

from .procs import ReceiverProc, first_summary, send, send_args, sha256, summary, wait_until


def test_a_resumed_copy_prints_no_manifest_warning(tmp_path, certkey_file):
    src, dst = str(tmp_path / "source.img"), str(tmp_path / "target.img")
    write_image(src, 24 << 20, seed=9, mix={"random": 1.0})
    limit = tmp_path / "limit.json"
    limit.write_text(json.dumps({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 40}]}))
    rx = ReceiverProc(certkey_file, {"disk0": dst}, str(tmp_path / "rx"))
    try:
        first = subprocess.Popen(send_args(src, rx.address, certkey_file, str(tmp_path / "tx"), "disk0",
                                           "--speed-limit", str(limit)),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        state = tmp_path / "rx" / "disk0" / "state.json"

        def checkpointed() -> bool:
            try:
                return json.loads(state.read_text())["checkpoint"] >= 4 << 20
            except (OSError, ValueError, KeyError):
                return False

        assert wait_until(checkpointed, 60)
        first.kill()
        first.wait(10)
        cp = send(src, rx.address, certkey_file, str(tmp_path / "tx"), "disk0")
        result = first_summary(cp)
        assert result["kind"] == "full" and result["resumed_from"] > 0
        assert "WARNING" not in cp.stderr and "manifest" not in cp.stderr, cp.stderr
        assert sha256(src) == sha256(dst)
        # the next round reconciles the sender's copy quietly too, and sends nothing
        cp = send(src, rx.address, certkey_file, str(tmp_path / "tx"), "disk0")
        assert summary(cp)["data_bytes"] == 0 and "WARNING" not in cp.stderr, cp.stderr
    finally:
        rx.stop()
