"""Live block sources: a mounted ext4 written by a workload while send block --continuous copies it.

Each case runs a driver (scenario.py, rawdisk.py) in a private mount namespace
as root, with loop devices of its own; they need root, tracefs, losetup,
unshare, mkfs.ext4, e2fsck, fsfreeze and fstrim, and skip with the reason
where any is missing. The default run takes a few runs of each kind;
SMSREPL_SLOW=1 runs the campaigns of the acceptance list (20 live runs with
each kind of tracking, 10 provoked overruns, kills at every phase).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SLOW = bool(os.environ.get("SMSREPL_SLOW"))
TOOLS = ("losetup", "unshare", "mkfs.ext4", "e2fsck", "fsfreeze", "fstrim", "dd", "mount")


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop devices, mounts, tracefs)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    try:
        from smsrepl.blocks.tracefs import find_root

        find_root()
    except Exception as exc:  # noqa: BLE001 - the reason is the skip message
        return f"no tracefs: {exc}"
    probe = subprocess.run(["losetup", "-f"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"no free loop device: {probe.stderr.strip()}"
    return None


WHY_NOT = _why_not()
pytestmark = [pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]


def _drive(script: str, tmp_path, certkey_file, timeout: float = 600, env: dict | None = None, **cfg) -> dict:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    cfg = {"work": str(work), "certkey": certkey_file, **cfg}
    cp = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable,
                         os.path.join(HERE, script), json.dumps(cfg)],
                        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert cp.returncode == 0, cp.stderr[-3000:]
    verdict = json.loads(cp.stdout.strip().splitlines()[-1])
    shutil.rmtree(work, ignore_errors=True)
    return verdict


def _assert_identical(v: dict) -> None:
    detail = {k: v.get(k) for k in ("config", "different_blocks", "fsck_rc", "files_differ", "sender_rc",
                                    "rounds", "whole_reasons", "sender_stderr", "fsck_out")}
    assert v["identical"], detail
    assert v["files"] > 20 and v["workload_ops"] > 100, detail  # it did copy a busy file system


CASES = [("kernel", "operator"), ("kernel", "freeze"), ("kernel", "sync"), ("scan", "operator")]


@pytest.mark.reliability("live block sources", "mounted ext4 under a workload, cutover")
@pytest.mark.parametrize("tracking,cutover", CASES)
def test_a_busy_mounted_file_system_ends_identical(tmp_path, certkey_file, tracking, cutover):
    v = _drive("scenario.py", tmp_path, certkey_file, tracking=tracking, cutover=cutover, seconds=4, seed=7)
    _assert_identical(v)
    if tracking == "kernel":
        # after the first copy every round read only what the kernel saw written
        assert v["whole_source_rounds"] == 1 and v["map_rounds"] >= 2, v  # rounds are timed: a loaded machine fits fewer
        assert v["last_round"]["tracking"] == "kernel"
        lag = v["last_round"]["lag"]  # what the kernel says is still to send, and how fast rounds send it
        assert lag["tracking"] == "kernel" and isinstance(lag["dirty_bytes"], int), lag
        assert lag["drain_rate_bps"] > 0 and lag["cutover_estimate_s"] is not None and lag["converging"], lag
    if cutover == "freeze":
        assert v["frozen_during_cutover"] and not v["frozen_after_cutover"]
        assert v["last_round"]["cutover"] == {os.path.join(str(tmp_path / "work"), "mnt"): "frozen"}


@pytest.mark.reliability("live block sources", "mounted ext4 under a workload, over several connections")
@pytest.mark.parametrize("streams", [3, 8])  # 8: frames of 4 MiB (block_pipeline.frame_blocks)
def test_a_busy_mounted_file_system_over_several_connections_ends_identical(tmp_path, certkey_file, streams):
    v = _drive("scenario.py", tmp_path, certkey_file, tracking="kernel", cutover="operator", seconds=4, seed=11,
               extra=["--streams", str(streams), "-v"])
    _assert_identical(v)
    assert f"runs over {streams} connections" in v["sender_stderr"], v["sender_stderr"][-2000:]


@pytest.mark.reliability("live block sources", "one-shot digest-scan rounds of a mounted ext4 under a workload")
def test_one_shot_rounds_of_a_busy_file_system_end_identical_once_it_is_frozen(tmp_path, certkey_file):
    v = _drive("oneshot.py", tmp_path, certkey_file, rounds=4, seed=13)
    detail = {k: v.get(k) for k in ("kinds", "different_blocks", "fsck_rc", "files_differ", "sender_stderr", "fsck_out")}
    assert v["identical"], detail
    assert v["kinds"] == ["full"] + ["sync"] * 5, detail
    assert v["files"] > 20 and v["workload_ops"] > 20, detail


@pytest.mark.reliability("live block sources", "one-shot round under --freeze of a mounted ext4 under a workload")
@pytest.mark.parametrize("hold", [0, 4])  # 4: the first freeze outlasts --freeze-timeout 3, the round runs again
def test_a_one_shot_round_under_freeze_of_a_busy_file_system_is_identical(tmp_path, certkey_file, hold):
    v = _drive("oneshot.py", tmp_path, certkey_file, rounds=2, seed=17, end="freeze", hold=hold,
               **({"freeze_timeout": 3} if hold else {}))
    detail = {k: v.get(k) for k in ("kinds", "looks", "different_blocks", "fsck_rc", "files_differ",
                                    "sender_stderr", "fsck_out", "last_round")}
    assert v["identical"], detail
    assert v["frozen_during_round"] and not v["frozen_after_round"], detail
    assert v["last_round"]["quiesced"] == {os.path.join(str(tmp_path / "work"), "mnt"): "frozen"}, detail
    assert v["looks"] == (2 if hold else 1), detail
    assert ("one more round under a new freeze" in v["sender_stderr"]) == bool(hold), detail
    assert v["files"] > 20 and v["workload_ops"] > 20, detail


@pytest.mark.reliability("live block sources", "one-shot round under --freeze that outlasts its timeout twice")
def test_a_one_shot_freeze_that_never_holds_fails_and_leaves_the_file_system_thawed(tmp_path, certkey_file):
    v = _drive("oneshot.py", tmp_path, certkey_file, rounds=0, seed=19, end="freeze", hold=4, hold_all=True,
               freeze_timeout=3)
    detail = {k: v.get(k) for k in ("kinds", "looks", "last_rc", "sender_stderr")}
    assert v["kinds"] == ["full", "exit 3"], detail
    assert v["last_rc"] == 3 and v["looks"] == 2 and not v["frozen_after_round"], detail
    assert "the freeze outlasted --freeze-timeout 3 s in 2 rounds in a row" in v["sender_stderr"], detail


@pytest.mark.reliability("live block sources", "one-shot --freeze of the file system holding the state directory")
def test_a_one_shot_freeze_of_the_file_system_holding_its_state_is_refused_before_anything(tmp_path, certkey_file):
    v = _drive("oneshot.py", tmp_path, certkey_file, end="state_on_source")
    mnt = os.path.join(str(tmp_path / "work"), "mnt")
    assert v["rc"] == 2, v
    assert v["stderr"].strip() == (f"--freeze would freeze {mnt}, which holds the state directory {mnt}/state: give a "
                                   f"--state-dir on another disk (or sync without --freeze)"), v
    assert not v["frozen_after"] and not v["target_made"], v


@pytest.mark.reliability("live block sources", "one-shot copy of a mounted ext4 just written, not synced")
@pytest.mark.parametrize("source", ["device", "image"])  # image: the file under the loop device is what is sent
def test_a_one_shot_copy_and_a_check_of_a_mounted_file_system_see_what_was_written_a_moment_before(tmp_path, certkey_file,
                                                                                                   source):
    v = _drive("oneshot.py", tmp_path, certkey_file, end="recent", source=source)
    detail = {k: v.get(k) for k in ("kinds", "fsck_rc", "files_differ", "sender_stderr", "fsck_out", "last_round")}
    # what the file system held in memory reached the disk before the round read it
    assert v["fsck_rc"] == 0 and not v["files_differ"] and v["files"] == 28, detail
    mnt = os.path.join(str(tmp_path / "work"), "mnt")
    assert v["last_round"]["quiesced"] == {mnt: "synced"}, detail
    assert f"has file systems mounted read-write: {mnt} (ext4)" in v["sender_stderr"], detail
    # and verify block sees a file written since, still only in memory, as a difference
    assert v["verify_rc"] == 1, v["verify_stderr"]
    assert f"has file systems mounted read-write: {mnt} (ext4)" in v["verify_stderr"], v["verify_stderr"]


@pytest.mark.reliability("live block sources", "mounted ext4, pure-Python backend and tracker reader")
def test_the_pure_backend_copies_a_busy_file_system_too(tmp_path, certkey_file):
    # tests/run's pure pass leaves tests/live out: this is its case (the reader of _pure/trace.py)
    v = _drive("scenario.py", tmp_path, certkey_file, tracking="kernel", cutover="operator", seconds=3, seed=9,
               rate=200, env={"SMSREPL_BACKEND": "pure"})
    _assert_identical(v)
    assert v["map_rounds"] >= 2, v


@pytest.mark.slow
@pytest.mark.reliability("live block sources", "campaign: 20 live runs per tracking")
@pytest.mark.parametrize("tracking", ["kernel", "scan"])
@pytest.mark.parametrize("run", range(20))
def test_campaign_of_live_runs(tmp_path, certkey_file, tracking, run):
    cutover = ("operator", "freeze", "sync")[run % 3]
    v = _drive("scenario.py", tmp_path, certkey_file, tracking=tracking, cutover=cutover, seconds=8,
               seed=100 + run, rate=600, size_mib=96)
    _assert_identical(v)


@pytest.mark.reliability("live block sources", "one partition of a GPT disk")
def test_one_partition_of_a_gpt_disk(tmp_path, certkey_file):
    if shutil.which("sgdisk") is None or shutil.which("partx") is None:
        pytest.skip("needs sgdisk (gdisk) and partx")
    v = _drive("scenario.py", tmp_path, certkey_file, tracking="kernel", cutover="operator", seconds=4, gpt=True,
               size_mib=80, seed=3)
    _assert_identical(v)
    assert v["whole_source_rounds"] == 1 and v["map_rounds"] >= 2, v  # rounds are timed: a loaded machine fits fewer


@pytest.mark.reliability("live block sources", "a bio-based disk (zram)")
def test_a_bio_based_disk(tmp_path, certkey_file):
    if not os.path.exists("/sys/class/zram-control/hot_add"):
        pytest.skip("no zram here (a bio-based disk to test block_bio_complete on)")
    v = _drive("scenario.py", tmp_path, certkey_file, tracking="kernel", cutover="operator", seconds=3, zram=True,
               seed=5)
    _assert_identical(v)
    assert v["whole_source_rounds"] == 1 and v["map_rounds"] >= 2, v  # rounds are timed: a loaded machine fits fewer


@pytest.mark.reliability("live block sources", "a write in flight across round boundaries")
def test_a_write_in_flight_across_boundaries_reaches_the_target(tmp_path, certkey_file):
    v = _drive("rawdisk.py", tmp_path, certkey_file, mode="inflight")
    # the write was held while rounds ran (their reads returned the old data) ...
    assert v["rounds_while_in_flight"] >= 3 and not v["writer_done_while_frozen"], v
    # ... and reached the target once it completed
    assert v["identical"], v


@pytest.mark.reliability("live block sources", "provoked ring-buffer overrun")
@pytest.mark.parametrize("run", range(10 if SLOW else 2))
def test_a_ring_buffer_overrun_is_detected_and_followed_by_a_whole_disk_round(tmp_path, certkey_file, run):
    v = _drive("rawdisk.py", tmp_path, certkey_file, mode="overrun", seed=run + 1)
    assert any("lost" in r for r in v["whole_reasons"]), v
    assert v["identical"], v


KILLS = [
    {"kill_after": 0.4},  # during the first copy
    {"faults": "kill@tracker.boundary:3"},  # at a round's boundary
    {"faults": "kill@sender.data:6"},  # while a sync round sends
    {"faults": "kill@cutover.quiesced", "kill_at_cutover": True, "cutover": "freeze"},  # frozen
]


@pytest.mark.reliability("live block sources", "kill -9 of the receiver mid sync round, restarted")
def test_a_receiver_killed_mid_sync_round_recovers_and_the_cutover_is_identical(tmp_path, certkey_file):
    """The receiver dies after writing a map-driven round's blocks and before their checkpoint
    (its intent mark ahead of it); restarted, it computes those blocks' digests again from its
    target, the sender's next rounds go on against it, and the cutover ends identical. A sender
    that let go of the cut round's blocks (their marks released on failure) fails it 3 of 3 times."""
    # rounds 2 s apart under a brisk workload: the round the receiver dies in has more to send
    v = _drive("scenario.py", tmp_path, certkey_file, tracking="kernel", cutover="operator", seconds=3, seed=13,
               size_mib=256, interval=2, rate=200, rx_faults="kill@receiver.set:2")
    assert v["rx_killed_rc"] == -9, v.get("config")
    assert v["rounds_after_rx_restart"], v.get("sender_stderr")
    _assert_identical(v)


