"""Dry runs, --max-delete and the default deletion guard: what a round would change is told
without changing anything, and a round that would delete too much changes nothing."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from smsrepl import kernels
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.tls import server_context

CLI = [sys.executable, "-m", "smsrepl"]


@pytest.fixture
def rx(tmp_path, bundle):
    receiver = Receiver({"tree": str(tmp_path / "dst"), "wipe": str(tmp_path / "wipe"),
                         "img": str(tmp_path / "disk.img"), "fresh": str(tmp_path / "fresh")},
                        server_context(bundle), str(tmp_path / "rx-state"), idle_timeout=10, create=True)
    host, port = receiver.start()
    yield receiver, f"{host}:{port}"
    receiver.stop()


def snapshot(root) -> dict:
    """Every entry under ``root`` (itself included): kind, mode, owner, size, mtime (directories'
    too), inode, links, content digest or link target. None where ``root`` does not exist."""
    root = os.fsencode(str(root))
    if not os.path.lexists(root):
        return None
    out = {}
    for top, dirs, files in os.walk(root):
        names = [top] + [os.path.join(top, n) for n in dirs + files]
        for path in names:
            st = os.lstat(path)
            extra = None
            if os.path.islink(path):
                extra = os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as fh:
                    extra = hashlib.sha256(fh.read()).hexdigest()
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                                                 st.st_ino, st.st_nlink, extra)
    return out


def state(tmp_path) -> dict:
    """The receiver's state files: name -> (content, mtime); lock files are the claim, not state."""
    d = tmp_path / "rx-state"
    out = {}
    for top, _, files in os.walk(d):
        for f in files:
            if f.endswith(".lock"):
                continue
            p = os.path.join(top, f)
            out[os.path.relpath(p, d)] = (open(p, "rb").read(), os.stat(p).st_mtime_ns)
    return out


def files(addr, certkey, src, target, *extra, timeout=120):
    return subprocess.run(CLI + ["send", "files", "--json", str(src), "--to", addr, "--target", target, "--certkey", certkey,
                                 *extra], capture_output=True, text=True, timeout=timeout)


def make_tree(root, n_files=30, dirs=3):
    os.makedirs(root, exist_ok=True)
    for d in range(dirs):
        os.makedirs(f"{root}/d{d}", exist_ok=True)
        for i in range(n_files // dirs):
            with open(f"{root}/d{d}/f{i}.txt", "w") as fh:
                fh.write(f"file {d}/{i}\n" * (i + 1))
    return root


def lines(cp) -> list[str]:
    return cp.stdout.splitlines()[:-1]


def outcomes(receiver) -> list:
    """The receiver's session outcomes so far (each ends once its session's thread is done)."""
    time.sleep(0.2)
    out = []
    while not receiver.outcomes.empty():
        out.append(receiver.outcomes.get_nowait())
    return out


def test_dry_run_of_a_first_copy_lists_everything_and_writes_nothing(tmp_path, rx, certkey_file):
    receiver, addr = rx
    src = make_tree(str(tmp_path / "src"), n_files=4, dirs=2)
    os.symlink("d0/f0.txt", f"{src}/link")
    os.link(f"{src}/d0/f0.txt", f"{src}/hard")
    # a target that does not exist stays so; one that does keeps its times
    cp = files(addr, certkey_file, src, "fresh", "--dry-run")
    assert cp.returncode == 0, cp.stderr
    assert not os.path.lexists(tmp_path / "fresh")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / ".smsrepl~0123456789abcdef~left").write_bytes(b"a killed round's")
    before, rec = snapshot(tmp_path / "dst"), state(tmp_path)
    cp = files(addr, certkey_file, src, "tree", "--dry-run")
    assert cp.returncode == 0, cp.stderr
    assert snapshot(tmp_path / "dst") == before and state(tmp_path) == rec
    # the sessions ended cleanly, without a round
    assert [(o.target, o.ok, o.error, o.rounds, o.bytes_written) for o in outcomes(receiver)] == [
        ("fresh", True, None, 0, 0), ("tree", True, None, 0, 0)]
    got = lines(cp)
    assert got[0] == "cd+++++++++ d0/"
    assert ">f+++++++++ d0/f0.txt" in got and "cd+++++++++ d1/" in got
    assert "cL+++++++++ link -> d0/f0.txt" in got
    assert any(re.fullmatch(r"hf\+{9} (hard => d0/f0.txt|d0/f0.txt => hard)", x) for x in got)
    assert len(got) == 2 + 4 + 2, got  # dirs, files, link and hard link; no temporary
    assert cp.stdout.splitlines()[-1].startswith("dry run, full round 1 to target 'tree': 8 new, 0 changed")
    assert "nothing was changed" in cp.stdout.splitlines()[-1]


