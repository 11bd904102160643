"""Block sources and targets: image files and Linux block devices.

A source is read in large chunks with ``preadv`` into buffers the caller
reuses, with ``O_DIRECT``: a mounted file system writes file data to its disk
around the device's page cache, so a buffered read of /dev/X returns pages
cached by an earlier round (measured: 8,580 stale blocks after one round of
writes to a mounted ext4; 0 with O_DIRECT). For an image file, a direct read
first writes back the range's dirty pages, so a running VM's image reads as
its guest wrote it. Where the file system refuses O_DIRECT the source is read
through the page cache, which for a regular file is the file's own and so
coherent (``BlockSource.direct`` says which). Holes of sparse image files are
found with SEEK_DATA/SEEK_HOLE and never read. A target is written with ``pwrite``; ranges that must read as
zero are punched out of image files (they stay holes) and zeroed with
BLKZEROOUT on block devices. Every error names the path and the problem.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
import threading
from collections.abc import Iterator

from smsrepl._lazy import np
from smsrepl.blocks.direct import ALIGN, STAGE, DirectWriter, aligned_buffer, buffer_address
from smsrepl import faults
from smsrepl.errors import (ReplicationError, SizeMismatchError, SourceError, SourceMissingError,
                            TargetError, TargetInUseError, TargetKindError, TargetMissingError,
                            TargetWriteError)

BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
#: writes at least this long bypass the page cache where the target allows it (see
#: direct.py); short scattered writes of sync rounds stay buffered: a direct write
#: waits for the disk each time
DIRECT_MIN = 256 << 10
#: bytes of a reading thread's bounce buffer (unaligned reads go through it)
BOUNCE = 1 << 20
#: scattered reads of a sync round in flight at once (a disk serves a queue far faster
#: than one read after another: 2,621 reads of 4 KiB took 0.17 s one by one on a loop device)
READ_DEPTH = 64

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int
SYNC_FILE_RANGE_WRITE = 2


def _device_size(fd: int) -> int:
    buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    return struct.unpack("Q", buf)[0]


def _describe(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _probe(fd: int) -> tuple[bool, int] | None:
    """(is a block device, size in bytes), or None when it is neither a device nor a regular file."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return True, _device_size(fd)
    if stat.S_ISREG(st.st_mode):
        return False, st.st_size
    return None


def _pread_into(fd: int, buf, offset: int) -> int:
    """Fill ``buf`` from ``offset``; short only at end of file. OSError propagates."""
    view = memoryview(buf)
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


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
        self.fd = self._open(os.O_RDONLY | os.O_CLOEXEC)
        try:
            kind = _probe(self.fd)
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
            raise error(f"{self.role} {self.path!r} cannot be opened: {_describe(exc)}") from None

    def _missing(self, message: str) -> ReplicationError:
        return SourceMissingError(message) if self.role == "source" else TargetError(message)

    def _open_direct(self) -> None:
        """Swap the descriptor for an O_DIRECT one of the same file, where the file system allows it."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECT", 0))
        except OSError as exc:
            self.buffered_reason = f"O_DIRECT refused: {_describe(exc)}"
            self._advise_sequential()
            return
        if not getattr(os, "O_DIRECT", 0) or os.fstat(fd)[:2] != os.fstat(self.fd)[:2]:
            os.close(fd)  # no O_DIRECT here, or the path now names another file
            self.buffered_reason = "O_DIRECT is not available"
            self._advise_sequential()
            return
        os.close(self.fd)
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
                return _pread_into(self.fd, view, offset)
            if offset % ALIGN == 0 and len(view) % ALIGN == 0 and buffer_address(view) % ALIGN == 0:
                return self._pread_direct(view, offset)
            return self._read_bounced(view, offset)
        except OSError as exc:
            raise SourceError(f"{self.role} {self.path!r}: read failed near offset {offset}: {_describe(exc)}") from None

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
        try:
            faults.io("source.read", int(offsets.min(initial=0)), int(lengths.sum()))
            return kernels.read_ranges(self.fd, view, offsets, lengths, READ_DEPTH)
        except OSError as exc:
            raise SourceError(f"{self.role} {self.path!r}: read failed near offset {ranges[0][0]}: {_describe(exc)}") from None

    def _pread_direct(self, view: memoryview, offset: int) -> int:
        try:
            return _pread_into(self.fd, view, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL or offset % ALIGN:
                raise
        # an alignment this file system does not take (a sector larger than 4 KiB):
        # the page cache from now on, which for an image file is coherent with it
        self._drop_direct(f"direct read refused at offset {offset}")
        return _pread_into(self.fd, view, offset)

    def _drop_direct(self, why: str) -> None:
        if self.is_device:
            raise SourceError(f"{self.role} {self.path!r}: {why}; a mounted device cannot be read "
                              "coherently through its page cache")
        fd = self._open(os.O_RDONLY | os.O_CLOEXEC)
        os.close(self.fd)
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
                _pread_into(self.fd, memoryview(bounce)[:span], lo)
            take = min(n - (pos - lo), len(view) - got)
            if take <= 0:
                break  # end of the source
            view[got:got + take] = memoryview(bounce)[pos - lo:pos - lo + take]
            got += take
        return got


class WriteBehind:
    """Starts writeback of a file's dirty pages (sync_file_range WRITE) on a thread of its own
    each time it is poked; pokes that come while one runs are folded into the next. Advisory:
    durability still comes from fdatasync, which also reports any write error."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._wanted = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="write-behind", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closing:
                return
            _sync_file_range(self.fd, 0, 0, SYNC_FILE_RANGE_WRITE)

    def close(self) -> None:
        self._closing = True
        self._wanted.set()
        self._thread.join()


