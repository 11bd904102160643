"""New directories under temporary names (files.durable): a round's new directory is made
under a temporary name, its small files are created in it under their own names, and it gets
its final name only after a syncfs that began once those files were written; a failed syncfs
names none, a killed round leaves only a temporary that the next round removes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from smsrepl import kernels
from smsrepl.errors import TargetWriteError
from smsrepl.files import durable
from smsrepl.files import wire as W
from smsrepl.files.apply import TreeWriter
from smsrepl.files.dirscan import scan_dirs, without_temporaries
from smsrepl.files.local import sync_tree
from smsrepl.files.names import TEMP_RE, remove_temporaries
from smsrepl.files.scan import Entry
from tests.files.test_flush_behind import traced as traced_runs  # noqa: F401  (a fixture)

pytestmark = pytest.mark.skipif(not kernels.TREE, reason="native tree kernels not built")

MTIME = 1_600_000_000 * 10**9


def _dir(path: str) -> Entry:
    return Entry(path.encode(), "dir", 0o755, os.getuid(), os.getgid(), 0, MTIME, 0, 0, 2, 0)


def _files(paths: list[str]) -> bytes:
    out = b""
    for p in paths:
        data = p.encode() * 50
        e = Entry(p.encode(), "file", 0o640, os.getuid(), os.getgid(), len(data), MTIME, 0, 0, 1, 0)
        out += b"".join(bytes(x) for x in W.encode_op(W.FILE, e, data=data))
    return out


def _write(w: TreeWriter, paths: list[str]) -> None:
    body, pos = _files(paths), 0
    while pos < len(body):
        end, files, _ = w.write_run(body, pos)
        assert files and end > pos
        pos = end


def _visible(root) -> list[str]:
    """Paths under ``root`` reachable without passing a temporary name."""
    out = []
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not TEMP_RE.match(d.encode())]
        rel = os.path.relpath(top, root)
        out += [os.path.normpath(os.path.join(rel, n)) for n in dirs + [f for f in files if not f.startswith(".")]]
    return sorted(out)


@pytest.fixture
def traced(traced_runs, monkeypatch):
    """test_flush_behind's events, each link only with the files it named (fd -1: created under
    its name), and ("rename", dest) for each rename."""
    events = traced_runs
    real_link, real_rename = kernels.link_files, os.rename

    def link_files(fds, dirs, fdirs, names, tag):
        got = real_link(fds, dirs, fdirs, names, tag)
        named = tuple(n for fd, n in zip(fds, names) if fd >= 0)
        at = max(i for i, (k, _) in enumerate(events) if k == "link")
        events[at] = ("link", named)
        return got

    def rename(src, dst, **kw):
        events.append(("rename", dst))
        return real_rename(src, dst, **kw)

    monkeypatch.setattr(kernels, "link_files", link_files)
    monkeypatch.setattr(durable.os, "rename", rename)
    monkeypatch.setattr(durable, "PENDING_FILES", 8)
    return events


def _assert_named_after_their_files_were_durable(traced) -> None:
    """Each directory's rename comes after a syncfs that began after the last write of a file
    in it (or below it) and ended before the rename (directory names are unique here)."""
    renames = [(i, what) for i, (k, what) in enumerate(traced) if k == "rename"]
    assert renames, traced
    for i, name in renames:
        wrote = max(j for j, (k, what) in enumerate(traced[:i]) if k == "write"
                    and any(name in p.split(b"/")[:-1] for p in what))
        began = [j for j in range(wrote + 1, i) if traced[j] == ("sync", "start")]
        ended = [j for j in range(wrote + 1, i) if traced[j] == ("sync", "end")]
        assert began and ended and ended[-1] > began[0], (name, traced)


def test_a_new_directory_is_named_after_a_syncfs_that_began_once_its_files_were_written(tmp_path, traced):
    with TreeWriter(str(tmp_path)) as w:
        w.mkdir(_dir("a"))
        w.mkdir(_dir("a/b"))
        assert _visible(tmp_path) == []  # under temporary names
        _write(w, [f"a/b/f{i:02}" for i in range(20)] + [f"a/g{i}" for i in range(3)])
        assert _visible(tmp_path) == []
        w.finish()
    want = ["a", "a/b"] + [f"a/b/f{i:02}" for i in range(20)] + [f"a/g{i}" for i in range(3)]
    assert _visible(tmp_path) == sorted(want)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    for i in range(20):
        p = tmp_path / "a" / "b" / f"f{i:02}"
        assert p.read_bytes() == f"a/b/f{i:02}".encode() * 50 and (p.stat().st_mode & 0o777) == 0o640
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755  # the directory's own metadata, at finish
    # created under their names: none of them was linked
    assert not [n for kind, what in traced if kind == "link" for n in what]
    _assert_named_after_their_files_were_durable(traced)


def test_directories_get_their_names_along_the_round_past_the_stage_bounds(tmp_path, traced, monkeypatch):
    """What a killed round can lose is bounded: past STAGE_FILES files created by name, the
    directories holding them are closed (later files in them are anonymous, linked after
    their syncfs) and named after the next syncfs, before the round ends."""
    monkeypatch.setattr(durable, "STAGE_FILES", 10)
    with TreeWriter(str(tmp_path)) as w:
        w.mkdir(_dir("a"))
        for i in range(0, 12, 3):
            _write(w, [f"a/f{j:02}" for j in range(i, i + 3)])
        _write(w, [f"a/late{j}" for j in range(5)])  # a is closed, not yet named
        w.mkdir(_dir("b"))
        _write(w, [f"b/f{i:02}" for i in range(4)])
        w.flush_pending()
        assert "a" in _visible(tmp_path) and "b" not in _visible(tmp_path)
        w.finish()
    assert _visible(tmp_path) == sorted(["a", "b"] + [f"a/f{i:02}" for i in range(12)] +
                                        [f"a/late{j}" for j in range(5)] + [f"b/f{i:02}" for i in range(4)])
    linked = sorted(n for kind, what in traced if kind == "link" for n in what)
    assert linked == [b"late%d" % j for j in range(5)]  # b, new after a was closed, took its files by name
    _assert_named_after_their_files_were_durable(traced)


def test_a_failed_syncfs_names_no_new_directory(tmp_path, traced, monkeypatch):
    calls = []
    real = durable._syncfs

    def failing(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise TargetWriteError("syncfs failed: Input/output error")
        real(fd)

    monkeypatch.setattr(durable, "_syncfs", failing)
    w = TreeWriter(str(tmp_path))
    try:
        w.mkdir(_dir("a"))
        _write(w, [f"a/f{i}" for i in range(5)])
        with pytest.raises(TargetWriteError, match="syncfs failed"):
            w.finish()
        w.close_stages()  # a cut round's cleanup
        w.flush_pending()
    finally:
        w.close()
    assert _visible(tmp_path) == []
    remove_temporaries(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_a_cut_round_leaves_its_new_directories_with_their_owner_and_mode_not_0700(tmp_path):
    """What a cut round received whole keeps its name (keep_cut), and so do the new directories
    holding it: with the source's mode (they are made 0700), not yet its times (their contents
    are not all there)."""
    w = TreeWriter(str(tmp_path))
    try:
        w.mkdir(_dir("a"))
        w.mkdir(_dir("a/b"))
        _write(w, ["a/f1", "a/b/f2"])
        w.keep_cut()
    finally:
        w.close()
    assert _visible(tmp_path) == ["a", "a/b", "a/b/f2", "a/f1"]
    for d in ("a", "a/b"):
        st = os.stat(tmp_path / d)
        assert (st.st_mode & 0o7777, st.st_uid) == (0o755, os.getuid()) and st.st_mtime_ns != MTIME, d


def test_a_new_directory_is_seen_under_its_final_name_by_lookups_and_metadata(tmp_path):
    """An entry looked up or changed at the path of a directory still under a temporary name
    (the round's own lookups, a META after its DIR) finds it: it is named first."""
    with TreeWriter(str(tmp_path)) as w:
        w.mkdir(_dir("a"))
        _write(w, ["a/f"])
        assert w.existing(b"a") is not None and _visible(tmp_path) == ["a", "a/f"]
        w.mkdir(_dir("b"))
        w.set_meta(Entry(b"b", "dir", 0o700, os.getuid(), os.getgid(), 0, MTIME + 10**9, 0, 0, 2, 0))
        w.finish()
    st = os.stat(tmp_path / "b")
    assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o700, MTIME + 10**9)


