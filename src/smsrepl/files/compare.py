"""Compare a source tree with its copy, in the 5.4.13 consistency-result shape.

For each checked directory: ``num_total_files`` (non-directory entries on
the source), ``num_different_files`` (present on both sides, but content or
metadata differ), ``num_target_miss_files`` (on the source only) and
``num_target_more_files`` (on the target only). Content is compared by size
and XXH3-128 of the data; metadata by kind, permission bits, numeric owner
and group, mtime (nanoseconds) for files, and the stored target for symlinks.
Directories are walked but not counted, as ``rclone check`` does.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import xxhash

from .rules import Pattern, RoundFilter
from .scan import Entry, walk

READ = 1 << 20


@dataclass
class DirCheck:
    dir_check: str
    total: int = 0
    different: list[bytes] = field(default_factory=list)
    missing: list[bytes] = field(default_factory=list)  # on the target
    extra: list[bytes] = field(default_factory=list)  # on the target only
    same: list[bytes] = field(default_factory=list)

    def entry(self) -> dict:
        return {"dir_check": self.dir_check, "num_total_files": self.total,
                "num_different_files": len(self.different), "num_target_miss_files": len(self.missing),
                "num_target_more_files": len(self.extra)}

    @property
    def consistent(self) -> bool:
        return not (self.different or self.missing or self.extra)

    def combined(self) -> list[str]:
        """Per path, as ``rclone check --combined``: ``=`` same, ``*`` different,
        ``-`` missing on the target, ``+`` only on the target."""
        rows = [(p, "=") for p in self.same] + [(p, "*") for p in self.different]
        rows += [(p, "-") for p in self.missing] + [(p, "+") for p in self.extra]
        return [f"{mark} {os.fsdecode(p)}" for p, mark in sorted(rows)]


def content_digest(path: bytes) -> bytes:
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(READ)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.digest()


def _meta(e: Entry) -> tuple:
    base = (e.kind, e.mode, e.uid, e.gid)
    if e.kind == "file":
        return base + (e.size, e.mtime_ns)
    if e.kind == "symlink":
        return base + (e.link,)
    if e.kind in ("chardev", "blockdev"):
        return base + (e.rdev,)
    return base


def _files(root: bytes, filt: RoundFilter | None) -> dict[bytes, Entry]:
    return {e.path: e for e in walk(root, filt) if e.kind != "dir"}


def compare_trees(source: str, target: str, dirs: Iterable[str] = ()) -> tuple[dict, list[DirCheck]]:
    """Compare ``source`` and ``target`` under each of ``dirs`` (absolute paths or globs
    taken relative to the roots, as CONSISTENCY_DIR; the whole tree without any).

    Returns the 5.4.13 body (``finished_time``, ``check_result``,
    ``consistency_result``) and the per-directory details (paths per category).
    """
    dst = os.fsencode(target)
    return _compare(source, dirs, lambda filt: _files(dst, filt), lambda path: content_digest(dst + b"/" + path))


def compare_with_listing(source: str, listing: dict, dirs: Iterable[str] = ()) -> tuple[dict, list[DirCheck]]:
    """As compare_trees, against a target described by a receiver: ``listing`` maps each path
    to (entry, XXH3-128 of its content or None), as files.remote.Listing holds it."""
    def files(filt):
        return {p: e for p, (e, _) in listing.items()
                if p and e.kind != "dir" and (filt is None or filt.includes(tuple(p.split(b"/"))))}

    return _compare(source, dirs, files, lambda path: listing[path][1])


def _compare(source: str, dirs, target_files, target_digest) -> tuple[dict, list[DirCheck]]:
    src = os.fsencode(source)
    checks = []
    for text in list(dirs) or ["/"]:
        filt = None if text.strip("/") == "" else RoundFilter((), (Pattern.parse(text, "dir_check"),))
        a, b = _files(src, filt), target_files(filt)
        check = DirCheck(text, total=len(a))
        for path in sorted(a):
            other = b.get(path)
            if other is None:
                check.missing.append(path)
            elif _meta(a[path]) != _meta(other) or (
                    a[path].kind == "file" and content_digest(src + b"/" + path) != target_digest(path)):
                check.different.append(path)
            else:
                check.same.append(path)
        check.extra = sorted(set(b) - set(a))
        checks.append(check)
    body = {"finished_time": int(time.time() * 1000),
            "check_result": "consistent" if all(c.consistent for c in checks) else "inconsistent",
            "consistency_result": [c.entry() for c in checks]}
    return body, checks