def _changes(before: dict, after: dict) -> set[str]:
    """Paths created, removed or changed (directories: their times and modes only)."""
    out = set()
    for p in set(before) | set(after):
        a, b = before.get(p), after.get(p)
        if a is None or b is None or (a[0], a[1], a[2], a[4], a[7]) != (b[0], b[1], b[2], b[4], b[7]):
            out.add(p)
    return out


def test_dry_run_of_a_sync_round_names_what_the_round_then_changes(tmp_path, rx, certkey_file):
    _, addr = rx
    src = make_tree(str(tmp_path / "src"), n_files=30, dirs=3)
    os.symlink("d0/f0.txt", f"{src}/link")
    os.symlink("d0/f1.txt", f"{src}/moving")
    os.makedirs(f"{src}/gone/deep")
    open(f"{src}/gone/deep/x", "w").write("x")
    os.link(f"{src}/d1/f5.txt", f"{src}/d2/hard")
    assert files(addr, certkey_file, src, "tree").returncode == 0
    time.sleep(0.05)
    with open(f"{src}/d0/f3.txt", "a") as fh:  # size and time
        fh.write("more")
    os.utime(f"{src}/d1/f2.txt", ns=(1, 1_000_000_000))  # time only
    os.chmod(f"{src}/d2/f1.txt", 0o600)  # attributes only
    os.unlink(f"{src}/d2/f0.txt")
    import shutil
    shutil.rmtree(f"{src}/gone")
    os.makedirs(f"{src}/newdir")
    open(f"{src}/newdir/n", "w").write("new")
    os.unlink(f"{src}/moving")
    os.symlink("d0/f2.txt", f"{src}/moving")
    os.symlink("newdir/n", f"{src}/newlink")
    dst = tmp_path / "dst"
    before, rec = snapshot(dst), state(tmp_path)
    cp = files(addr, certkey_file, src, "tree", "--dry-run")
    assert cp.returncode == 0, cp.stderr
    assert snapshot(dst) == before and state(tmp_path) == rec, "the dry run changed the target"
    got = lines(cp)
    for want in [">f.st...... d0/f3.txt", ">f..t...... d1/f2.txt", ".f...p..... d2/f1.txt",
                 "cd+++++++++ newdir/", ">f+++++++++ newdir/n", "cL+++++++++ newlink -> newdir/n",
                 "*deleting   d2/f0.txt", "*deleting   gone/", "*deleting   gone/deep/", "*deleting   gone/deep/x"]:
        assert want in got, (want, got)
    assert any(x.startswith("cLc") and x.endswith(" moving -> d0/f2.txt") for x in got), got
    assert ".d..t...... d2/" in got  # its entry went: its time changed
    assert "d1/f3.txt" not in cp.stdout  # alike on both sides: not shown
    assert "4 to delete (of" in cp.stdout.splitlines()[-1]
    # the round then changes exactly what the dry run named
    real = files(addr, certkey_file, src, "tree")
    assert real.returncode == 0, real.stderr
    assert json.loads(real.stdout)["deleted"] == 4
    named = {x[12:].split(" -> ")[0].rstrip("/") or "." for x in got}
    assert {os.fsdecode(p) for p in _changes(before, snapshot(dst))} - {"."} == named - {"."}
    for how in [], ["--checksum"]:  # and nothing is left to do
        again = files(addr, certkey_file, src, "tree", "--dry-run", *how)
        assert again.returncode == 0 and lines(again) == [], again.stdout
        assert " 0 new, 0 changed, 0 with new attributes, 0 to delete (of 38 target entries); 0 B" in again.stdout