def test_a_file_that_takes_a_new_directorys_path_later_in_the_round_wins(tmp_path):
    """DIR a, its files, then a FILE a (the source replaced the directory by a file while the
    round ran): the round ends with the file, as it did when a rename replaced the directory."""
    with TreeWriter(str(tmp_path)) as w:
        w.mkdir(_dir("a"))
        _write(w, ["a/f", "a/g"])
        _write(w, ["a"])
        w.finish()
    assert os.listdir(tmp_path) == ["a"]
    assert (tmp_path / "a").read_bytes() == b"a" * 50


def test_the_next_round_removes_what_a_killed_one_left(tmp_path):
    """A writer killed with new directories under temporary names: the next listing removes
    them whole, lists nothing of them, and the next round brings the tree."""
    src = tmp_path / "src"
    for d in range(3):
        (src / f"d{d}" / "sub").mkdir(parents=True)
        for i in range(30):
            (src / f"d{d}" / "sub" / f"f{i}").write_bytes(b"%d-%d" % (d, i) * 100)
    dst = tmp_path / "dst"
    dst.mkdir()
    code = f"""
import os
from smsrepl.files import durable
from smsrepl.files.local import sync_tree
real = durable.PendingFiles.flush_pending
def killed(self):
    if self._staged:
        os._exit(9)  # before anything is durable or named
    real(self)
durable.PendingFiles.flush_pending = killed
sync_tree({str(src)!r}, {str(dst)!r})
"""
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    left = os.listdir(dst)
    assert left and all(TEMP_RE.match(n.encode()) for n in left), left
    batches = [without_temporaries(os.fsencode(dst), b) for b in scan_dirs(dst, threads=1, on_error=lambda p, exc: None)]
    assert not [n for b in batches for n in b.names]
    assert os.listdir(dst) == []
    stats = sync_tree(str(src), str(dst))
    assert stats.files_sent == 90
    for d in range(3):
        for i in range(30):
            assert (dst / f"d{d}" / "sub" / f"f{i}").read_bytes() == b"%d-%d" % (d, i) * 100


