"""A sender without local state (its --state-dir lost, another user, another host) reconciles with
the receiver's manifest instead of copying a whole disk that the target already holds; where the
receiver's state cannot vouch for the target, it copies everything and says why."""
import json
import logging
import shutil
import subprocess
import sys
import threading
import time

import pytest

from smsrepl.throttle import SpeedSchedule
from smsrepl.lab.testdata import write_image
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.sender import Sender
from smsrepl.transport.tls import client_context, server_context

from .procs import ReceiverProc, send, sha256, summary

SIZE = 32 << 20
MIX = {"text": 0.5, "random": 0.5}  # no holes: a full copy sends the whole image as data
CHANGED = [5, 1000, 4097, 8190]  # 4 KiB blocks rewritten in the source between the runs


def _rewrite(path, blocks, seed=7):
    with open(path, "r+b") as fh:
        for i, b in enumerate(blocks):
            fh.seek(b * 4096)
            fh.write(bytes([(seed + i) % 256]) * 4096)


@pytest.fixture
def lab(tmp_path, certkey_file):
    src, dst = str(tmp_path / "source.img"), str(tmp_path / "target.img")
    rx = ReceiverProc(certkey_file, {"disk0": dst}, str(tmp_path / "rx-state"))
    yield {"src": src, "dst": dst, "rx": rx, "ck": certkey_file, "tmp": tmp_path}
    rx.stop()


def _send(lab, state_dir, *extra, env=None):
    return send(lab["src"], lab["rx"].address, lab["ck"], str(state_dir), "disk0", *extra, env=env)


def test_a_sender_that_lost_its_state_sends_only_what_changed(lab):
    write_image(lab["src"], SIZE, seed=3, mix=MIX)
    first = summary(_send(lab, lab["tmp"] / "tx"))
    assert first["kind"] == "full" and first["data_bytes"] == SIZE
    shutil.rmtree(lab["tmp"] / "tx")
    _rewrite(lab["src"], CHANGED)

    second = summary(_send(lab, lab["tmp"] / "tx"))
    assert second["kind"] == "sync", second
    assert second["reconcile"].startswith("reconciled with the receiver's manifest: no local state"), second
    assert second["data_bytes"] == len(CHANGED) * 4096 < 0.05 * SIZE
    assert second["wire_bytes"] < 0.05 * SIZE
    assert sha256(lab["src"]) == sha256(lab["dst"])
    # the session taken over is this sender's now: the next run is an ordinary sync round
    third = summary(_send(lab, lab["tmp"] / "tx"))
    assert third["kind"] == "sync" and third["data_bytes"] == 0


def test_a_dry_run_without_local_state_says_what_the_reconciling_round_then_sends(lab):
    write_image(lab["src"], SIZE, seed=6, mix=MIX)
    summary(_send(lab, lab["tmp"] / "tx"))
    shutil.rmtree(lab["tmp"] / "tx")
    _rewrite(lab["src"], CHANGED)
    before = sha256(lab["dst"])
    dry = send(lab["src"], lab["rx"].address, lab["ck"], str(lab["tmp"] / "tx"), "disk0", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)  # send() asks for --json: one object
    assert (plan["dry_run"], plan["kind"], plan["round"]) == (True, "sync", 2), plan
    assert (plan["blocks"], plan["data_bytes"]) == (len(CHANGED), len(CHANGED) * 4096), plan
    assert sha256(lab["dst"]) == before
    second = summary(_send(lab, lab["tmp"] / "tx"))
    assert second["kind"] == "sync" and second["data_bytes"] == len(CHANGED) * 4096


def test_another_users_state_dir_reconciles_too(lab):
    """Another user (another --state-dir, as another host would have) takes the target over."""
    write_image(lab["src"], SIZE, seed=4, mix=MIX)
    summary(_send(lab, lab["tmp"] / "alice"))
    _rewrite(lab["src"], CHANGED[:1])
    bob = summary(_send(lab, lab["tmp"] / "bob"))
    assert bob["kind"] == "sync" and bob["data_bytes"] == 4096
    assert sha256(lab["src"]) == sha256(lab["dst"])


def test_a_target_changed_behind_the_receivers_back_is_not_seen_by_reconciling(lab):
    """What is detectable: the receiver's manifest holds the digests of what it verified on
    arrival and made durable; a sync round (with or without the sender's state) trusts it and
    does not read the target. A write to the target by someone else is not repaired by a
    reconciling round, nor seen by `verify block --to`; `verify block SOURCE TARGET`, run where
    both can be read, compares the bytes and finds it."""
    write_image(lab["src"], SIZE, seed=5, mix=MIX)
    summary(_send(lab, lab["tmp"] / "tx"))
    with open(lab["dst"], "r+b") as fh:  # behind the receiver's back
        fh.seek(3000 * 4096)
        fh.write(b"\xee" * 4096)
    shutil.rmtree(lab["tmp"] / "tx")
    again = summary(_send(lab, lab["tmp"] / "tx"))
    assert again["kind"] == "sync" and again["data_bytes"] == 0
    local = subprocess.run([sys.executable, "-m", "smsrepl", "verify", "block", lab["src"], lab["dst"]],
                           capture_output=True, text=True, timeout=120)
    assert local.returncode == 1, local.stderr
    assert json.loads(local.stdout)["different_ranges"] == [[3000 * 4096, 4096]]



