"""Reading a block source: an image file or a Linux block device.

A source is read in large chunks with ``preadv`` into buffers the caller
reuses, with ``O_DIRECT``: a mounted file system writes file data to its disk
around the device's page cache, so a buffered read of /dev/X returns pages
cached by an earlier round (measured: 8,580 stale blocks after one round of
writes to a mounted ext4; 0 with O_DIRECT). For an image file, a direct read
first writes back the range's dirty pages, so a running VM's image reads as
its guest wrote it. Where the file system refuses O_DIRECT the source is read
through the page cache, which for a regular file is the file's own and so
coherent (``BlockSource.direct`` says which). An image file's ranges that the page
cache holds whole are read from it all the same (pagecache.py): they are the file's latest
contents, a copy costs less than the disk read, and a direct read would first write back
what is dirty. Holes of sparse image files are found with SEEK_DATA/SEEK_HOLE and never read. Every error names the path and the problem.
"""
from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator

from smsrepl import faults
from smsrepl._lazy import np
from smsrepl.blocks.device import describe, pread_into, probe
from smsrepl.blocks.direct import ALIGN, aligned_buffer, buffer_address
from smsrepl.blocks.pagecache import resident
from smsrepl.errors import ReplicationError, SourceError, SourceMissingError, TargetError, TargetMissingError

#: bytes of a reading thread's bounce buffer (unaligned reads go through it)
BOUNCE = 1 << 20
#: scattered reads of a sync round in flight at once (a disk serves a queue far faster
#: than one read after another: 2,621 reads of 4 KiB took 0.17 s one by one on a loop device)
READ_DEPTH = 64


