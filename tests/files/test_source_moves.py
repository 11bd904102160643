"""A live source moves under a round: what vanished after it was listed, and what kept changing
while it was read, are counted, never fail the round, and never reach the target as a mix of
two versions; deletions converge whatever rounds failed before."""
import os
import shutil

import pytest

from smsrepl import kernels
from smsrepl.files.local import sync_tree
from smsrepl.files.source import SourceWalkErrors, scan_round, walk_round
from smsrepl.files.rules import PathRules
from smsrepl.errors import SourceError

from .trees import oracle

pytestmark = pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync (the oracle) is not installed")


def _tree(root):
    for d in ("a", "a/b", "c"):
        os.makedirs(root / d, exist_ok=True)
    for i in range(20):
        (root / "a" / f"f{i}.log").write_bytes(b"x" * (i * 100))
        (root / "a" / "b" / f"g{i}.log").write_bytes(b"y" * i)
    (root / "c" / "big.dat").write_bytes(os.urandom(2 << 20))
    return root


def remote_round(src, dst, **kw):
    """sync_tree to ``dst`` as a receiver would see it: its listing, and operations applied
    in order (a directory-at-a-time round with the native kernels)."""
    from smsrepl.codec import Compressor, Decompressor
    from smsrepl.files.apply import TreeWriter
    from smsrepl.files.describe import describe_tree
    from smsrepl.files.listing import Listing
    from smsrepl.files.opapply import OpApplier
    from smsrepl.files.opstream import OpStream
    from smsrepl.files.remote import RemoteTarget

    os.makedirs(dst, exist_ok=True)
    listing, decomp = Listing(), Decompressor()
    for frame in describe_tree(dst):
        listing.add(frame, decomp)
    applier = OpApplier(TreeWriter(dst))
    ops = OpStream(applier.apply, Compressor(1))
    try:
        stats = sync_tree(str(src), RemoteTarget(listing, ops), **kw)
        applier.w.finish()
    finally:
        ops.close()
        applier.close()
        applier.w.close()  # its share of the process's descriptor budget goes back
    return stats


native = pytest.mark.skipif(not kernels.TREE, reason="directory-at-a-time rounds need the native kernels")


@pytest.mark.parametrize("listing", ["walk", pytest.param("scan", marks=native)])
def test_files_gone_after_listing_are_counted_and_the_round_completes(tmp_path, listing):
    src, dst = _tree(tmp_path / "src"), tmp_path / "dst"
    errors = SourceWalkErrors(os.fsencode(src))
    entries = list((walk_round if listing == "walk" else scan_round)(str(src), None, "full", errors))
    for name in ("a/f3.log", "a/f17.log", "c/big.dat"):  # listed, then gone before they are read
        os.unlink(src / name)
    if listing == "walk":
        stats = sync_tree(str(src), str(dst), entries=entries, walk_errors=errors)
    else:
        stats = remote_round(src, dst, entries=entries, walk_errors=errors)
    assert stats.vanished == 3 and stats.source_moved
    assert not (dst / "a" / "f3.log").exists() and not (dst / "c" / "big.dat").exists()
    assert any("a/f3.log: vanished" in line for line in stats.reported)
    again = sync_tree(str(src), str(dst))  # the next round: exact
    assert again.vanished == 0 and not again.source_moved and oracle(str(src), dst, "--delete") == ""


@native
def test_a_directory_gone_before_it_is_scanned_is_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("SMSREPL_SCAN_THREADS", "1")  # directories are scanned as the round asks
    src, dst = _tree(tmp_path / "src"), tmp_path / "dst"
    errors = SourceWalkErrors(os.fsencode(src))
    batches = scan_round(str(src), None, "full", errors)
    first = next(batches)  # the root's: lists a and c
    shutil.rmtree(src / "a")

    def rest():
        yield first
        yield from batches

    stats = remote_round(src, dst, entries=rest(), walk_errors=errors)
    assert stats.vanished == 1 and [r for r in stats.reported if r.startswith("a: vanished")]


def test_other_read_errors_still_fail_the_round(tmp_path):
    src = _tree(tmp_path / "src")
    errors = SourceWalkErrors(os.fsencode(src))
    with pytest.raises(SourceError, match="cannot read .*a/b.*Permission denied"):
        errors(b"a/b", PermissionError(13, "Permission denied"))


@pytest.fixture
def cpu_hog():
    """A busy process on one core: writers get preempted in the middle of their write() calls,
    which is when a reader can see two versions with the same size and times."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield
    p.kill()
    p.wait()


#: rewrites a file end to end over and over (argv: path, size, chunk), each version one byte value
_REWRITER = """
import os, sys
path, size, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_WRONLY)
v = 0
while True:
    v = v % 255 + 1
    data = bytes([v]) * chunk
    for off in range(0, size, chunk):
        os.pwrite(fd, data, off)