class BlockTarget:
    """Writable image file or block device that receives a replica.

    An image file that does not exist yet is created sparse with the size it
    must hold; an existing file or device smaller than that is refused
    (SMS.1504). Nothing is written until :meth:`write` or :meth:`zero`.
    """

    def __init__(self, path: str | os.PathLike[str], *, need_size: int | None = None, create: bool = True,
                 direct: bool = False, name: str | None = None, exclusive: bool = False) -> None:
        """``name``: the receiver's name for the target, said in every error beside the path.
        ``exclusive``: a block device is opened with O_EXCL, which the kernel refuses while the
        device is mounted or claimed by another program, and which keeps others from claiming
        it while this target is open (on Linux O_EXCL without O_CREAT means nothing else)."""
        self.path = os.fspath(path)
        self.what = f"target {name!r} ({self.path})" if name else f"target {self.path!r}"
        self._direct: DirectWriter | None = None
        self._behind: WriteBehind | None = None
        self._reserved = None
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_EXCL if exclusive else 0)
        try:
            self.fd = os.open(self.path, flags)
            self.created = False
        except FileNotFoundError:
            if not create:
                raise TargetMissingError(f"{self.what} does not exist") from None
            try:
                self.fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:
                raise TargetError(f"{self.what} cannot be created: {_describe(exc)}") from None
            self.created = True
        except PermissionError:
            raise TargetError(f"{self.what}: permission denied") from None
        except IsADirectoryError:
            raise TargetKindError(f"{self.what} is a directory, not an image file or block device") from None
        except OSError as exc:
            if exc.errno == errno.EBUSY and exclusive:
                raise TargetInUseError(f"{self.what} is in use (mounted or held by another program); "
                                       f"nothing was written") from None
            raise TargetError(f"{self.what} cannot be opened: {_describe(exc)}") from None
        try:
            kind = _probe(self.fd)
            if kind is None:
                raise TargetKindError(f"{self.what} is not a regular file or block device")
            self.is_device, self.size = kind
            if need_size is not None:
                self.require_size(need_size)
            if direct:
                self._open_direct()
        except BaseException:
            self.close()
            raise

    def _open_direct(self) -> None:
        try:
            self._direct = DirectWriter(self.path, self._write_buffered)
        except OSError:
            pass  # the file system does not do direct I/O (tmpfs): the page cache it is

    @property
    def direct(self) -> bool:
        """Long writes bypass the page cache."""
        return self._direct is not None and self._direct.usable

    def require_size(self, need: int) -> None:
        if self.size >= need:
            return
        if self.created or (not self.is_device and self.size == 0):
            try:
                os.ftruncate(self.fd, need)
            except OSError as exc:
                raise TargetWriteError(f"{self.what}: cannot grow to {need} bytes: {_describe(exc)}") from None
            self.size = need
            return
        raise SizeMismatchError(
            f"{self.what} holds {self.size} bytes but the source has {need} bytes"
        )

    def close(self) -> None:
        if getattr(self, "_behind", None) is not None:
            self._behind.close()  # before the descriptor it writes back goes
            self._behind = None
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1
        if getattr(self, "_direct", None) is not None:
            self._direct.close()
            self._direct = None

    def __enter__(self) -> BlockTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise TargetWriteError(
                f"{self.what}: write of {length} bytes at {offset} is outside its {self.size} bytes"
            )

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset``; long aligned writes may still be in flight (see :meth:`drain`)."""
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        if self.direct and len(view) >= DIRECT_MIN and offset % ALIGN == 0:
            aligned = len(view) // ALIGN * ALIGN
            try:
                self._direct.write(offset, view[:aligned])
            except OSError as exc:  # an earlier write failed on the writer thread
                raise self._direct_failed(exc) from None
            view, offset = view[aligned:], offset + aligned
            if not len(view):
                return
        self.drain()  # writes reach the file in the order they were asked for
        self._write_buffered(offset, view)

    def reserve(self, offset: int, length: int) -> memoryview | None:
        """A buffer to build the data of a write at ``offset`` in place, or None where a
        plain write() is the way (short, unaligned, or no direct I/O). Exactly one may be
        outstanding; end it with commit() or release()."""
        if not (self.direct and DIRECT_MIN <= length <= STAGE and offset % ALIGN == 0 and length % ALIGN == 0):
            return None
        self._check_range(offset, length)
        try:
            self._reserved = self._direct.reserve()
        except OSError as exc:
            raise self._direct_failed(exc) from None
        return memoryview(self._reserved)[:length]

    def commit(self, offset: int, length: int) -> None:
        """Write the reserved buffer's first ``length`` bytes at ``offset`` (may still be in flight)."""
        stage, self._reserved = self._reserved, None
        self._direct.commit(stage, length, offset)

    def release(self) -> None:
        """Give the reserved buffer back unwritten."""
        stage, self._reserved = self._reserved, None
        if stage is not None:
            self._direct.release(stage)

    def drain(self) -> None:
        """Wait for writes still in flight; raises the first that failed."""
        if self._direct is not None:
            try:
                self._direct.drain()
            except OSError as exc:
                raise self._direct_failed(exc) from None

    def _direct_failed(self, exc: OSError) -> TargetWriteError:
        """The error of a direct write that failed on the writer thread, at the offset it was for."""
        at = self._direct.failed_at if self._direct is not None else None
        where = f" at offset {at[0]} ({at[1]} bytes)" if at is not None else ""
        return TargetWriteError(f"{self.what}: write failed{where}: {_describe(exc)}")

    def _write_buffered(self, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            try:
                faults.io("target.write", offset + done, len(view) - done)
                done += os.pwrite(self.fd, view[done:], offset + done)
            except OSError as exc:
                raise TargetWriteError(
                    f"{self.what}: write failed at offset {offset + done}: {_describe(exc)}"
                ) from None

    def write_ranges(self, data, offsets: np.ndarray, lengths: np.ndarray) -> None:
        """Write ``data``'s consecutive pieces (lengths[i] bytes each) at offsets[i], buffered, in
        one native call: a sync round's scattered blocks cost one Python call, not one each."""
        from smsrepl import kernels

        if not len(offsets):
            return
        ends = offsets + lengths
        lo, hi = int(offsets.min()), int(ends.max())
        self._check_range(lo, hi - lo)
        self.drain()
        try:
            faults.io("target.write", lo, hi - lo)
            kernels.write_ranges(self.fd, data, offsets, lengths)
        except OSError as exc:
            raise TargetWriteError(f"{self.what}: write failed between offsets {lo} and {hi}: "
                                   f"{_describe(exc)}") from None

    def write_behind(self) -> None:
        """Have what buffered writes left in the page cache written back, on a thread, while the
        round goes on: the checkpoint's flush then waits for the last few blocks only (measured:
        2,621 scattered 4 KiB blocks, the round's final flush 40-60 ms; started on the receiving
        thread, the writeback itself held it 35-40 ms a round)."""
        if self._behind is None:
            self._behind = WriteBehind(self.fd)
        self._behind.poke()

    def zero(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zero without storing zeros where possible."""
        self._check_range(offset, length)
        if length == 0:
            return
        self.drain()
        if self.is_device:
            try:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
                return
            except OSError:
                pass
        else:
            if _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise TargetWriteError(
                    f"{self.what}: cannot zero {length} bytes at {offset}: {os.strerror(err)}"
                )
        chunk = bytes(min(length, 1 << 20))
        pos = offset
        while pos < offset + length:
            n = min(len(chunk), offset + length - pos)
            self.write(pos, memoryview(chunk)[:n])
            pos += n

    def readinto(self, buf: bytearray | memoryview, offset: int) -> int:
        self.drain()
        return _pread_into(self.fd, buf, offset)

    def flush(self) -> None:
        self.drain()
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise TargetWriteError(f"{self.what}: sync failed: {_describe(exc)}") from None
