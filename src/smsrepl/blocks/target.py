"""Writing a block target: an image file or a Linux block device.

A target is written with ``pwrite`` (long aligned writes bypass the page cache where the
target allows it, see direct.py); ranges that must read as zero are punched out of image
files (they stay holes) and zeroed with BLKZEROOUT on block devices. Every error names the
path and the problem.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
import threading

from smsrepl import faults
from smsrepl._lazy import np
from smsrepl.blocks.device import describe, pread_into, probe
from smsrepl.blocks.direct import ALIGN, STAGE, DirectWriter
from smsrepl.errors import (SizeMismatchError, TargetError, TargetInUseError, TargetKindError, TargetMissingError,
                            TargetWriteError)

BLKZEROOUT = 0x127F
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
#: writes at least this long bypass the page cache where the target allows it (see
#: direct.py); short scattered writes of sync rounds stay buffered: a direct write
#: waits for the disk each time
DIRECT_MIN = 256 << 10

_libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc: find_library() runs ldconfig
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int
SYNC_FILE_RANGE_WRITE = 2


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
        self._reserved: mmap.mmap | None = None
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
                raise TargetError(f"{self.what} cannot be created: {describe(exc)}") from None
            self.created = True
        except PermissionError:
            raise TargetError(f"{self.what}: permission denied") from None
        except IsADirectoryError:
            raise TargetKindError(f"{self.what} is a directory, not an image file or block device") from None
        except OSError as exc:
            if exc.errno == errno.EBUSY and exclusive:
                raise TargetInUseError(f"{self.what} is in use (mounted or held by another program); "
                                       f"nothing was written") from None
            raise TargetError(f"{self.what} cannot be opened: {describe(exc)}") from None
        try:
            kind = probe(self.fd)
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

    def identity(self) -> list[int]:
        """What this target is, whatever path names it: a block device's number, or an image
        file's file system and inode (state recorded for one must not be trusted for another)."""
        st = os.fstat(self.fd)
        return [0, st.st_rdev] if self.is_device else [1, st.st_dev, st.st_ino]

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
                raise TargetWriteError(f"{self.what}: cannot grow to {need} bytes: {describe(exc)}") from None
            self.size = need
            return
        raise SizeMismatchError(
            f"{self.what} holds {self.size} bytes but the source has {need} bytes"
        )

    def close(self) -> None:
        behind = getattr(self, "_behind", None)
        if behind is not None:
            behind.close()  # before the descriptor it writes back goes
            self._behind = None
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1
        writer = getattr(self, "_direct", None)
        if writer is not None:
            writer.close()
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
        writer = self._direct
        if writer is not None and writer.usable and len(view) >= DIRECT_MIN and offset % ALIGN == 0:
            aligned = len(view) // ALIGN * ALIGN
            try:
                writer.write(offset, view[:aligned])
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
        writer = self._direct
        if not (writer is not None and writer.usable and DIRECT_MIN <= length <= STAGE and offset % ALIGN == 0
                and length % ALIGN == 0):
            return None
        self._check_range(offset, length)
        try:
            stage = self._reserved = writer.reserve()
        except OSError as exc:
            raise self._direct_failed(exc) from None
        return memoryview(stage)[:length]

    def commit(self, offset: int, length: int) -> None:
        """Write the reserved buffer's first ``length`` bytes at ``offset`` (may still be in flight)."""
        stage, self._reserved = self._reserved, None
        assert stage is not None and self._direct is not None, "commit() without reserve()"
        self._direct.commit(stage, length, offset)

    def release(self) -> None:
        """Give the reserved buffer back unwritten."""
        stage, self._reserved = self._reserved, None
        if stage is not None and self._direct is not None:
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
        return TargetWriteError(f"{self.what}: write failed{where}: {describe(exc)}")

    def _write_buffered(self, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            try:
                faults.io("target.write", offset + done, len(view) - done)
                done += os.pwrite(self.fd, view[done:], offset + done)
            except OSError as exc:
                raise TargetWriteError(
                    f"{self.what}: write failed at offset {offset + done}: {describe(exc)}"
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
                                   f"{describe(exc)}") from None

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
        return pread_into(self.fd, buf, offset)

    def flush(self) -> None:
        self.drain()
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise TargetWriteError(f"{self.what}: sync failed: {describe(exc)}") from None