@pytest.mark.reliability("live block sources", "kill -9 of the sender with tracking on")
@pytest.mark.parametrize("kill", KILLS if SLOW else KILLS[1:], ids=lambda k: next(iter(k.values())).__str__())
def test_a_killed_sender_leaves_no_instance_and_no_frozen_file_system(tmp_path, certkey_file, kill):
    cfg = {"tracking": "kernel", "cutover": "operator", "seconds": 3, "seed": 11, **kill}
    v = _drive("scenario.py", tmp_path, certkey_file, **cfg)
    assert v["killed_rc"] == -9, v
    assert not v["frozen_after_kill"], v
    assert v["instances_of_killed"] == [], v
    _assert_identical(v)


@pytest.mark.reliability("live block sources", "the agent: a syncing task on a mounted ext4, cutover")
def test_the_agent_tracks_a_busy_disk_and_cuts_over_to_an_identical_copy(tmp_path, certkey_file):
    v = _drive("agent_live.py", tmp_path, certkey_file, seconds=3, seed=4)
    assert v["finished"] and v["violations"] == [], v
    assert v["different_blocks"] == 0 and v["fsck_rc"] == 0, v
    assert v["map_rounds"] >= 2 and v["workload_ops"] > 100, v  # rounds read what the kernel saw written
    assert v["consistency"]["consistency_result"][0]["num_different_files"] == 0, v
    assert '"tracking":"kernel"' in v["last_trace"], v
