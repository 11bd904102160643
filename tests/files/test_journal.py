"""The change journal (files.journal): which directories it names for the changes a live tree
goes through, its round boundary, and what makes it give up on a round (a queue overflow)."""
import os
import shutil

import pytest

from smsrepl.files.journal import ChangeJournal, open_journal
from smsrepl.files.describe import normal_subset
from smsrepl.protocol import frames as F
from smsrepl.protocol import layout as L
from smsrepl.protocol.readers import read_subset

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="fanotify with FAN_MARK_FILESYSTEM needs CAP_SYS_ADMIN")


@pytest.fixture
def journal(tmp_path):
    src = tmp_path / "src"
    for d in ("a/b", "c", "x/y"):
        os.makedirs(src / d)
    (src / "a" / "b" / "one.log").write_text("1")
    j = ChangeJournal(str(src), whole_every=0)
    first = j.take(round_id=None)
    assert first.whole_because and "first round" in first.whole_because
    j.completed(1)
    yield src, j
    j.close()


def _dirs(changes):
    assert changes.whole_because is None, changes.whole_because
    return dict(normal_subset(changes.dirs))


@needs_root
def test_names_the_directories_that_changed_and_walks_moved_ones_whole(journal):
    src, j = journal
    (src / "a" / "b" / "one.log").write_text("22")  # content: its directory
    os.makedirs(src / "c" / "new" / "deeper")  # a new directory: walked whole, its parent listed
    (src / "c" / "new" / "deeper" / "f").write_text("f")
    os.rename(src / "x" / "y", src / "a" / "moved")  # brings content that raised no event
    got = _dirs(j.take(round_id=1))
    assert got[b"a/b"] is False
    assert got[b"c/new"] is True and got[b"c"] is False
    assert got[b"a/moved"] is True  # found under its new name
    assert got[b"x"] is False and got[b"a"] is False  # the directories it left and entered
    j.completed(2)
    assert _dirs(j.take(round_id=2)) == {}  # nothing since: nothing to scan


@needs_root
def test_a_directory_removed_whole_is_listed_whole_from_its_parent(journal):
    src, j = journal
    shutil.rmtree(src / "a" / "b")
    os.chmod(src / "c", 0o700)  # the directory itself: its parent's listing carries it
    got = _dirs(j.take(round_id=1))
    assert got[b"a"] is False and got[b"a/b"] is True
    assert b"" in got  # c's parent, the root


@needs_root
def test_the_round_boundary_splits_changes_between_rounds(journal):
    src, j = journal
    (src / "c" / "before").write_text("x")
    assert b"c" in _dirs(j.take(round_id=1))
    j.completed(2)
    (src / "x" / "after").write_text("y")
    got = _dirs(j.take(round_id=2))
    assert b"x" in got and b"c" not in got


@needs_root
def test_changes_outside_the_tree_are_not_named(journal, tmp_path):
    src, j = journal
    (tmp_path / "elsewhere").write_text("same file system, not the tree")
    assert _dirs(j.take(round_id=1)) == {}


@needs_root
def test_whole_tree_when_the_journal_cannot_vouch(journal):
    src, j = journal
    assert "not 1" in j.take(round_id=7).whole_because  # another sender's round came between
    j.completed(3)
    j.force_whole("the last round did not complete")
    assert j.take(round_id=3).whole_because == "the last round did not complete"
    j.completed(4)
    assert j.take(round_id=4, whole="the cutover").whole_because == "the cutover"


@needs_root
def test_every_nth_round_walks_the_whole_tree(tmp_path):
    j = ChangeJournal(str(tmp_path), whole_every=3)
    try:
        kinds = []
        for r in range(1, 8):
            kinds.append(j.take(round_id=j.last_round).whole_because is None)
            j.completed(r)
        assert kinds == [False, True, True, False, True, True, False]
    finally:
        j.close()


@needs_root
@pytest.mark.parametrize("run", range(10 if os.environ.get("SMSREPL_SLOW") else 3))
def test_a_provoked_overflow_makes_the_next_round_walk_the_whole_tree(journal, run):
    """The reader stops (as a descheduled sender would), more events than the kernel's queue
    holds (16,384) arrive: the next round walks the whole tree, the one after is a journal round."""
    src, j = journal
    j.pause()
    d = src / "c"
    for i in range(20000):  # 20,000 names (a name's create and delete make one event)
        p = d / f"t{i}"
        p.touch()
        p.unlink()
    j.pause(False)
    got = j.take(round_id=1)
    assert got.whole_because and "overflow" in got.whole_because
    j.completed(2)
    (src / "a" / "again").write_text("z")
    assert b"a" in _dirs(j.take(round_id=2))