class BlockSource:
    """Read-only view of an image file or block device, read with O_DIRECT where possible.

    ``readinto`` takes any buffer; one from :func:`aligned_buffer` (page-aligned), read at
    a 4 KiB-aligned offset, goes straight from the disk into it. Anything else (the short
    last block of an image, a caller's bytearray) goes through a bounce buffer of the
    reading thread's own.
    """

    def __init__(self, path: str | os.PathLike[str], *, direct: bool = True, role: str = "source") -> None:
        self.path = os.fspath(path)
        #: what errors call it: "source", or "target" when a copy is read back (verify)
        self.role = role
        self.direct = False
        #: why reads go through the page cache (None while they are direct)
        self.buffered_reason: str | None = "direct reads not asked for"
        self._bounce = threading.local()
        #: a buffered descriptor of a direct-read image file, for the ranges the page cache holds
        self._cached_fd = -1
        self.fd = self._open(os.O_RDONLY | os.O_CLOEXEC)
        try:
            kind = probe(self.fd)
            if kind is None:
                raise self._missing(f"{self.role} {self.path!r} is not a regular file or block device")
            self.is_device, self.size = kind
        except BaseException:
            os.close(self.fd)
            raise
        if direct:
            self._open_direct()

    def _open(self, flags: int) -> int:
        try:
            return os.open(self.path, flags)
        except FileNotFoundError:
            raise self._missing(f"{self.role} {self.path!r} does not exist") from None
        except PermissionError:
            raise self._missing(f"{self.role} {self.path!r}: permission denied") from None
        except OSError as exc:
            error = SourceError if self.role == "source" else TargetError
            raise error(f"{self.role} {self.path!r} cannot be opened: {describe(exc)}") from None

    def _missing(self, message: str) -> ReplicationError:
        return SourceMissingError(message) if self.role == "source" else TargetMissingError(message)

    def _open_direct(self) -> None:
        """Swap the descriptor for an O_DIRECT one of the same file, where the file system allows it."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECT", 0))
        except OSError as exc:
            self.buffered_reason = f"O_DIRECT refused: {describe(exc)}"
            self._advise_sequential()
            return
        if not getattr(os, "O_DIRECT", 0) or os.fstat(fd)[:2] != os.fstat(self.fd)[:2]:
            os.close(fd)  # no O_DIRECT here, or the path now names another file
            self.buffered_reason = "O_DIRECT is not available"
            self._advise_sequential()
            return
        if self.is_device:  # its page cache is not coherent with a mounted file system's writes
            os.close(self.fd)
        else:
            self._cached_fd = self.fd
        self.fd, self.direct, self.buffered_reason = fd, True, None

    def _advise_sequential(self) -> None:
        try:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._cached_fd >= 0:
            os.close(self._cached_fd)
            self._cached_fd = -1

    def __enter__(self) -> BlockSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, bool]]:
        """Yield ``(offset, length, is_data)`` covering [start, end) in order.

        Holes (``is_data`` False) read as zero and need not be read. A device,
        or a file system without SEEK_DATA, is one data extent.
        """
        end = self.size if end is None else min(end, self.size)
        pos = start
        if self.is_device:
            if pos < end:
                yield pos, end - pos, True
            return
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole up to EOF
                    yield pos, end - pos, False
                    return
                yield pos, end - pos, True  # SEEK_DATA unsupported
                return
            if data > pos:
                hole_end = min(data, end)
                yield pos, hole_end - pos, False
                pos = hole_end
                if pos >= end:
                    return
            try:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            data_end = min(hole, end)
            yield pos, data_end - pos, True
            pos = data_end

    def readinto(self, buf: bytearray | memoryview, offset: int) -> int:
        """Fill ``buf`` from ``offset``; short only at the end of the source."""
        view = memoryview(buf).cast("B")
        try:
            faults.io("source.read", offset, len(view))
            if not self.direct:
                return pread_into(self.fd, view, offset)
            if self._cached_fd >= 0 and resident(self._cached_fd, offset, len(view)):
                return pread_into(self._cached_fd, view, offset)
            if offset % ALIGN == 0 and len(view) % ALIGN == 0 and buffer_address(view) % ALIGN == 0:
                return self._pread_direct(view, offset)
            return self._read_bounced(view, offset)
        except OSError as exc:
            raise SourceError(f"{self.role} {self.path!r}: read failed near offset {offset}: {describe(exc)}") from None

    def read_ranges(self, view: memoryview, ranges: list[tuple[int, int]]) -> int:
        """Read each (offset, length) of ``ranges`` into ``view``, one after the other in it, with
        READ_DEPTH reads in flight; short only where the source ended."""
        from smsrepl import kernels

        aligned = self.direct and buffer_address(view) % ALIGN == 0 and all(
            off % ALIGN == 0 and n % ALIGN == 0 for off, n in ranges)
        if not aligned:  # an image's short last block, a page-cache source: one range at a time
            pos = 0
            for off, n in ranges:
                got = self.readinto(view[pos:pos + n], off)
                pos += got
                if got < n:
                    break
            return pos
        offsets = np.fromiter((off for off, _ in ranges), dtype=np.int64, count=len(ranges))
        lengths = np.fromiter((n for _, n in ranges), dtype=np.int64, count=len(ranges))
        fd = self.fd
        if self._cached_fd >= 0 and all(resident(self._cached_fd, off, n) for off, n in ranges):
            fd = self._cached_fd  # recently written blocks: a direct read would write them back first
        try:
            faults.io("source.read", int(offsets.min(initial=0)), int(lengths.sum()))
            return kernels.read_ranges(fd, view, offsets, lengths, READ_DEPTH)
        except OSError as exc:
            raise SourceError(f"{self.role} {self.path!r}: read failed near offset {ranges[0][0]}: {describe(exc)}") from None

    def _pread_direct(self, view: memoryview, offset: int) -> int:
        try:
            return pread_into(self.fd, view, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL or offset % ALIGN:
                raise
        # an alignment this file system does not take (a sector larger than 4 KiB):
        # the page cache from now on, which for an image file is coherent with it
        self._drop_direct(f"direct read refused at offset {offset}")
        return pread_into(self.fd, view, offset)

    def _drop_direct(self, why: str) -> None:
        if self.is_device:
            raise SourceError(f"{self.role} {self.path!r}: {why}; a mounted device cannot be read "
                              "coherently through its page cache")
        fd = self._open(os.O_RDONLY | os.O_CLOEXEC)
        os.close(self.fd)
        if self._cached_fd >= 0:
            os.close(self._cached_fd)
            self._cached_fd = -1
        self.fd, self.direct, self.buffered_reason = fd, False, why

    def _read_bounced(self, view: memoryview, offset: int) -> int:
        """A read of any length, offset and buffer through this thread's aligned bounce buffer."""
        bounce = getattr(self._bounce, "buf", None)
        got = 0
        while got < len(view):
            pos = offset + got
            lo = pos - pos % ALIGN
            want = min(len(view) - got + (pos - lo), BOUNCE)
            span = -(-want // ALIGN) * ALIGN
            if bounce is None or len(bounce) < span:
                bounce = self._bounce.buf = aligned_buffer(BOUNCE)
            n = self._pread_direct(memoryview(bounce)[:span], lo) if self.direct else \
                pread_into(self.fd, memoryview(bounce)[:span], lo)
            take = min(n - (pos - lo), len(view) - got)
            if take <= 0:
                break  # end of the source
            view[got:got + take] = memoryview(bounce)[pos - lo:pos - lo + take]
            got += take
        return got
