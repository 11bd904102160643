"""One round of tree replication a directory at a time (native kernels).

The same decisions as files.decide's per-entry round, made for a whole directory
at once where they are simple: ``kernels.diff_records`` compares the source's
records of a directory with the target's, entries alike on both sides are left
alone, and new or changed small files are read by ``kernels.read_files``
straight into FILE operations. Everything else (hard links, special files,
metadata-only changes, kind changes, files that change while read, large
files) takes the per-entry path, ``decide.bring_entry``.

The target answers a directory at a time (files.target.DirRoundTarget): its records
of a directory, the paths of those the source lacks, and what is below a directory
that goes; ``read_files`` reads small source files straight into its operations.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable

from smsrepl import kernels
from smsrepl.errors import RemoteProtocolError
from smsrepl.files.beneath import lstat_beneath, open_beneath
from smsrepl.files.decide import bring_entry, delete_gone
from smsrepl.files.dirscan import FILE, DirBatch
from smsrepl.files.liveread import settle_deferred
from smsrepl.files.names import DIR_FLAGS
from smsrepl.files.roundstats import RoundStats
from smsrepl.files.rules import RoundFilter
from smsrepl.files.scan import root_entry
from smsrepl.files.target import DirRoundTarget
from smsrepl.files.wire import INLINE

#: diff_records' verdicts
SAME, OTHER, NEW, META_ONLY, DATA = range(5)
_CHANGED = re.compile(rb"[^\x00]")


def round_by_dirs(src: bytes, t: DirRoundTarget, batches: Iterable[DirBatch], filt: RoundFilter | None, delete: bool,
                  on_done: Callable[[int], None] | None = None) -> RoundStats:
    stats = RoundStats(temporaries_removed=t.temporaries_removed)
    links: dict[tuple[int, int], bytes] = {}
    t.set_root_meta(root_entry(src))
    stats.entries += 1
    gone: list[bytes] = []
    emptied: list[bytes] = []  # directories whose contents go too
    for b in batches:
        stats.entries += len(b.names)
        try:
            actions, gone_idx = kernels.diff_records(b.records, t.dir_records(b.rel))
        except ValueError as exc:
            raise RemoteProtocolError(f"the target's listing of {os.fsdecode(b.rel) or '/'!r}: {exc}") from None
        if gone_idx:
            paths, dirs = t.gone(b.rel, gone_idx)
            gone += paths
            emptied += dirs
        emptied += b.not_entered
        quick: list[int] = []
        slow: list[int] = []
        changed_files = 0
        for m in _CHANGED.finditer(actions):  # in C: most entries of a sync round are alike
            i, a = m.start(), actions[m.start()]
            if b.kinds[i] == FILE:
                changed_files += 1
            if a in (NEW, DATA) and b.kinds[i] == FILE and b.nlink(i) == 1 and b.size(i) <= INLINE:
                quick.append(i)
            else:
                slow.append(i)
        stats.unchanged += b.kinds.count(FILE) - changed_files
        if quick:
            slow += _read_small(src, t, b, quick, stats)
        for i in sorted(slow):
            e = b.entry(i)
            if e.kind == "file" and e.nlink > 1:  # hard links are keyed by (dev, ino), which records lack
                try:
                    st = lstat_beneath(src, e.path)
                    e.dev, e.ino = st.st_dev, st.st_ino
                except OSError:
                    pass  # gone: send_file says so
            bring_entry(src, t, e, filt, False, links, stats)
        if on_done is not None:
            on_done(b.file_bytes())
    settle_deferred(t, src, stats)
    for path in emptied:
        gone += t.below(path)
    if delete:  # nothing excluded is touched
        delete_gone(t, sorted(p for p in gone if filt is None or filt.includes(tuple(p.split(b"/")))), stats)
    t.finish()
    stats.reported += t.reported
    return stats


def _read_small(src: bytes, t: DirRoundTarget, b: DirBatch, quick: list[int], stats: RoundStats) -> list[int]:
    """Send the small files at ``quick`` as FILE operations read in one native call; the
    indices it left (changed while read, vanished, ...) go the careful way."""
    try:
        fd = open_beneath(src, b.rel, DIR_FLAGS)
    except OSError:
        return quick
    try:
        left, files, nbytes = t.read_files(fd, b.records, quick, INLINE)
    finally:
        os.close(fd)
    stats.files_sent += files
    stats.bytes_sent += nbytes
    return left