def test_files_created_under_their_names_hold_no_descriptors_of_the_budget(tmp_path):
    """A file created by name in a directory under a temporary name is closed at once (fd -1):
    only the run's directory descriptor counts against the process's budget, which other
    sessions share (a phantom count made this writer flush early and others wait)."""
    with TreeWriter(str(tmp_path)) as w:
        budget = w._budget
        before = budget.held
        os.mkdir(tmp_path / "old")
        w.mkdir(_dir("new"))
        _write(w, [f"new/f{i}" for i in range(20)])
        assert (w._held, budget.held - before) == (1, 1)  # the directory's descriptor only
        _write(w, [f"old/f{i}" for i in range(5)])  # anonymous: a descriptor each, and the directory's
        assert (w._held, budget.held - before) == (7, 7)
        w.flush_pending()
        assert (w._held, budget.held - before) == (0, 0)
        w.finish()
    assert budget.held == before
    assert sorted(os.listdir(tmp_path / "new")) == sorted(f"f{i}" for i in range(20))


def test_a_path_written_twice_in_one_run_keeps_the_later_data(tmp_path, monkeypatch):
    """Two FILE operations for one path in one run, in a directory under a temporary name: the
    writing threads may create the later one under its name first; the earlier one, which then
    finds its name taken, must not be linked over it afterwards (linking in order keeps the
    later one everywhere else)."""
    monkeypatch.setattr(durable, "WRITE_THREADS", 2)

    def op(path: str, data: bytes) -> bytes:
        e = Entry(path.encode(), "file", 0o640, os.getuid(), os.getgid(), len(data), MTIME, 0, 0, 1, 0)
        return b"".join(bytes(x) for x in W.encode_op(W.FILE, e, data=data))

    for trial in range(6):
        root = tmp_path / f"t{trial}"
        root.mkdir()
        # a thread takes 8 files at a time: the first writes 7 large ones before "old", the
        # second begins with "new"
        body = b"".join(op(f"a/big{i}", os.urandom(200_000)) for i in range(7)) + op("a/x", b"old") + \
            op("a/x", b"new") + b"".join(op(f"a/g{i}", b"g") for i in range(7))
        with TreeWriter(str(root)) as w:
            w.mkdir(_dir("a"))
            pos = 0
            while pos < len(body):
                pos, files, _ = w.write_run(body, pos)
                assert files
            w.finish()
        assert (root / "a" / "x").read_bytes() == b"new", trial


def test_large_files_count_toward_the_stage_bounds(tmp_path, monkeypatch):
    """Files written the careful way (large ones, BEGIN .. END) into a new directory count toward
    STAGE_BYTES as the small ones do: past it the directory is named after the next syncfs, so
    that a killed round does not lose (and the next re-send) more than the bound of what was
    already durable; they were not counted, and a directory of large files stayed under its
    temporary name to the round's end, however much it held."""
    monkeypatch.setattr(durable, "STAGE_BYTES", 1 << 20)
    with TreeWriter(str(tmp_path)) as w:
        w.mkdir(_dir("a"))
        for i in range(3):
            data = bytes([i + 1]) * (600 << 10)
            e = Entry(b"a/big%d" % i, "file", 0o640, os.getuid(), os.getgid(), len(data), MTIME, 0, 0, 1, 0)
            w.write_file(e, [data])
        w.flush_pending()  # the syncfs after the bound was passed
        assert _visible(tmp_path) == ["a", "a/big0", "a/big1", "a/big2"]
        w.finish()
    assert (tmp_path / "a" / "big2").read_bytes() == bytes([3]) * (600 << 10)
