"""Writes that bypass the page cache (O_DIRECT), done on a thread while the caller goes on.

A replica is written once and read rarely: caching it only costs CPU, and a
checkpoint then has gigabytes to flush. Measured on the 2 GiB test image:
buffered writes plus their fdatasync took 2-3 s of the receiver's time;
direct writes 0.9 s, overlapped with decompression and digest checks.

The caller's data is copied into a page-aligned staging buffer (O_DIRECT
needs aligned memory) before write() returns, so the caller may reuse its
buffer at once; the disk write happens on the writer thread. A caller that
produces the data itself (the receiver decompressing a frame) can fill a
stage directly: reserve(), fill, then commit() or release(). drain() waits
for every queued write and raises the first error, then and at every
later call.
"""
from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from collections.abc import Callable

from smsrepl._lazy import np

from smsrepl import faults

ALIGN = 4096
#: bytes per staging buffer (the largest BLOCK_DATA frame), and buffers one writer has in flight
STAGE = 8 << 20
STAGES = 3
#: staging buffers of all the writers of a process together (a receiver serving 32 block
#: sessions at once held 3 each: 768 MiB); free ones beyond KEEP_STAGES are unmapped
POOL_STAGES = 12
KEEP_STAGES = 3


class StagePool:
    """The staging buffers every DirectWriter of a process draws from: at most ``limit`` exist,
    and a writer that finds none free waits for another writer's write to complete."""

    def __init__(self, limit: int = POOL_STAGES, keep: int = KEEP_STAGES) -> None:
        self.limit = limit
        self.keep = keep
        self.made = 0
        self._free: list[mmap.mmap] = []
        self._cv = threading.Condition()

    def get(self) -> mmap.mmap:
        with self._cv:
            while not self._free and self.made >= self.limit:
                self._cv.wait()
            if self._free:
                return self._free.pop()
            self.made += 1
        return mmap.mmap(-1, STAGE)

    def put(self, stage: mmap.mmap) -> None:
        with self._cv:
            kept = len(self._free) < self.keep
            if kept:
                self._free.append(stage)
            self._cv.notify()
        if not kept:  # more free than kept: unmapped, so an idle receiver holds little
            self._unmap(stage)

    def _unmap(self, stage: mmap.mmap, strict: bool = False) -> None:
        with self._cv:
            self.made -= 1
            self._cv.notify()
        try:
            stage.close()
        except BufferError:
            if strict:
                raise
            # a view of it is still alive somewhere: unmapped when that goes

    def trim(self, *, strict: bool = False) -> int:
        """Unmap every free buffer; how many were. ``strict``: a buffer that cannot be unmapped
        (a view of it is alive) raises BufferError."""
        with self._cv:
            free, self._free = self._free, []
        for stage in free:
            self._unmap(stage, strict)
        return len(free)


#: the process's pool (it maps nothing until a writer asks)
_pool = StagePool()


def stage_pool() -> StagePool:
    return _pool


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned buffer of at least ``size`` bytes (anonymous memory), for O_DIRECT reads."""
    return mmap.mmap(-1, max(ALIGN, -(-size // ALIGN) * ALIGN))


def buffer_address(view) -> int:
    """The memory address of a writable buffer's first byte (O_DIRECT needs it aligned)."""
    return np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0] if len(view) else 0


class DirectWriter:
    def __init__(self, path: str, buffered: Callable[[int, memoryview], None]) -> None:
        """Open ``path`` for direct writes; raises OSError where the file system does not allow them.

        ``buffered(offset, view)`` writes through the page cache: used for the
        rest of a short direct write, and for everything once the file system
        refused an aligned direct write (EINVAL).
        """
        if not getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "O_DIRECT is not available here")
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
        self.buffered = buffered
        self.usable = True
        self._pool = stage_pool()
        self._slots = threading.Semaphore(STAGES)  # this writer's stages in flight, at most
        self._todo: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        #: (offset, length) of the write that failed (the error says what, this says where)
        self.failed_at: tuple[int, int] | None = None
        self._thread = threading.Thread(target=self._run, name="direct-writer", daemon=True)
        self._thread.start()

    def write(self, offset: int, view: memoryview) -> None:
        """Queue whole 4 KiB blocks at an aligned offset; the data is copied before this returns."""
        self._raise_pending()
        done = 0
        while done < len(view):
            stage = self._take()
            n = min(STAGE, len(view) - done)
            # numpy copies without the GIL (an mmap slice assignment holds it: the
            # receiver's TLS reader then waits, seen as 0.5 s of a 2 GiB copy)
            np.frombuffer(stage, dtype=np.uint8, count=n)[:] = np.frombuffer(view, dtype=np.uint8, count=n, offset=done)
            self._todo.put((stage, n, offset + done))
            done += n

    def reserve(self) -> mmap.mmap:
        """A free staging buffer for the caller to fill; hand it back with commit() or release()."""
        self._raise_pending()
        return self._take()

    def commit(self, stage: mmap.mmap, n: int, offset: int) -> None:
        """Queue the first ``n`` bytes (whole 4 KiB blocks) of a reserved stage for ``offset``."""
        self._todo.put((stage, n, offset))

    def release(self, stage: mmap.mmap) -> None:
        self._give(stage)

    def _take(self) -> mmap.mmap:
        self._slots.acquire()
        try:
            return self._pool.get()
        except BaseException:
            self._slots.release()
            raise

    def _give(self, stage: mmap.mmap) -> None:
        self._pool.put(stage)
        self._slots.release()

    def drain(self) -> None:
        """Wait until every queued write reached the file; raise the first failure."""
        self._todo.join()
        self._raise_pending()

    def _raise_pending(self) -> None:
        # sticky: after a failed write nothing may count as written, not even at a last checkpoint
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                self._todo.task_done()
                return
            stage, n, offset = item
            try:
                if self._error is None:
                    self._write(memoryview(stage)[:n], offset)
            except BaseException as exc:  # handed to the caller at its next call
                # without its traceback: that holds _write's frame and so a view of the
                # stage, which could then never be closed
                self._error = exc.with_traceback(None)
                self.failed_at = offset, n
            finally:
                self._give(stage)
                self._todo.task_done()

    def _write(self, view: memoryview, offset: int) -> None:
        if not self.usable:
            self.buffered(offset, view)
            return
        try:
            faults.io("target.write", offset, len(view))
            wrote = os.pwrite(self.fd, view, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.usable = False  # an alignment this file system does not take: page cache from now on
            self.buffered(offset, view)
            return
        if wrote < len(view):  # a short direct write (disk nearly full): the rest through the page cache
            self.buffered(offset + wrote, view[wrote:])

    def close(self) -> None:
        if self.fd < 0:
            return
        self._todo.put(None)
        self._thread.join()
        os.close(self.fd)
        self.fd = -1  # its stages are back in the pool: the writer thread gave each back