"""


@pytest.mark.parametrize("size,chunk,how", [
    # the careful path is the same with either backend: the native pass takes it
    pytest.param(128 << 10, 16 << 10, "local", marks=native),
    pytest.param(4 << 20, 256 << 10, "local", marks=native),  # chunk by chunk
    pytest.param(128 << 10, 16 << 10, "remote", marks=native),  # small files: read whole in C
])
def test_a_file_that_never_stops_changing_is_not_sent_as_a_mix(tmp_path, cpu_hog, size, chunk, how):
    """A file rewritten end to end over and over by a process that keeps it open, each version
    one byte value, on a busy machine: the target holds one whole version or none, never
    parts of two (equal sizes and times before and after a read do not prove it: a write()
    under way changed them when it started)."""
    import subprocess
    import sys
    import time

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    path = src / "db.dat"
    path.write_bytes(b"\1" * size)
    writer = subprocess.Popen([sys.executable, "-c", _REWRITER, str(path), str(size), str(chunk)])
    try:
        seen = []
        time.sleep(0.3)  # the writer is under way
        for _ in range(5):
            time.sleep(0.03)  # the file's times move on (a round within the same clock tick sees them alike)
            stats = sync_tree(str(src), str(dst)) if how == "local" else remote_round(src, dst)
            seen.append((stats.files_sent, stats.changed_during_read, stats.reread))
            if (dst / "db.dat").exists():
                data = (dst / "db.dat").read_bytes()
                assert len(set(data)) == 1, f"a mix of versions {sorted(set(data))[:5]} after {seen}"
    finally:
        writer.kill()
        writer.wait()
    assert all(c in (0, 1) and (c == 0 or s == 0) for s, c, _ in seen)
    final = sync_tree(str(src), str(dst)) if how == "local" else remote_round(src, dst)
    assert final.changed_during_read == 0 and (dst / "db.dat").read_bytes() == path.read_bytes()  # quiet now


def test_a_file_open_for_writing_and_just_changed_waits_for_the_round_end(tmp_path, monkeypatch):
    """No lease while another process holds the file open for writing: a change younger than
    SETTLE_NS is not trusted; the round reads it again at its end, once it is old enough."""
    import time

    from smsrepl.files.liveread import SETTLE_NS

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    held = open(src / "log.txt", "wb")  # kept open for writing, as a daemon keeps its log
    try:
        held.write(b"line\n" * 100)
        held.flush()
        t0 = time.monotonic()
        stats = sync_tree(str(src), str(dst))
        took = time.monotonic() - t0
        assert stats.files_sent == 1 and (dst / "log.txt").read_bytes() == b"line\n" * 100
        assert took >= SETTLE_NS / 1e9 * 0.8  # it waited for the change to settle
    finally:
        held.close()
    (src / "other.txt").write_bytes(b"closed right away")  # no writer left: leased, no wait
    sleeps = []  # counted, not timed: a loaded machine may take 0.25 s for the round anyway
    real_sleep = time.sleep
    monkeypatch.setattr(time, "sleep", lambda s: (sleeps.append(s), real_sleep(s)))
    stats = sync_tree(str(src), str(dst))
    monkeypatch.undo()
    assert stats.files_sent == 1 and stats.reread == 0 and not [s for s in sleeps if s >= 0.01], sleeps


def test_a_full_round_after_failed_ones_deletes_what_the_source_lacks(tmp_path):
    """The receiver's first completed round is a full one when earlier rounds failed: it must
    still remove what they left that the source no longer has (never under an excluded path)."""
    src, dst = _tree(tmp_path / "src"), tmp_path / "dst"
    sync_tree(str(src), str(dst))
    shutil.rmtree(src / "a" / "b")
    os.unlink(src / "a" / "f1.log")
    (dst / "keep").mkdir()
    (dst / "keep" / "mine.txt").write_text("excluded: stays")
    rules = PathRules.from_configurations({"configurations": [
        {"config_key": "MIGRATE_EXCLUDE_PATH", "config_value": "/keep"}]})
    stats = sync_tree(str(src), str(dst), rules=rules, kind="full")
    assert stats.deleted >= 22
    assert not (dst / "a" / "b").exists() and not (dst / "a" / "f1.log").exists()
    assert (dst / "keep" / "mine.txt").read_text() == "excluded: stays"
    assert oracle(str(src), dst, "--delete", "--exclude=/keep") == ""
