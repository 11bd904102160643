"""Directory-at-a-time tree scan, with the native kernels (kernels.TREE).

Each directory's entries come as one body of wire records (files.wire), made by
one call of ``kernels.scan_dir``: a round then deals with a directory of many
small files in a few calls instead of a few per file. What is included is
walk()'s (files.scan): filters, ``one_file_system``, ``on_error``; a directory
comes before its content, names within a directory sorted by their bytes (the
directories themselves come breadth first, each after its parent).
"""
from __future__ import annotations

import errno
import itertools
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from smsrepl import kernels
from smsrepl.errors import ConfigError
from smsrepl.files import wire as W
from smsrepl.files.beneath import fd_path, lstat_beneath, open_beneath
from smsrepl.files.names import DIR_FLAGS, TEMP_RE, TEMP_START, remove_temporary, under_temporary
from smsrepl.files.rules import RoundFilter
from smsrepl.files.scan import Entry, _raise, root_entry

DIR = W.KIND_CODES["dir"]
FILE = W.KIND_CODES["file"]
_SIZE = struct.Struct(">Q")  # at offset 13 of a record
#: threads scanning directories, and directories scanned ahead of the consumer at most
#: (SMSREPL_SCAN_THREADS, 1-64, overrides the first)
SCAN_THREADS = max(1, min(4, os.cpu_count() or 1))
AHEAD = 64
_NLINK = struct.Struct(">I")  # at offset 37


@dataclass(slots=True)
class DirBatch:
    """The (included) entries of one directory."""

    rel: bytes  # the directory, relative to the root (b"" for the root)
    parts: tuple[bytes, ...]
    records: bytes  # wire records, sorted by path
    names: list[bytes]
    kinds: bytes  # a wire kind code per record
    ends: list[int]  # each record's end offset in ``records``
    #: indices of directories walked only on the way to included paths (ONLY_SYNC ancestors)
    implied: frozenset[int] = frozenset()
    #: subdirectories listed but not entered (mount points with one_file_system)
    not_entered: list[bytes] = field(default_factory=list)
    #: bytes of the regular files in the batch (None: add them up from the records)
    sizes: int | None = None

    def path(self, i: int) -> bytes:
        return self.rel + b"/" + self.names[i] if self.rel else self.names[i]

    def start(self, i: int) -> int:
        return self.ends[i - 1] if i else 0

    def size(self, i: int) -> int:
        return _SIZE.unpack_from(self.records, self.start(i) + 13)[0]

    def nlink(self, i: int) -> int:
        return _NLINK.unpack_from(self.records, self.start(i) + 37)[0]

    def entry(self, i: int) -> Entry:
        e, _ = W.Reader(memoryview(self.records)[self.start(i):self.ends[i]]).entry()
        e.implied = i in self.implied
        return e

    def file_bytes(self) -> int:
        """Bytes of the regular files in the batch."""
        if self.sizes is not None:
            return self.sizes
        recs, ends = self.records, self.ends
        return sum(_SIZE.unpack_from(recs, (ends[i - 1] if i else 0) + 13)[0]
                   for i, k in enumerate(self.kinds) if k == FILE)


