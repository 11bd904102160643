"""Content digests (XXH3-128) of files: one file, or a directory's files per call.

:func:`content_digest` reads one file (a round with --checksum, a receiver listing
without the native kernels). :func:`hash_side` reads the files a check compares a
directory at a time (``kernels.hash_files``: one reused buffer, the GIL let go),
large files in steps, reporting progress through a :class:`Meter`;
:func:`records_with_digests` puts them into a receiver's listing.
"""
from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable

import xxhash

from smsrepl import kernels
from smsrepl.files.beneath import open_beneath
from smsrepl.files.sides import Dir, Side, child_path

READ = 1 << 20
#: files at least this large are read in steps of READ_STEP (progress between steps)
LARGE = 64 << 20
READ_STEP = 8 << 20
#: bytes per call of kernels.hash_files (how often a directory of many files reports progress)
HASH_BUDGET = 32 << 20

_tls = threading.local()


def content_digest(top: bytes, rel: bytes) -> bytes:
    """XXH3-128 of the data of file ``top/rel`` (no symlink followed below ``top``: beneath.py),
    read into a buffer reused by the thread."""
    buf = getattr(_tls, "buf", None)
    if buf is None:
        buf = _tls.buf = bytearray(READ)
    view = memoryview(buf)
    h = xxhash.xxh3_128()
    fd = open_beneath(top, rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        while n := os.readv(fd, [buf]):
            h.update(view[:n])
    finally:
        os.close(fd)
    return h.digest()


class Meter:
    """Bytes read so far, for progress (added to from several threads): ``on_progress(done,
    total)`` at most every EVERY seconds (the caller reports the end)."""

    EVERY = 0.5

    def __init__(self, total: int, on_progress: Callable[[int, int], None] | None) -> None:
        self.total, self.done = total, 0
        self._lock = threading.Lock()
        self._report = on_progress
        self._last = 0.0

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self._report is None:
                return
            now = time.monotonic()
            if now - self._last < self.EVERY:
                return
            self._last = now
            done, total = self.done, self.total
        self._report(done, total)

    def start(self, total: int) -> None:
        """The bytes to read are known: the first report (a check with nothing to read has it too)."""
        self.total = total
        self._last = time.monotonic()
        if self._report is not None:
            self._report(0, total)



def hash_side(root: bytes, side: Side, want: dict[bytes, list[int]], meter: Meter) -> None:
    """Digests of the files ``want`` names (directory -> record indices) into each Dir's
    ``digests``; the ones that cannot be read go to ``side.errors``."""
    for rel, idx in want.items():
        d = side.dirs[rel]
        dnames = d.index()[0]
        try:
            dfd = open_beneath(root, rel, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            for i in idx:
                side.errors[child_path(rel, dnames[i])] = exc.strerror or str(exc)
            continue
        try:
            small: list[int] = []
            for i in idx:
                if d.size(i) >= LARGE:
                    _hash_large(dfd, rel, d, i, side, meter)
                else:
                    small.append(i)
            names = [dnames[i] for i in small]
            out = bytearray(16 * len(small))
            start = 0
            while start < len(small):
                done, nbytes, errs = kernels.hash_files(dfd, names[start:], memoryview(out)[16 * start:], HASH_BUDGET)
                bad = {start + k for k, _ in errs}
                for k, err in errs:
                    side.errors[child_path(rel, names[start + k])] = "not a regular file now" \
                        if err in (errno.EINVAL, errno.EISDIR) else os.strerror(err)
                for k in range(start, start + done):
                    if k not in bad:
                        d.digests[small[k]] = bytes(out[16 * k:16 * k + 16])
                meter.add(nbytes)
                start += done
        finally:
            os.close(dfd)



def _hash_large(dfd: int, rel: bytes, d: Dir, i: int, side: Side, meter: Meter) -> None:
    name = d.index()[0][i]
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
    except OSError as exc:
        side.errors[child_path(rel, name)] = exc.strerror or str(exc)
        return
    buf = bytearray(READ_STEP)
    view = memoryview(buf)
    h = xxhash.xxh3_128()
    try:
        while n := os.readv(fd, [buf]):
            h.update(view[:n])
            meter.add(n)
        d.digests[i] = h.digest()
    except OSError as exc:
        side.errors[child_path(rel, name)] = exc.strerror or str(exc)
    finally:
        os.close(fd)


def records_with_digests(top: bytes, rel: bytes, records: bytes, names: list[bytes], kinds: bytes,
                         ends: list[int]) -> bytes:
    """A directory's wire records (a DirBatch's) with the XXH3-128 of each regular file's
    content: what a receiver lists for a check. A file that cannot be read goes without one
    (a check counts it as different)."""
    d = Dir(records, names, kinds, ends)
    files = d.files()
    if not files:
        return records
    hash_side(top, Side({rel: d}), {rel: files}, Meter(0, None))
    return d.with_digests()
