"""One round of tree replication between two local directories.

The same steps a file session runs over the wire (scan, decide, apply,
delete), without the wire: the reference the network path is tested against,
and what a lab uses to seed a target. Preserves what ``rsync -aHAXS
--numeric-ids`` does: kinds, hard links, permission bits, numeric owner and
group (as root), mtimes in nanoseconds, xattrs and ACLs, holes.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import SourceError
from .apply import TreeWriter, remove_temporaries
from .rules import PathRules
from .scan import Entry, walk

READ = 1 << 20
#: a file that keeps changing while it is read is read again this many times
RETRIES = 3


@dataclass
class RoundStats:
    entries: int = 0
    files_sent: int = 0
    bytes_sent: int = 0
    unchanged: int = 0
    deleted: int = 0
    temporaries_removed: int = 0
    reread: int = 0
    reported: list[str] = field(default_factory=list)


def _read_stable(path: bytes, entry: Entry, stats: RoundStats) -> tuple[Entry, list[bytes]]:
    """The file's data and the metadata it had while being read; read again if it changed."""
    for attempt in range(RETRIES + 1):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"cannot read {os.fsdecode(path)!r}: {exc.strerror}") from None
        try:
            before = os.fstat(fd)
            chunks = []
            while data := os.read(fd, READ):
                chunks.append(data)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        same = (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (after.st_size, after.st_mtime_ns,
                                                                              after.st_ctime_ns)
        if same and sum(map(len, chunks)) == after.st_size:
            return Entry.from_stat(entry.path, after, None) if attempt else entry, chunks
        stats.reread += 1
    stats.reported.append(f"{os.fsdecode(entry.path)}: kept changing while being read; sent as last read")
    got = Entry.from_stat(entry.path, after, None)
    got.size = sum(map(len, chunks))
    return got, chunks


def _with_xattrs(e: Entry, like: Entry) -> Entry:
    e.xattrs = like.xattrs
    return e


def sync_tree(source: str, target: str, *, rules: PathRules | None = None, kind: str = "full",
              checksum: bool = False, delete: bool | None = None) -> RoundStats:
    """Make ``target`` equal ``source`` (as filtered by ``rules`` for a round of ``kind``).

    Unchanged files (same size and mtime, or same content with ``checksum``)
    are not rewritten; their metadata is corrected. ``delete`` (default: in
    sync rounds) removes target entries the source no longer has, never
    under an excluded path.
    """
    src = os.fsencode(source)
    stats = RoundStats()
    filt = rules.for_round(kind) if rules else None
    delete = kind == "sync" if delete is None else delete
    os.makedirs(target, exist_ok=True)
    stats.temporaries_removed = remove_temporaries(target)
    seen: set[bytes] = set()
    links: dict[tuple[int, int], bytes] = {}
    with TreeWriter(target) as w:
        for e in walk(src, filt, xattrs=True):
            stats.entries += 1
            seen.add(e.path)
            if not e.path:
                w.set_root_meta(e)
                continue
            have = w.existing(e.path)
            if e.kind == "dir":
                w.mkdir(e)
            elif e.kind == "file":
                key = (e.dev, e.ino)
                if e.nlink > 1 and key in links:
                    w.hardlink(e, links[key])
                    continue
                if e.nlink > 1:
                    links[key] = e.path
                if have is not None and stat.S_ISREG(have.st_mode) and _unchanged(e, have, checksum, src, w):
                    stats.unchanged += 1
                    if have.st_nlink > 1 and e.nlink == 1:  # was a hard link there, is not here
                        _, chunks = _read_stable(src + b"/" + e.path, e, stats)
                        w.write_file(e, chunks)
                    else:
                        w.set_meta(e)
                    continue
                got, chunks = _read_stable(src + b"/" + e.path, e, stats)
                w.write_file(_with_xattrs(got, e), chunks)
                stats.files_sent += 1
                stats.bytes_sent += got.size
            elif e.kind == "symlink":
                if have is not None and stat.S_ISLNK(have.st_mode) and w.readlink(e.path) == e.link:
                    w.set_meta(e)
                else:
                    w.symlink(e)
            else:
                w.special(e)
        if delete:
            stats.deleted = _delete_extra(target, filt, seen, w)
        w.finish()
        stats.reported += w.reported
    return stats


def _unchanged(e: Entry, have: os.stat_result, checksum: bool, src: bytes, w: TreeWriter) -> bool:
    if have.st_size != e.size:
        return False
    if not checksum:
        return have.st_mtime_ns == e.mtime_ns
    from .compare import _digest

    return _digest(src + b"/" + e.path) == _digest(w.root + b"/" + e.path)


def _delete_extra(target: str, filt, seen: set[bytes], w: TreeWriter) -> int:
    gone: list[bytes] = []
    for e in _target_entries(target, filt):
        if e.path and e.path not in seen and not any(e.path.startswith(g + b"/") for g in gone[-1:]):
            gone.append(e.path)
    for path in reversed(gone):
        w.delete(path)
    return len(gone)


def _target_entries(target: str, filt) -> Iterator[Entry]:
    return walk(target, filt, on_error=lambda p, exc: None)