def test_a_takeover_cut_short_still_reads_the_whole_source_with_a_trusted_dirty_map(lab):
    """A sender whose --state-dir is gone but whose dirty map survived (trusted: a round of its
    own read the whole source once) takes over a session that another host's sender wrote a
    different disk with. The map says nothing of what that other sender wrote, so the takeover
    round reads the whole source; cut short and run again, it still must: the run after the cut
    found the session its own already (taken over, saved) and read only the map's few marks."""
    other = str(lab["tmp"] / "other.img")
    dmap = str(lab["tmp"] / "dirty.map")
    write_image(lab["src"], SIZE, seed=8, mix=MIX)
    write_image(other, SIZE, seed=9, mix=MIX)
    first = summary(_send(lab, lab["tmp"] / "tx", "--dirty-map", dmap))
    assert first["kind"] == "full"
    # another host's sender (no state of its own for this target) takes the session over and
    # writes its own disk onto the target
    bob = summary(send(other, lab["rx"].address, lab["ck"], str(lab["tmp"] / "bob"), "disk0"))
    assert bob["kind"] == "sync" and bob["data_bytes"] == SIZE and sha256(other) == sha256(lab["dst"])
    shutil.rmtree(lab["tmp"] / "tx")
    # the first host, its state lost, takes it back: the takeover round dies after its first chunk
    cut = _send(lab, lab["tmp"] / "tx", "--dirty-map", dmap, env={"SMSREPL_FAULTS": "kill@sender.data:1"})
    assert cut.returncode == -9, cut.stderr
    again = summary(_send(lab, lab["tmp"] / "tx", "--dirty-map", dmap))
    assert again["kind"] == "sync" and again["dirty_blocks"] is None, again  # the whole source was read
    assert sha256(lab["src"]) == sha256(lab["dst"])


def test_a_round_after_another_sender_of_the_session_wrote_the_target_reads_the_whole_source(lab):
    """A sender with its state and a trusted dirty map, whose session another host's sender took
    over meanwhile and wrote a different disk with: the map marks writes since this sender's last
    round, which is not what the target holds any more (the receiver's manifest root is not the
    one that round ended with), so the round reads the whole source."""
    other = str(lab["tmp"] / "other.img")
    dmap = str(lab["tmp"] / "dirty.map")
    write_image(lab["src"], SIZE, seed=10, mix=MIX)
    write_image(other, SIZE, seed=11, mix=MIX)
    summary(_send(lab, lab["tmp"] / "tx", "--dirty-map", dmap))
    mine = summary(_send(lab, lab["tmp"] / "tx", "--dirty-map", dmap))
    assert mine["kind"] == "sync" and mine["dirty_blocks"] == 0  # the map is this sender's basis
    summary(send(other, lab["rx"].address, lab["ck"], str(lab["tmp"] / "bob"), "disk0"))
    assert sha256(other) == sha256(lab["dst"])
    again = summary(_send(lab, lab["tmp"] / "tx", "--dirty-map", dmap))
    assert again["kind"] == "sync" and again["dirty_blocks"] is None, again
    assert again["data_bytes"] == SIZE
    assert sha256(lab["src"]) == sha256(lab["dst"])
    # and the round after it relies on the map again
    last = summary(_send(lab, lab["tmp"] / "tx", "--dirty-map", dmap))
    assert last["dirty_blocks"] == 0 and last["data_bytes"] == 0


@pytest.mark.parametrize("cut", ["theirs", "ours"])
def test_a_round_cut_short_after_another_sender_wrote_the_target_leaves_the_next_one_reading_everything(lab, cut):
    """As above, with a round cut short: the other sender's (the target partly its disk, the
    receiver's round not this sender's), or this sender's own whole-source round that followed
    the other sender's completed one (what that one wrote past the cut is not in the map)."""
    other = str(lab["tmp"] / "other.img")
    dmap = str(lab["tmp"] / "dirty.map")
    write_image(lab["src"], SIZE, seed=12, mix=MIX)
    write_image(other, SIZE, seed=13, mix=MIX)
    summary(_send(lab, lab["tmp"] / "tx", "--dirty-map", dmap))
    kill = {"SMSREPL_FAULTS": "kill@sender.data:1"}
    bob = send(other, lab["rx"].address, lab["ck"], str(lab["tmp"] / "bob"), "disk0", env=kill if cut == "theirs" else None)
    assert bob.returncode == (-9 if cut == "theirs" else 0), bob.stderr
    if cut == "ours":
        assert _send(lab, lab["tmp"] / "tx", "--dirty-map", dmap, env=kill).returncode == -9
    again = summary(_send(lab, lab["tmp"] / "tx", "--dirty-map", dmap))
    assert again["kind"] == "sync" and again["dirty_blocks"] is None, again
    assert sha256(lab["src"]) == sha256(lab["dst"])
    last = summary(_send(lab, lab["tmp"] / "tx", "--dirty-map", dmap))
    assert last["dirty_blocks"] == 0 and last["data_bytes"] == 0