def test_without_privileges_no_journal_and_one_notice(tmp_path, monkeypatch):
    import smsrepl.files.journal as J

    class Refused:
        def __init__(self, *a, **k):
            raise J.JournalUnavailable("fanotify_init: Operation not permitted (needs CAP_SYS_ADMIN)")

    monkeypatch.setattr(J, "ChangeJournal", Refused)
    lines = []
    assert open_journal(str(tmp_path), notice=lines.append) is None
    assert len(lines) == 1 and "CAP_SYS_ADMIN" in lines[0] and "whole tree" in lines[0]


@needs_root
def test_without_cap_sys_admin_no_journal_and_one_notice(tmp_path):
    """As an unprivileged user (privileges dropped in a child process): no journal, one notice."""
    import subprocess
    import sys

    code = ("import os; from smsrepl.files.journal import open_journal; "
            "os.setgroups([]); os.setgid(65534); os.setuid(65534); lines = []; "  # nobody, no capabilities
            "j = open_journal('/', notice=lines.append); print(j is None, len(lines)); print(lines[0])")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    first, notice = cp.stdout.splitlines()[:2]
    assert first == "True 1"
    assert "Operation not permitted" in notice and "CAP_SYS_ADMIN" in notice and "whole tree" in notice


def test_tree_subset_frames_round_trip_and_bad_ones_are_refused():
    from smsrepl.protocol import RECEIVER, SENDER, Connection
    from smsrepl.protocol.connection import State

    ev = F.TreeSubset(((b"", False), (b"a/b c", True), ("\u00e9".encode(), False)))
    tx, rx = Connection(SENDER), Connection(RECEIVER)
    tx.state = rx.state = State.IDLE
    rx.receive_data(b"".join(bytes(p) for p in F.encode(ev)))
    assert rx.next_event() == ev
    for bad in (b"../etc", b"a//b", b"a/./b", b"/abs"):
        body = L.SUBSET.pack(0, 1) + L.SUBDIR.pack(0, len(bad)) + bad
        with pytest.raises(F.FrameError):
            read_subset(body)
    with pytest.raises(F.FrameError):
        read_subset(L.SUBSET.pack(0, 2) + L.SUBDIR.pack(1, 1) + b"a")  # shorter than its count


def test_normal_subset_drops_what_a_recursive_directory_covers():
    got = normal_subset([(b"a/b", False), (b"a", True), (b"c", False), (b"c", True), (b"c/d", False),
                         (b"x/y", False), (b"", False), (b"x", False)])
    assert got == [(b"", False), (b"a", True), (b"c", True), (b"x", False), (b"x/y", False)]


@needs_root
def test_a_handle_that_does_not_resolve_makes_the_round_whole(journal, monkeypatch):
    """Gone directories (ESTALE) are dropped, but a handle this system cannot open (a file system
    that makes handles it cannot decode) would lose a change: the round walks the whole tree."""
    import errno

    src, j = journal
    (src / "c" / "new").write_text("x")

    def refuse(group, handle):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(j, "_path", refuse)
    got = j.take(round_id=1)
    assert got.whole_because and "does not resolve" in got.whole_because


MOUNTS = os.path.join(os.path.dirname(__file__), "journal_mounts.py")


@needs_root
@pytest.mark.skipif(not (shutil.which("unshare") and shutil.which("mount")), reason="needs unshare and mount")
def test_a_file_system_mounted_in_the_tree_or_unmounted_from_it_makes_a_whole_round_then_is_followed(tmp_path):
    """The journal marks the file systems the tree spanned when it opened: one mounted later
    raised no event, and one unmounted left its mount point's parent file system unwatched.
    Each round compares the mount table, walks the whole tree once it changed, and marks what
    the tree spans now; no descriptor of a marked file system keeps it from being unmounted."""
    import json
    import subprocess
    import sys

    cp = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, MOUNTS, str(tmp_path)],
                        capture_output=True, text=True, timeout=60)
    if cp.returncode == 99:
        pytest.skip("cannot mount a tmpfs in a private mount namespace here")
    assert cp.returncode == 0, cp.stderr  # the unmount was not refused as busy
    v = json.loads(cp.stdout.splitlines()[-1])
    sub = os.path.join(os.path.realpath(tmp_path), "src", "sub")
    assert v["mounted"] == f"the file systems in the tree changed since the last round (mounted at {sub})"
    assert v["written_on_the_mount"] == ["", "sub"]  # the new file system's events are read
    assert v["unmounted"] == f"the file systems in the tree changed since the last round (gone from {sub})"
    assert v["written_after"] == ["", "plain"] and v["file_systems"] == 1