def test_a_tiny_source_against_a_big_target_changes_nothing_and_says_how_to_allow_it(tmp_path, rx, certkey_file):
    receiver, addr = rx
    big = make_tree(str(tmp_path / "big"), n_files=30, dirs=3)
    assert files(addr, certkey_file, big, "wipe").returncode == 0
    outcomes(receiver)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "d0").mkdir()
    (tiny / "d0" / "f0.txt").write_text("not the same content\n")  # would overwrite one of the target's
    before, rec = snapshot(tmp_path / "wipe"), state(tmp_path)
    cp = files(addr, certkey_file, tiny, "wipe")
    assert cp.returncode == 2, cp.stdout + cp.stderr
    assert cp.stderr.strip() == ("would delete 31 of 33 entries on target 'wipe' (more than half): wrong source? "
                                 "nothing was changed; rerun with --max-delete 31 (or --max-delete -1 for no limit) "
                                 "to allow it")
    assert cp.stdout == ""
    assert snapshot(tmp_path / "wipe") == before and state(tmp_path) == rec
    # the session ended without a round, cleanly
    assert [(o.ok, o.error, o.rounds) for o in outcomes(receiver)] == [(True, None, 0)]
    # the dry run says the same, and exits 0
    dry = files(addr, certkey_file, tiny, "wipe", "--dry-run")
    assert dry.returncode == 0 and "a real round would stop before changing anything: would delete 31 of 33" in dry.stderr
    assert snapshot(tmp_path / "wipe") == before
    # allowed, it goes ahead
    ok = files(addr, certkey_file, tiny, "wipe", "--max-delete", "31")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["deleted"] == 31
    assert sorted(os.listdir(tmp_path / "wipe")) == ["d0"]


def test_small_targets_and_half_of_a_target_are_not_guarded(tmp_path, rx, certkey_file):
    _, addr = rx
    src = make_tree(str(tmp_path / "src"), n_files=6, dirs=2)  # 8 entries: below the floor
    assert files(addr, certkey_file, src, "tree").returncode == 0
    import shutil
    shutil.rmtree(f"{src}/d0")
    shutil.rmtree(f"{src}/d1")
    cp = files(addr, certkey_file, src, "tree")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["deleted"] == 8 and os.listdir(tmp_path / "dst") == []
    big = make_tree(str(tmp_path / "big"), n_files=20, dirs=2)  # 22 entries: exactly half may go
    assert files(addr, certkey_file, big, "wipe").returncode == 0
    shutil.rmtree(f"{big}/d1")
    cp = files(addr, certkey_file, big, "wipe")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["deleted"] == 11


@pytest.mark.parametrize("limit,code", [("4", 2), ("5", 0), ("6", 0), ("0", 2), ("-1", 0)])
def test_max_delete_below_at_and_above(tmp_path, rx, certkey_file, limit, code):
    _, addr = rx
    src = make_tree(str(tmp_path / "src"), n_files=30, dirs=3)
    assert files(addr, certkey_file, src, "tree").returncode == 0
    for i in range(5):
        os.unlink(f"{src}/d0/f{i}.txt")
    with open(f"{src}/d1/f1.txt", "a") as fh:
        fh.write("changed")
    before, rec = snapshot(tmp_path / "dst"), state(tmp_path)
    cp = files(addr, certkey_file, src, "tree", "--max-delete", limit)
    assert cp.returncode == code, cp.stdout + cp.stderr
    if code:
        want = ("and --max-delete 0 allows none" if limit == "0" else f"more than --max-delete {limit}")
        assert cp.stderr.strip() == (f"would delete 5 entries on target 'tree', {want}: nothing was changed; "
                                     f"rerun with --max-delete 5 to allow it")
        assert snapshot(tmp_path / "dst") == before and state(tmp_path) == rec
    else:
        assert json.loads(cp.stdout)["deleted"] == 5
        assert not os.path.exists(tmp_path / "dst" / "d0" / "f0.txt")


def test_max_delete_zero_lets_a_round_without_deletions_run(tmp_path, rx, certkey_file):
    _, addr = rx
    src = make_tree(str(tmp_path / "src"), n_files=4, dirs=1)
    cp = files(addr, certkey_file, src, "tree", "--max-delete", "0")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["files_sent"] == 4


@pytest.mark.parametrize("args,match", [
    (["--max-delete", "-2"], "-2 is below -1"),
    (["--max-delete", "nope"], "'nope' is not a whole number"),
    (["--dry-run", "--continuous"], "--continuous does not go with it"),
    (["--dry-run", "--progress", "json"], "--progress does not go with it"),
])
def test_bad_dry_run_and_max_delete_flags_touch_nothing(tmp_path, rx, certkey_file, args, match):
    _, addr = rx
    src = make_tree(str(tmp_path / "src"), n_files=4, dirs=1)
    cp = files(addr, certkey_file, src, "fresh", *args)
    assert cp.returncode == 2, cp.stderr
    assert match in cp.stderr and "Traceback" not in cp.stderr
    assert not os.path.lexists(tmp_path / "fresh")