def test_a_round_that_never_reached_the_receiver_is_not_taken_for_another_senders_cut_round(tmp_path, certkey_file):
    """A sender records the round it begins before its ROUND_BEGIN reaches the receiver, which
    may never happen (the receiver died after its WELCOME). Another sender then takes the session
    over and begins the round of that same id, and is cut short: the target is partly its disk.
    The first sender's next round must not take that round for its own and read only its map's
    marks (it sent nothing of what the other one wrote: exit 0, a target that is not the source)."""
    src, other, dst = (str(tmp_path / n) for n in ("source.img", "other.img", "target.img"))
    dmap, state = str(tmp_path / "dirty.map"), str(tmp_path / "rx-state")
    write_image(src, SIZE, seed=14, mix=MIX)
    write_image(other, SIZE, seed=15, mix=MIX)
    rx = ReceiverProc(certkey_file, {"disk0": dst}, state, env={"SMSREPL_FAULTS": "kill@receiver.welcome:2"})
    try:
        first = summary(send(src, rx.address, certkey_file, str(tmp_path / "tx"), "disk0", "--dirty-map", dmap))
        assert first["kind"] == "full"
        lost = send(src, rx.address, certkey_file, str(tmp_path / "tx"), "disk0", "--dirty-map", dmap)
        assert lost.returncode == 3, lost.stderr  # the receiver died after its WELCOME
    finally:
        rx.kill()
    rx = ReceiverProc(certkey_file, {"disk0": dst}, state)
    try:
        bob = send(other, rx.address, certkey_file, str(tmp_path / "bob"), "disk0",
                   env={"SMSREPL_FAULTS": "kill@sender.data:1"})
        assert bob.returncode == -9, bob.stderr
        rec = json.loads((tmp_path / "rx-state" / "disk0" / "state.json").read_text())
        assert rec["active"] and rec["round_kind"] == "sync" and rec["round_id"] == 2, rec
        again = summary(send(src, rx.address, certkey_file, str(tmp_path / "tx"), "disk0", "--dirty-map", dmap))
        assert again["kind"] == "sync" and again["dirty_blocks"] is None, again
        assert sha256(src) == sha256(dst)
    finally:
        rx.stop()


# --- where the receiver's state cannot vouch for the target: a full copy, and why ------------

@pytest.fixture
def inproc(tmp_path, bundle):
    rx = Receiver({"disk0": str(tmp_path / "target.img")}, server_context(bundle), str(tmp_path / "rx"),
                  checkpoint_seconds=0.05, create=True)
    addr = rx.start()
    src = str(tmp_path / "source.img")
    write_image(src, SIZE, seed=6, mix=MIX)

    def sender(state: str, **kw) -> Sender:
        return Sender(src, "disk0", addr, client_context(bundle), str(tmp_path / state), level=0, **kw)

    yield {"sender": sender, "src": src, "dst": str(tmp_path / "target.img"), "tmp": tmp_path}
    rx.stop()


def _stop_once(sender: Sender, reached, timeout: float = 60.0) -> None:
    """Stop ``sender`` from another thread as soon as ``reached()`` holds: a fixed delay cuts a
    busy machine's round before its first checkpoint (or a quiet one's after its end)."""
    def watch():
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if reached():
                    break
            except (OSError, ValueError):  # not written yet, or caught mid-rewrite
                pass
            time.sleep(0.02)
        sender.stop()
    threading.Thread(target=watch, daemon=True).start()


def test_a_first_copy_says_why_it_copies_everything(inproc):
    result = inproc["sender"]("tx").run()
    assert result.kind == "full" and result.data_bytes == SIZE
    assert result.reconcile.startswith("full copy: no local state for this target, and the receiver holds "
                                       "no completed copy")
    again = inproc["sender"]("tx").run()  # with its state: nothing to explain
    assert again.kind == "sync" and again.reconcile is None