def scan_dirs(root: str | bytes, filt: RoundFilter | None = None, *,
              on_error: Callable[[bytes, OSError], None] = _raise, one_file_system: bool = False,
              xattrs: bool = True, threads: int | None = None,
              start: list[tuple[bytes, bool]] | None = None) -> Iterator[DirBatch]:
    """A DirBatch for each directory under ``root`` (the root's first) that the walk enters.

    Directories are scanned ``threads`` at a time (kernels.scan_dir lets go of the GIL), at
    most AHEAD of them before the consumer takes their batches; the batches come in the
    order the directories were found (breadth first), so a directory's batch always comes
    after its parent's.

    ``start``: only these directories, each (relative path, recursive): its own batch, and
    with ``recursive`` those of every directory below it (a round of the directories a
    change journal named). Those the filter would not walk into are left out, and so are
    those that are not (or no longer) directories: the journal names removed ones too."""
    top = os.fsencode(root)
    threads = scan_threads() if threads is None else threads
    st = root_entry(top, xattrs=False)
    dev = st.dev if one_file_system else None
    pool = None
    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor  # on first use: it imports logging

        pool = ThreadPoolExecutor(threads, thread_name_prefix="scan")
    # [rel, parts, future or None, recursive, asked for]: the first AHEAD have their scan started
    if start is None:
        todo: deque[list] = deque([[b"", (), None, True, False]])
    else:
        todo = deque([rel, tuple(rel.split(b"/")) if rel else (), None, rec, True] for rel, rec in start
                     if filt is None or walked(filt, tuple(rel.split(b"/")) if rel else ()))

    def start_ahead() -> None:
        if pool is None:
            return
        for item in itertools.islice(todo, AHEAD):
            if item[2] is None:
                item[2] = pool.submit(_scan_one, top, item[0], xattrs)

    try:
        while todo:
            if pool is not None:
                start_ahead()
            rel, parts, fut, recursive, asked = todo.popleft()
            got = fut.result() if fut is not None else _scan_one(top, rel, xattrs)
            full = top + b"/" + rel if rel else top
            if isinstance(got, OSError):
                if asked and got.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue
                if on_error is _raise:
                    _raise(full, got)
                on_error(rel, got)
                continue
            records, names, kinds, ends, errors, sizes = got
            for name, err in errors:
                child = rel + b"/" + name if rel else name
                exc = OSError(err, os.strerror(err))
                if on_error is _raise:
                    _raise(top + b"/" + child, exc)
                on_error(child, exc)
            batch = DirBatch(rel, parts, records, names, kinds, ends, sizes=sizes)
            if filt is not None:
                batch = _filtered(batch, filt)
            subdirs = [i for i, k in enumerate(batch.kinds) if k == DIR] if recursive else []
            if dev is not None:
                entered = []
                for i in subdirs:
                    try:
                        same = lstat_beneath(top, batch.path(i)).st_dev == dev
                    except OSError:
                        same = True  # gone meanwhile: its scan reports it
                    if same:
                        entered.append(i)
                    else:
                        batch.not_entered.append(batch.path(i))
                subdirs = entered
            todo.extend([batch.path(i), parts + (batch.names[i],), None, True, False] for i in subdirs)
            if pool is not None:
                start_ahead()  # before the consumer gets this batch: the pool keeps working
            yield batch
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def walked(filt: RoundFilter, parts: tuple[bytes, ...]) -> bool:
    """Whether a whole-tree walk under ``filt`` enters the directory at ``parts``."""
    return all(filt.includes(parts[:n]) or filt.descend(parts[:n]) for n in range(1, len(parts) + 1))


def scan_threads() -> int:
    """SCAN_THREADS, or SMSREPL_SCAN_THREADS where set; ConfigError naming it if it is not 1-64."""
    text = os.environ.get("SMSREPL_SCAN_THREADS", "").strip()
    if not text:
        return SCAN_THREADS
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise ConfigError(f"SMSREPL_SCAN_THREADS must be a whole number from 1 to 64, not {text!r}")
    return int(text)


def _scan_one(top: bytes, rel: bytes, xattrs: bool):
    """kernels.scan_dir of directory ``rel``, or the OSError that stopped it."""
    full = top + b"/" + rel if rel else top
    try:
        fd = open_beneath(top, rel, DIR_FLAGS)
        try:
            return kernels.scan_dir(fd, rel, fd_path(fd, full) if xattrs else None)
        finally:
            os.close(fd)
    except OSError as exc:
        return exc


def without_temporaries(top: bytes, b: DirBatch, *, remove: bool = True) -> DirBatch:
    """``b`` without the temporaries a killed round left (names.TEMP_RE), which are removed
    (unless not ``remove``: a dry run's listing leaves the target as it is)."""
    if under_temporary(b.rel):  # scanned before its parent's listing removed it: nothing of it is listed
        return _subset(b, [], set())
    if TEMP_START not in b.records:  # a byte search rules out nearly every directory
        return b
    temps = [i for i, n in enumerate(b.names) if n.startswith(TEMP_START) and TEMP_RE.match(n)]
    if not temps:
        return b
    if not remove:
        gone = set(temps)
        return _subset(b, [i for i in range(len(b.names)) if i not in gone], set())
    try:
        fd = open_beneath(top, b.rel, DIR_FLAGS)
    except OSError:
        return b
    try:
        for i in temps:
            remove_temporary(b.names[i], fd)
    finally:
        os.close(fd)
    gone = set(temps)
    return _subset(b, [i for i in range(len(b.names)) if i not in gone], set())


def _filtered(b: DirBatch, filt: RoundFilter) -> DirBatch:
    keep, implied = [], set()
    for i, name in enumerate(b.names):
        cp = b.parts + (name,)
        if filt.includes(cp):
            keep.append(i)
        elif b.kinds[i] == DIR and filt.descend(cp):
            implied.add(len(keep))
            keep.append(i)
    return b if len(keep) == len(b.names) else _subset(b, keep, implied)


def _subset(b: DirBatch, keep: list[int], implied: set[int]) -> DirBatch:
    """The entries of ``b`` at ``keep`` (``implied``: indices into the result)."""
    view = memoryview(b.records)
    chunks, ends, pos = [], [], 0
    for i in keep:
        rec = view[b.start(i):b.ends[i]]
        chunks.append(rec)
        pos += len(rec)
        ends.append(pos)
    return DirBatch(b.rel, b.parts, b"".join(chunks), [b.names[i] for i in keep], bytes(b.kinds[i] for i in keep),
                    ends, frozenset(implied))
