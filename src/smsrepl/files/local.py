"""One round of tree replication: scan the source, decide, apply to a target.

The target is either a local directory (:class:`LocalTarget`) or the far end
of a file session (files.remote.RemoteTarget): the decisions are the same
(files.decide entry by entry, files.dirround a directory at a time; both
targets implement files.target's interface). Preserves what ``rsync -aHAXS
--numeric-ids`` does: kinds, hard links, permission bits, numeric owner and
group (as root), mtimes in nanoseconds, xattrs and ACLs, holes.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import cast

from smsrepl import kernels
from smsrepl.files.apply import FileSink, TreeWriter
from smsrepl.files.decide import entry_round
from smsrepl.files.digests import content_digest
from smsrepl.files.dirround import round_by_dirs
from smsrepl.files.dirscan import DirBatch
from smsrepl.files.names import remove_temporaries, under_temporary
from smsrepl.files.roundstats import RoundStats
from smsrepl.files.rules import PathRules, RoundFilter
from smsrepl.files.scan import Entry, walk
from smsrepl.files.source import SourceWalkErrors, scan_round, walk_round
from smsrepl.files.target import DirRoundTarget, RoundTarget


class LocalTarget(RoundTarget):
    """A directory on this machine, written through a TreeWriter."""

    def __init__(self, root: str) -> None:
        os.makedirs(root, exist_ok=True)
        self.root = os.fsencode(root)
        self.temporaries_removed = remove_temporaries(root)
        self.w = TreeWriter(root)
        self.reported = self.w.reported
        self.deletion_limit: Callable[[int, int], None] | None = None

    def existing(self, path: bytes) -> Entry | None:
        st = self.w.existing(path)
        if st is None:
            return None
        e = Entry.from_stat(path, st)
        if e.kind == "symlink":
            e.link = self.w.readlink(path)
        return e

    def content_digest(self, path: bytes) -> bytes:
        return content_digest(self.root, path)

    def open_file(self, e: Entry, basis: Entry | None = None) -> FileSink:
        return self.w.open_file(e)  # a local copy gains nothing from a delta

    def paths(self, filt: RoundFilter | None) -> Iterator[bytes]:
        # not the temporaries of this round: files waiting for their names, new directories
        return (e.path for e in walk(self.root, filt, on_error=lambda p, exc: None) if not under_temporary(e.path))

    def set_root_meta(self, e: Entry) -> None:
        self.w.set_root_meta(e)

    def mkdir(self, e: Entry) -> None:
        self.w.mkdir(e)

    def symlink(self, e: Entry) -> None:
        self.w.symlink(e)

    def special(self, e: Entry) -> None:
        self.w.special(e)  # what cannot be made is in ``reported``

    def hardlink(self, e: Entry, to: bytes) -> None:
        self.w.hardlink(e, to)

    def set_meta(self, e: Entry) -> None:
        self.w.set_meta(e)

    def delete(self, path: bytes) -> None:
        self.w.delete(path)

    def finish(self) -> None:
        self.w.finish()

    def close(self) -> None:
        self.w.close()


def sync_tree(source: str, target: str | bytes | os.PathLike | RoundTarget, *, rules: PathRules | None = None,
              kind: str = "full", checksum: bool = False, delete: bool | None = None,
              on_done: Callable[[int], None] | None = None,
              entries: Iterable[Entry] | Iterable[DirBatch] | None = None,
              walk_errors: SourceWalkErrors | None = None) -> RoundStats:
    """Make ``target`` (a directory path or a target object) equal ``source``, as
    filtered by ``rules`` for a round of ``kind``.

    Unchanged files (same size and mtime, or same content with ``checksum``)
    are not rewritten; their metadata is corrected. ``delete`` (default: in
    every round: whatever rounds failed before, a completed one leaves the
    target without what the source lacks) removes target entries the source no
    longer has, never under an excluded path. ``on_done(file_bytes)`` is called
    as source entries were dealt with (progress). ``entries``: the source as
    walk_round() yields it, or as scan_round() does for a target that takes a
    directory at a time, when the caller started that walk early (see
    Prefetch); ``walk_errors``: the SourceWalkErrors that walk reports to. The rules
    are anchored to ``source`` (PathRules.anchored). A round that walks the source itself
    lists the rules that matched nothing in ``unmatched_rules``; with ``entries``, that
    is for the caller to do (it has the walk's filter).
    """
    local: LocalTarget | None = None
    if isinstance(target, (str, bytes, os.PathLike)):
        t: RoundTarget = (local := LocalTarget(os.fsdecode(target)))
    else:
        t = target
    delete = True if delete is None else delete
    src = os.fsencode(source)
    rules = rules.anchored(src) if rules is not None else None
    walk_filter: RoundFilter | None = None
    dirs = isinstance(t, DirRoundTarget) and by_dirs(checksum)
    if entries is None:
        walk_errors = errors = SourceWalkErrors(src)
        walk_filter = rules.for_round(kind) if rules else None
        entries = scan_round(src, rules, kind, errors, filt=walk_filter) if dirs else \
            walk_round(src, rules, kind, errors, walk_filter)
    try:
        if isinstance(t, DirRoundTarget) and dirs:
            # the caller's walk of the source is scan_round()'s for such a target, else walk_round()'s
            stats = round_by_dirs(src, t, cast("Iterable[DirBatch]", entries), rules.for_round(kind) if rules else None,
                                  delete, on_done)
        else:
            stats = entry_round(src, t, rules, kind, checksum, delete, on_done, cast("Iterable[Entry]", entries))
        if walk_errors is not None:
            walk_errors.into(stats)
        if walk_filter is not None:
            stats.unmatched_rules = walk_filter.unmatched()
        return stats
    finally:
        if local is not None:
            local.close()


def by_dirs(checksum: bool) -> bool:
    """Rounds to a target that takes a directory at a time go that way (files.dirround): with
    the native kernels, and without content checksums (which need a digest per file)."""
    return kernels.TREE and not checksum

