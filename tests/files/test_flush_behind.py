"""Runs of small files made durable behind the writer (files.durable): each batch's syncfs
starts after its files were written and ends before they are linked, batches are linked in
order, and once a syncfs fails no later batch gets its names."""
from __future__ import annotations

import os
import threading
import time

import pytest

from smsrepl import kernels
from smsrepl.errors import TargetWriteError
from smsrepl.files import durable
from smsrepl.files import wire as W
from smsrepl.files.apply import TreeWriter
from smsrepl.files.scan import Entry

pytestmark = pytest.mark.skipif(not kernels.TREE, reason="native tree kernels not built")


def _body(names: list[str]) -> bytes:
    out = b""
    for name in names:
        data = name.encode() * 3
        e = Entry(name.encode(), "file", 0o644, os.getuid(), os.getgid(), len(data), 1_600_000_000 * 10**9,
                  0, 0, 1, 0)
        out += b"".join(bytes(p) for p in W.encode_op(W.FILE, e, data=data))
    return out


@pytest.fixture
def traced(monkeypatch):
    """Events in order: ("write", paths), ("sync", start or end), ("link", paths)."""
    events: list[tuple[str, object]] = []
    lock = threading.Lock()
    real_write, real_link, real_syncfs = kernels.write_files, kernels.link_files, durable._syncfs

    def write_files(*args):
        got = real_write(*args)
        with lock:
            events.append(("write", tuple(got[7])))
        return got

    def syncfs(fd):
        with lock:
            events.append(("sync", "start"))
        time.sleep(0.02)  # a disk: the next batch is linked meanwhile
        real_syncfs(fd)
        with lock:
            events.append(("sync", "end"))

    def link_files(fds, dirs, fdirs, names, tag):
        with lock:
            events.append(("link", tuple(names)))
        return real_link(fds, dirs, fdirs, names, tag)

    monkeypatch.setattr(kernels, "write_files", write_files)
    monkeypatch.setattr(kernels, "link_files", link_files)
    monkeypatch.setattr(durable, "_syncfs", syncfs)
    monkeypatch.setattr(durable, "PENDING_FILES", 6)
    return events


def _write(w: TreeWriter, names: list[str]) -> None:
    body = _body(names)
    pos = 0
    while pos < len(body):
        end, files, _ = w.write_run(body, pos)
        assert files and end > pos
        pos = end


def test_every_batch_is_linked_after_a_syncfs_begun_after_it_was_written(tmp_path, traced):
    names = [f"f{i:03}" for i in range(60)]
    with TreeWriter(str(tmp_path)) as w:
        for i in range(0, len(names), 3):  # frames of 3 files, batches of 6
            _write(w, names[i:i + 3])
        w.finish()
    assert sorted(os.listdir(tmp_path)) == names
    linked = [n for kind, what in traced if kind == "link" for n in what]
    assert linked == [n.encode() for n in names]  # in order, each once
    for i, (kind, what) in enumerate(traced):
        if kind != "link":
            continue
        for name in what:
            wrote = next(j for j, (k, p) in enumerate(traced) if k == "write" and name in p)
            began = [j for j in range(wrote + 1, i) if traced[j] == ("sync", "start")]
            ended = [j for j in range(wrote + 1, i) if traced[j] == ("sync", "end")]
            # a syncfs that began after the file was written ended before it was linked
            assert began and ended and ended[-1] > began[0], (name, traced)


def _fail_syncfs(monkeypatch, nth: int) -> None:
    """The ``nth`` syncfs from now fails, as a disk's write error reaches it."""
    calls = []
    syncfs = durable._syncfs

    def failing(fd):
        calls.append(fd)
        if len(calls) == nth:
            raise TargetWriteError("syncfs failed: Input/output error")
        syncfs(fd)

    monkeypatch.setattr(durable, "_syncfs", failing)


def test_after_a_failed_syncfs_no_later_batch_is_named(tmp_path, traced, monkeypatch):
    _fail_syncfs(monkeypatch, 2)
    names = [f"f{i:03}" for i in range(60)]
    w = TreeWriter(str(tmp_path))
    try:
        with pytest.raises(TargetWriteError, match="syncfs failed"):
            for i in range(0, len(names), 3):
                _write(w, names[i:i + 3])
            w.finish()
    finally:
        w.close()
    kept = sorted(os.listdir(tmp_path))
    assert kept == names[:len(kept)] and len(kept) <= 6  # the first batch at most
    assert not [n for kind, what in traced if kind == "link" for n in what if n not in
                [k.encode() for k in kept]]


def test_after_a_failed_syncfs_the_sessions_cleanup_names_nothing_written_before_it(tmp_path, traced, monkeypatch):
    """A cut round's cleanup keeps the files received whole (flush_pending): not once a syncfs
    failed. A later syncfs succeeds (the error was told once, to the failed one) and proves
    nothing of the files written before it."""
    _fail_syncfs(monkeypatch, 1)
    w = TreeWriter(str(tmp_path))
    try:
        _write(w, ["a", "b"])
        with pytest.raises(TargetWriteError, match="syncfs failed"):
            w.flush_pending()  # the round's flush: its syncfs fails
        _write(w, ["c", "d"])  # more files of the round arrive, whole
        with pytest.raises(TargetWriteError, match="failed earlier"):
            w.flush_pending()  # what file_session's cleanup runs
    finally:
        w.close()
    assert os.listdir(tmp_path) == [] or all(n.startswith(".") for n in os.listdir(tmp_path)), os.listdir(tmp_path)
    assert not [what for kind, what in traced if kind == "link"]
