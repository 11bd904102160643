"""One side of a check: a tree's directories as wire records, indexed on demand.

A check (files.compare) lists both trees a directory at a time (with the native
kernels one call per directory, files.dirscan), each directory as one body of
wire records (files.wire): alike directories are then found by comparing bytes,
and only the others are decoded entry by entry. A receiver's listing (with
content digests) becomes a side too (:func:`list_remote`).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from smsrepl import kernels
from smsrepl.files.rules import RoundFilter
from smsrepl.files.scan import Entry, walk

TYPE_CHECKING = False  # typing itself would cost a short command 3 ms of imports

if TYPE_CHECKING:
    from smsrepl.files.listing import Listing

_HEAD = struct.Struct(">BIIIQqQIHHIB")  # files.wire's entry record header
_SIZE = struct.Struct(">Q")  # a record's size, at offset 13
#: files.wire's kind codes of a regular file and a directory
FILE, DIR = 1, 2
#: a record's fields a check compares: (kind, mode, uid, gid, size, mtime_ns, rdev, symlink target,
#: xattrs: files.wire's block of them, sorted by name; empty where a side was listed without them)
Meta = tuple[int, int, int, int, int, int, int, bytes | None, bytes]


def child_path(rel: bytes, name: bytes) -> bytes:
    return rel + b"/" + name if rel else name


@dataclass
class Dir:
    """One directory's entries as wire records (files.wire), sorted by name: a DirBatch's,
    or a receiver's (with digests), indexed only when a check has to look inside."""

    records: bytes
    names: list[bytes] | None = None
    kinds: bytes | None = None
    ends: list[int] | None = None
    digests: dict[int, bytes] = field(default_factory=dict)  # record index -> content digest

    def index(self) -> tuple[list[bytes], bytes, list[int]]:
        """(names, kinds, ends) of the records, read from them the first time."""
        if self.names is not None and self.kinds is not None and self.ends is not None:
            return self.names, self.kinds, self.ends
        names, kinds, ends, pos, rec = [], bytearray(), [], 0, self.records
        while pos < len(rec):
            kind, _, _, _, _, _, _, _, plen, llen, xlen, has = _HEAD.unpack_from(rec, pos)
            path = rec[pos + 50:pos + 50 + plen]
            names.append(path.rpartition(b"/")[2])
            kinds.append(kind)
            pos += 50 + plen + llen + xlen + (16 if has else 0)
            ends.append(pos)
        self.names, self.kinds, self.ends = names, bytes(kinds), ends
        return self.names, self.kinds, self.ends

    def files(self) -> list[int]:
        kinds = self.index()[1]
        return [i for i, k in enumerate(kinds) if k == FILE]

    def count(self) -> int:
        """Non-directory entries."""
        kinds = self.index()[1]
        return len(kinds) - kinds.count(DIR)

    def size(self, i: int) -> int:
        """The size of the entry of record ``i``."""
        ends = self.index()[2]
        return _SIZE.unpack_from(self.records, ends[i - 1] + 13 if i else 13)[0]

    def entries(self) -> dict[bytes, tuple[Meta, bytes | None]]:
        """name -> ((kind, mode, uid, gid, size, mtime_ns, rdev, link, xattrs), digest) of each
        non-directory entry; the digest listed in the record, else the one read here."""
        out: dict[bytes, tuple[Meta, bytes | None]] = {}
        pos, rec, i = 0, self.records, 0
        while pos < len(rec):
            kind, mode, uid, gid, size, mtime, rdev, _, plen, llen, xlen, has = _HEAD.unpack_from(rec, pos)
            p = pos + 50
            pos = p + plen + llen + xlen + (16 if has else 0)
            if kind != DIR:
                link = rec[p + plen:p + plen + llen] if llen else None
                attrs = bytes(rec[p + plen + llen:p + plen + llen + xlen])
                digest = rec[pos - 16:pos] if has else self.digests.get(i)
                out[rec[p:p + plen].rpartition(b"/")[2]] = ((kind, mode, uid, gid, size, mtime, rdev, link, attrs),
                                                           digest)
            i += 1
        return out

    def with_digests(self) -> bytes:
        """The records with the digests read here in them, as a receiver lists them."""
        if not self.digests:
            return self.records
        parts: list[bytes] = []
        start = 0
        for i, end in enumerate(self.ends or ()):
            d = self.digests.get(i)
            if d is None:
                parts.append(self.records[start:end])
            else:
                parts += [self.records[start:start + 49], b"\x01", self.records[start + 50:end], d]
            start = end
        return b"".join(parts)


@dataclass
class Side:
    """A tree as a check sees it: its directories, and what could not be read."""

    dirs: dict[bytes, Dir] = field(default_factory=dict)  # relative path -> its entries
    errors: dict[bytes, str] = field(default_factory=dict)  # path -> why it could not be read


def list_local(root: bytes, filt: RoundFilter | None, *, xattrs: bool = False) -> Side:
    """Every directory the walk enters, a Dir each (ONLY_SYNC's ancestors among the entries,
    as directories, which no count includes)."""
    side = Side()

    def failed(path: bytes, exc: OSError) -> None:
        side.errors[path] = exc.strerror or str(exc)

    if kernels.TREE:
        from smsrepl.files.dirscan import scan_dirs

        for b in scan_dirs(root, filt, on_error=failed, xattrs=xattrs, threads=1):  # a thread a side
            side.dirs[b.rel] = Dir(b.records, b.names, b.kinds, b.ends)
        return side
    from smsrepl.files import wire as W

    groups: dict[bytes, list[Entry]] = {}
    for e in walk(root, filt, on_error=failed, xattrs=xattrs, implied=True):
        if e.kind == "dir":
            groups.setdefault(e.path, [])
        if e.path:
            groups.setdefault(e.path.rpartition(b"/")[0], []).append(e)
    for rel, entries in groups.items():
        recs = [W.encode_entry(e) for e in entries]
        ends: list[int] = []
        pos = 0
        for r in recs:
            pos += len(r)
            ends.append(pos)
        side.dirs[rel] = Dir(b"".join(recs), [e.path.rpartition(b"/")[2] for e in entries],
                             bytes(W.KIND_CODES.get(e.kind, 0) for e in entries), ends)
    return side


def list_remote(listing: Listing) -> Side:
    """A receiver's listing (files.listing.Listing, with digests) as a Side."""
    listing.wait(whole=True)
    side = Side()
    for rel, parts in listing.groups.items():
        if rel is not None:  # None: the root's own record
            side.dirs[rel] = Dir(b"".join(parts))
    return side

