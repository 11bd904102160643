"""A one-shot send that resumes a full copy cut short earlier ends with the source as it is now:
below where it resumed, the target holds what the source held back then, so a sync round
follows the resumed one (the helper's D1: a kill, writes below the checkpoint, a rerun under
--freeze that said "frozen" and left a file system that fsck rejects)."""
import json
import subprocess

from smsrepl.lab.testdata import write_image

from .procs import ReceiverProc, round_summaries, send, send_args, sha256, wait_until

SIZE = 32 << 20
MIX = {"text": 0.5, "random": 0.5}
CHANGED = [0, 1, 700]  # 4 KiB blocks rewritten below the checkpoint (8 MiB: block 2048) between the runs


def test_a_resumed_first_copy_is_followed_by_a_sync_round_that_brings_what_changed_below_it(tmp_path, certkey_file):
    src, dst = str(tmp_path / "source.img"), str(tmp_path / "target.img")
    write_image(src, SIZE, seed=21, mix=MIX)
    limit = tmp_path / "limit.json"
    limit.write_text(json.dumps({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 24}]}))  # 11 s
    rx = ReceiverProc(certkey_file, {"disk0": dst}, str(tmp_path / "rx"))
    state = tmp_path / "rx" / "disk0" / "state.json"
    first = subprocess.Popen(send_args(src, rx.address, certkey_file, str(tmp_path / "tx"), "disk0",
                                       "--speed-limit", str(limit)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: state.exists() and json.loads(state.read_text())["checkpoint"] > 0, 60)
        first.kill()
        first.wait(10)
        checkpoint = json.loads(state.read_text())["checkpoint"]
        assert checkpoint < SIZE and max(CHANGED) * 4096 < checkpoint
        with open(src, "r+b") as fh:
            for b in CHANGED:
                fh.seek(b * 4096)
                fh.write(bytes([0x5A]) * 4096)
        cp = send(src, rx.address, certkey_file, str(tmp_path / "tx"), "disk0")
    finally:
        if first.poll() is None:
            first.kill()
        rx.stop()
    assert cp.returncode == 0, cp.stderr
    resumed, after = round_summaries(cp.stdout)
    assert (resumed["kind"], resumed["round"]) == ("full", 1) and resumed["resumed_from"] >= checkpoint, resumed
    assert (after["kind"], after["round"], after["data_bytes"]) == ("sync", 2, len(CHANGED) * 4096), after
    assert sha256(src) == sha256(dst)