def test_an_unfinished_first_copy_of_another_sender_is_not_taken_over(inproc, caplog):
    """Its data below the checkpoint may be of another source: the newcomer copies from zero."""
    slow = SpeedSchedule.from_json({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 40}]})
    first = inproc["sender"]("alice", speed_limit=slow)
    state_path = inproc["tmp"] / "rx" / "disk0" / "state.json"
    _stop_once(first, lambda: json.loads(state_path.read_text())["checkpoint"] > 0)
    with pytest.raises(Exception):
        first.run()
    state = json.loads(state_path.read_text())
    assert state["active"] and state["round_kind"] == "full" and state["checkpoint"] > 0
    with caplog.at_level(logging.WARNING, logger="smsrepl.receiver"):
        result = inproc["sender"]("bob").run()
    assert result.kind == "full" and result.resumed_from == 0 and result.data_bytes == SIZE
    assert result.reconcile.startswith("full copy: no local state")
    assert any("cannot reconcile with this target (its first copy never completed)" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert sha256(inproc["src"]) == sha256(inproc["dst"])


def test_a_sender_with_state_never_takes_another_session_over(inproc):
    """Only a sender without a completed round of its own offers to take over: one with its own
    history, finding another session on the target, copies in full as before."""
    inproc["sender"]("alice").run()
    bob = inproc["sender"]("bob")
    bob.run()  # takes alice's session over
    rec = json.loads((inproc["tmp"] / "alice" / "disk0" / "session.json").read_text())
    rec["session_id"] = "0" * 32  # alice's own history, for a session the receiver no longer has
    (inproc["tmp"] / "alice" / "disk0" / "session.json").write_text(json.dumps(rec))
    result = inproc["sender"]("alice").run()
    assert result.kind == "full" and result.resumed_from == 0 and result.reconcile is None
    assert sha256(inproc["src"]) == sha256(inproc["dst"])


def test_a_round_of_its_own_cut_short_once_the_receiver_began_it_reads_only_the_map_again(tmp_path, bundle):
    """The receiver's CHECKPOINT of a round says it began that round: cut short, it is this
    sender's own, and the next round reads the map's marks (the cut round's are in it still)."""
    from smsrepl.blocks.dirtymap import DirtyMap
    rx = Receiver({"disk0": str(tmp_path / "target.img")}, server_context(bundle), str(tmp_path / "rx"),
                  checkpoint_seconds=0.05, create=True)
    addr = rx.start()
    src = str(tmp_path / "source.img")
    write_image(src, SIZE, seed=16, mix=MIX)
    slow = SpeedSchedule.from_json({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 40}]})
    with DirtyMap.open(str(tmp_path / "dirty.map"), SIZE) as dm:
        def sender(**kw) -> Sender:
            return Sender(src, "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0, dirty_map=dm, **kw)
        try:
            assert sender().run().kind == "full"
            changed = list(range(0, 8192, 2))  # 16 MiB of marks: over 3 s at 40 Mbit/s
            _rewrite(src, changed)
            for b in changed:
                dm.mark(b * 4096, 4096)
            cut = sender(speed_limit=slow)
            record = tmp_path / "tx" / "disk0" / "session.json"
            _stop_once(cut, lambda: json.loads(record.read_text()).get("begun") == 2)
            with pytest.raises(Exception):
                cut.run()
            rec = json.loads(record.read_text())
            assert rec.get("begun") == 2 and "not_ours" not in rec, rec
            again = sender().run()
            assert again.kind == "sync" and again.dirty_blocks == len(changed), again
            assert sha256(src) == sha256(str(tmp_path / "target.img"))
        finally:
            rx.stop()


def test_a_session_json_with_wrong_values_for_its_round_keys_reads_the_whole_source(tmp_path, bundle):
    """session.json edited or damaged by hand (root, begun and not_ours of the wrong types): no
    crash, and the map is not trusted: the round reads the whole source, the target ends equal."""
    from smsrepl.blocks.dirtymap import DirtyMap
    rx = Receiver({"disk0": str(tmp_path / "target.img")}, server_context(bundle), str(tmp_path / "rx"), create=True)
    addr = rx.start()
    src = str(tmp_path / "source.img")
    write_image(src, SIZE, seed=17, mix=MIX)
    with DirtyMap.open(str(tmp_path / "dirty.map"), SIZE) as dm:
        def sender() -> Sender:
            return Sender(src, "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0, dirty_map=dm)
        try:
            assert sender().run().kind == "full"
            _rewrite(src, [10, 20])  # written behind the map's back: only a whole read finds them
            path = tmp_path / "tx" / "disk0" / "session.json"
            rec = json.loads(path.read_text())
            rec.update(root=5, begun="x", not_ours=0)
            path.write_text(json.dumps(rec))
            again = sender().run()
            assert again.kind == "sync" and again.dirty_blocks is None, again
            assert sha256(src) == sha256(str(tmp_path / "target.img"))
        finally:
            rx.stop()