def test_continuous_rounds_are_guarded_too(tmp_path, rx, certkey_file):
    _, addr = rx
    src = make_tree(str(tmp_path / "src"), n_files=30, dirs=3)
    assert files(addr, certkey_file, src, "wipe").returncode == 0
    empty = tmp_path / "mnt"  # a mount point whose file system did not come up
    empty.mkdir()
    before, rec = snapshot(tmp_path / "wipe"), state(tmp_path)
    cp = files(addr, certkey_file, empty, "wipe", "--continuous", "--interval", "1", "--journal", "off", timeout=60)
    assert cp.returncode == 2, cp.stdout + cp.stderr
    assert "would delete 33 of 33 entries on target 'wipe' (more than half)" in cp.stderr
    assert snapshot(tmp_path / "wipe") == before and state(tmp_path) == rec


def contents(root) -> dict:
    """Every entry under ``root`` by path: kind and file content."""
    out = {}
    for top, dirs, names in os.walk(root):
        for n in dirs:
            out[os.path.relpath(os.path.join(top, n), root)] = "dir"
        for n in names:
            with open(os.path.join(top, n), "rb") as fh:
                out[os.path.relpath(os.path.join(top, n), root)] = fh.read()
    return out


@pytest.mark.parametrize("journal", [
    "off", pytest.param("auto", marks=pytest.mark.skipif(os.geteuid() != 0, reason="the change journal needs root"))])
def test_a_continuous_sender_follows_a_tree_that_turns_over_and_stops_when_the_source_collapses(
        tmp_path, rx, certkey_file, journal):
    """After a whole-tree round the default guard asks whether the source collapsed, not whether
    more than half of the target's names went: a directory holding most of the tree renamed (a
    fast-turning spool is the same) is followed; the tree gone at once (as an unmount leaves its
    mount point, or an rm -rf) still stops the sender before it deletes anything. A journal
    round (which lists only the directories that changed) counts the source when it would
    delete more than half of what the last whole-tree round saw."""
    _, addr = rx
    src = tmp_path / "src"
    for d, n in (("big", 24), ("small", 6)):
        (src / "top" / d).mkdir(parents=True)
        for i in range(n):
            (src / "top" / d / f"f{i}").write_bytes(b"%s %d\n" % (d.encode(), i) * (i + 1))
    proc = subprocess.Popen(CLI + ["send", "files", "--json", str(src), "--to", addr, "--target", "wipe",
                                   "--certkey", certkey_file, "--continuous", "--interval", "3600",
                                   "--journal", journal], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(proc.stdout.readline())["entries"] == 34  # the root, top, 2 directories, 30 files
        os.rename(src / "top" / "big", src / "top" / "big2")  # 25 of the target's 33 entries lose their names
        proc.send_signal(signal.SIGUSR1)  # a round now
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        second = json.loads(line)
        by_journal = journal == "auto" and kernels.TREE  # the pure backend's rounds walk the whole tree
        assert (second["scope"], second["deleted"], second["files_sent"]) == (
            "journal" if by_journal else "whole", 25, 24), second
        assert contents(tmp_path / "wipe") == contents(src)
        kept, kept_whole = contents(tmp_path / "wipe"), snapshot(tmp_path / "wipe")
        os.rename(src / "top", tmp_path / "elsewhere")  # the whole tree gone at once
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, err
    if not by_journal:
        assert ("would delete 33 of 33 entries on target 'wipe' (more than half), and the source holds 1 entries "
                "where the last whole-tree round saw 34: source unmounted or emptied? nothing was changed") in err
    else:
        assert ("would delete 33 entries on target 'wipe', more than half of the 34 that the last whole-tree round "
                "saw, and the source holds 1 entries now: source unmounted or emptied? nothing was deleted") in err
    assert contents(tmp_path / "wipe") == kept
    if not by_journal:  # refused before the round began: not even a time changed
        assert snapshot(tmp_path / "wipe") == kept_whole


def blocks(addr, certkey, src, state_dir, *extra, target="img", json_out=True):
    return subprocess.run(CLI + ["send", "block", *(["--json"] if json_out else []), str(src), "--to", addr, "--target",
                                 target, "--certkey", certkey, "--state-dir", str(state_dir), *extra],
                          capture_output=True, text=True, timeout=120)


def test_block_dry_run_reports_what_the_round_then_sends_and_writes_nothing(tmp_path, rx, certkey_file):
    _, addr = rx
    src = tmp_path / "src.img"
    data = bytearray(os.urandom(4 << 20))
    data[1 << 20:2 << 20] = bytes(1 << 20)  # zero blocks go as zero ranges
    src.write_bytes(data)
    sstate = tmp_path / "send-state"
    img = tmp_path / "disk.img"
    cp = blocks(addr, certkey_file, src, sstate, "--dry-run", json_out=False)
    assert cp.returncode == 0, cp.stderr
    assert not img.exists() and not (sstate / "img").exists()  # nothing created, here or there
    first = cp.stdout.splitlines()[0]
    assert re.search(r"dry run, full round 1 .* 768 blocks \(3145728 bytes\) in 2 ranges would be sent, "
                     r"1048576 bytes of zero blocks", first), first
    assert "ranges (offset+length): 0+1048576 2097152+2097152" in cp.stdout
    real = blocks(addr, certkey_file, src, sstate)
    assert real.returncode == 0, real.stderr
    assert json.loads(real.stdout)["data_bytes"] == 3145728
    with open(src, "r+b") as fh:  # three changed blocks: two apart, one run of two
        fh.seek(8192)
        fh.write(bytes([data[8192] ^ 0xFF]))  # a fixed byte equals the random one 1 time in 256
        fh.seek(3 << 20)
        fh.write(bytes(b ^ 0xFF for b in data[3 << 20:(3 << 20) + 5000]))
    before, rec, img_sum = snapshot(tmp_path / "rx-state"), state(tmp_path), hashlib.sha256(img.read_bytes()).digest()
    img_st = os.stat(img)
    cp = blocks(addr, certkey_file, src, sstate, "--dry-run", json_out=False)
    assert cp.returncode == 0, cp.stderr
    assert "sync round 2" in cp.stdout and "3 blocks (12288 bytes) in 2 ranges" in cp.stdout, cp.stdout
    assert hashlib.sha256(img.read_bytes()).digest() == img_sum and os.stat(img).st_mtime_ns == img_st.st_mtime_ns
    assert state(tmp_path) == rec and snapshot(tmp_path / "rx-state") == before
    v = subprocess.run(CLI + ["-v", "send", "block", str(src), "--to", addr, "--target", "img", "--certkey",
                              certkey_file, "--state-dir", str(sstate), "--dry-run"], capture_output=True, text=True)
    assert v.returncode == 0 and "  8192+4096" in v.stdout and f"  {3 << 20}+8192" in v.stdout, v.stdout
    j = subprocess.run(CLI + ["send", "block", "--json", str(src), "--to", addr, "--target", "img", "--certkey",
                              certkey_file, "--state-dir", str(sstate), "--dry-run"], capture_output=True, text=True)
    assert j.returncode == 0, j.stderr
    assert json.loads(j.stdout) == {"dry_run": True, "round": 2, "kind": "sync", "resumed_from": 0,
                                    "source_bytes": 4 << 20, "blocks": 3, "data_bytes": 12288, "zero_bytes": 0,
                                    "ranges": [[8192, 4096], [3 << 20, 8192]]}, j.stdout
    real = blocks(addr, certkey_file, src, sstate)
    assert real.returncode == 0, real.stderr
    assert json.loads(real.stdout)["data_bytes"] == 12288


def test_a_dry_run_session_may_not_begin_a_round(tmp_path, rx, bundle, certkey_file):
    """The receiver holds a dry run to what it said it is: a sender that lists DRY_RUN and then
    begins a round (a bug, or a hostile peer) is refused; the target and its record stay."""
    from smsrepl.protocol import CAPABILITIES, PROTOCOL_VERSION, SENDER, Connection
    from smsrepl.protocol import frames as F
    from smsrepl.transport.channel import Channel
    from smsrepl.transport.connect import connect, parse_address
    from smsrepl.transport.tls import client_context

    _, addr = rx
    src = make_tree(str(tmp_path / "src"), n_files=4, dirs=1)
    assert files(addr, certkey_file, src, "tree").returncode == 0
    before, rec = snapshot(tmp_path / "dst"), state(tmp_path)
    chan = Channel(connect(parse_address(addr), client_context(bundle)), Connection(SENDER))
    try:
        chan.send(F.Hello([PROTOCOL_VERSION], "files", "tree", "dry", 0, 4096, list(CAPABILITIES) + [F.DRY_RUN]))
        assert isinstance(chan.recv(), F.Welcome)
        chan.send(F.RoundBegin(9, "full", 0))
        ev = chan.recv()
    finally:
        chan.close()
    assert isinstance(ev, F.Error) and "a dry run may not begin a round" in ev.message, ev
    assert snapshot(tmp_path / "dst") == before and state(tmp_path) == rec
