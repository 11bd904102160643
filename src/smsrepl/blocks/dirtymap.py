"""Dirty map: which 4 KiB blocks of a source were written since the last sync round.

A file holding a header and two bitmaps ("slots") of one bit per 4 KiB block
(32 MiB per TiB each), memory-mapped and shared with the page cache. Agents
that intercept writes call :meth:`DirtyMap.mark`. A round calls
:meth:`DirtyMap.freeze`: the active slot becomes the frozen one the round
reads, and marks go to the other slot from then on, so a write during a
round is sent by the next one. :meth:`Frozen.release` clears the frozen slot
once the round is durable on the target; a round that fails never releases,
and the next freeze merges the new marks into the unreleased slot.

Several processes may open one map (a workload marking, a sender freezing):
every update holds an flock on the file. A writer marks a range both before
and after writing it (:func:`tracked_pwrite` does): the mark before makes a
crash mid-write err towards dirty; the mark after lands in the slot of a
round that starts after the write, so a round that froze the map between the
two still sends the new data next time.

Crash safety, in the manner of DRBD's bitmap: the map errs towards dirty,
never towards clean.

* Every update is ordered so that a process killed at any instruction leaves
  each marked block set in the active slot or in a pending frozen slot:
  freeze ORs before it clears, release clears only what a completed round
  sent. Bits written through a shared mapping live in the page cache, so a
  killed process loses none of them.
* A machine crash can lose page-cache writes. The header records the boot
  id and a clean-close flag; opening a map that was not closed cleanly under
  another boot id gives ``trusted == False``: the caller then scans the whole
  source (the manifest scan of a sync round) and calls :meth:`reset`.

Header (little-endian, 4 KiB so the bitmaps are page aligned):
    0   8  magic b"SMSDIRTY"
    8   4  version (1)
    12  4  block size (4096)
    16  8  source size in bytes
    24  1  active slot (0 or 1)
    25  1  frozen slot pending (1 = the other slot holds an unreleased round)
    26  1  closed cleanly (1) or open / crashed (0)
    27  1  trusted (1) or never reconciled with a full scan (0)
    32  36 boot id of the last open (ASCII, from /proc/sys/kernel/random/boot_id)
"""
from __future__ import annotations

import contextlib
import fcntl
import gc
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from typing import Protocol

from smsrepl._lazy import np

from smsrepl.errors import ConfigError, ManifestError
from smsrepl.blocks.manifest import runs_of
from smsrepl.kernels import FINE_BLOCK

MAGIC = b"SMSDIRTY"
VERSION = 1
HEADER_SIZE = 4096
_HEAD = struct.Struct("<8sIIQBBBB4x36s")
_ACTIVE, _PENDING, _CLEAN, _TRUSTED = 24, 25, 26, 27
#: bitmap bytes examined per step when listing ranges (bounded memory on huge maps)
SCAN_BYTES = 1 << 20


def boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as fh:
            return fh.read().strip()[:36].ljust(36, b"\0")
    except OSError:
        return b"\0" * 36  # unknown: every unclean stop looks like a machine crash


class DirtyMap:
    def __init__(self, path: str, fd: int, size: int, mm: mmap.mmap, trusted: bool, reason: str) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.nblocks = -(-size // FINE_BLOCK)
        self.slot_bytes = -(-self.nblocks // 8)
        self._mm = mm
        self._closed = False
        self._bits = [np.frombuffer(mm, dtype=np.uint8, count=self.slot_bytes, offset=HEADER_SIZE + i * _padded(self.slot_bytes))
                      for i in (0, 1)]
        self._tlock = threading.Lock()
        #: False after a machine crash (or for a new map): scan everything once, then reset()
        self.trusted = trusted
        self.reason = reason

    @contextlib.contextmanager
    def _lock(self):
        """This process's threads and other processes that mapped the same file."""
        with self._tlock:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    # --- opening ----------------------------------------------------------------
    @classmethod
    def open(cls, path: str, size: int) -> "DirtyMap":
        """Open the map of a ``size``-byte source, creating it (untrusted: nothing tracked yet) if absent."""
        if size <= 0:
            raise ConfigError(f"dirty map {path!r}: source size must be positive, got {size}")
        slot = _padded(-(-(-(-size // FINE_BLOCK)) // 8))
        want = HEADER_SIZE + 2 * slot
        created = False
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    os.ftruncate(fd, want)
                    os.pwrite(fd, _HEAD.pack(MAGIC, VERSION, FINE_BLOCK, size, 0, 0, 1, 0, boot_id()), 0)
                    os.fsync(fd)
                except OSError:
                    os.close(fd)
                    os.unlink(path)
                    raise
                created = True
        except OSError as exc:
            raise ConfigError(f"dirty map {path!r} cannot be opened or created: {exc.strerror}") from None
        try:
            if os.fstat(fd).st_size != want:
                raise ManifestError(f"dirty map {path!r} is {os.fstat(fd).st_size} bytes, a {size}-byte source needs {want}")
            head = os.pread(fd, _HEAD.size, 0)
            magic, version, bsize, msize, active, pending, clean, trusted, boot = _HEAD.unpack(head)
            if magic != MAGIC or version != VERSION or bsize != FINE_BLOCK:
                raise ManifestError(f"dirty map {path!r} is not a version {VERSION} dirty map of 4 KiB blocks")
            if msize != size:
                raise ManifestError(f"dirty map {path!r} tracks {msize} bytes, the source has {size}")
            if active not in (0, 1) or pending not in (0, 1):
                raise ManifestError(f"dirty map {path!r} has a damaged header")
            mm = mmap.mmap(fd, want)
        except BaseException:
            os.close(fd)
            raise
        if created:
            ok, reason = False, "new map: nothing was tracked before it existed"
        elif not trusted:
            ok, reason = False, "never reconciled with a full scan"
        elif clean or boot == boot_id():
            # a clean close, or a process that died under this same boot: the page cache kept every bit
            ok, reason = True, "clean" if clean else "process stopped without closing; the page cache kept its marks"
        else:
            ok, reason = False, "the machine restarted since the map was last open: marks may be lost"
        m = cls(path, fd, size, mm, ok, reason)
        mm[_CLEAN] = 0
        mm[32:68] = boot_id()
        if not ok:
            mm[_TRUSTED] = 0
        mm.flush(0, mmap.PAGESIZE)  # a later machine crash must find "not closed cleanly"
        return m

    def close(self) -> None:
        if self._closed:
            return
        with self._lock():
            self._bits = []
            mm = self._mm
            mm.flush()
            mm[_CLEAN] = 1
            mm.flush(0, mmap.PAGESIZE)
            self._closed = True
            try:
                mm.close()
            except BufferError:
                # a finished round's views of the bits are still alive, held by a reference
                # cycle (an exception's traceback); everything is flushed already, so the
                # mapping may go whenever they do
                gc.collect()
                try:
                    mm.close()
                except BufferError:
                    pass
        os.close(self.fd)

    def __enter__(self) -> "DirtyMap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- marking ------------------------------------------------------------------
    def mark(self, offset: int, length: int) -> None:
        """Record a write of ``length`` bytes at ``offset`` (every block it touches becomes dirty)."""
        if length <= 0:
            return
        if offset < 0 or offset + length > self.size:
            raise ConfigError(f"dirty map {self.path!r}: write {offset}+{length} is outside the {self.size}-byte source")
        with self._lock():
            _set_bits(self._bits[self._mm[_ACTIVE]], offset // FINE_BLOCK, (offset + length - 1) // FINE_BLOCK + 1)

    def merge(self, other: "DirtyMap | np.ndarray") -> None:
        """OR another map (or a bool array of blocks) into the active slot."""
        with self._lock():
            active = self._bits[self._mm[_ACTIVE]]
            if isinstance(other, DirtyMap):
                if other.nblocks != self.nblocks:
                    raise ConfigError("dirty maps of different sizes cannot be merged")
                with other._lock():
                    for bits in other._bits:
                        np.bitwise_or(active, bits, out=active)
            else:
                mask = np.asarray(other, dtype=bool)
                if len(mask) != self.nblocks:
                    raise ConfigError(f"a mask of {len(mask)} blocks does not fit a map of {self.nblocks}")
                np.bitwise_or(active, np.packbits(mask, bitorder="little"), out=active)

    def ranges(self) -> Iterator[tuple[int, int]]:
        """Dirty (offset, length) ranges of the active slot and of an unreleased frozen one."""
        with self._lock():
            slots = [self._bits[self._mm[_ACTIVE]]]
            if self._mm[_PENDING]:
                slots.append(self._bits[1 - self._mm[_ACTIVE]])
            union = slots[0].copy() if len(slots) == 1 else np.bitwise_or(*slots)
        yield from _ranges(union, self.size)

    def dirty_blocks(self) -> int:
        with self._lock():
            total = _popcount(self._bits[self._mm[_ACTIVE]])
            if self._mm[_PENDING]:
                total += _popcount(self._bits[1 - self._mm[_ACTIVE]])
            return total

    # --- rounds -------------------------------------------------------------------
    def freeze(self) -> "Frozen":
        """Take the marks so far for a round; later marks go to a fresh slot."""
        with self._lock():
            mm = self._mm
            a = mm[_ACTIVE]
            if mm[_PENDING]:
                # the last round never released its slot: fold the new marks into it
                frozen = self._bits[1 - a]
                np.bitwise_or(frozen, self._bits[a], out=frozen)
                self._bits[a][:] = 0
                return Frozen(self, 1 - a)
            # the other slot is empty (released); the current one becomes the frozen one
            mm[_PENDING] = 1
            mm[_ACTIVE] = 1 - a  # one byte: marks switch slots at once
            return Frozen(self, a)

    def trust(self) -> None:
        """A round that read the whole source has completed since the map was frozen
        for it: the map holds every write since, so later rounds may rely on it."""
        with self._lock():
            self._mm[_TRUSTED] = 1
            self._mm.flush(0, mmap.PAGESIZE)
            self.trusted = True
            self.reason = "reconciled by a full round"

    def reset(self, *, dirty: bool = False) -> None:
        """After a full scan: clear both slots (or mark everything dirty) and trust the map again."""
        with self._lock():
            for bits in self._bits:
                bits[:] = 0
            if dirty:
                _set_bits(self._bits[self._mm[_ACTIVE]], 0, self.nblocks)
            self._mm[_PENDING] = 0
            self._mm.flush()
            self._mm[_TRUSTED] = 1
            self._mm.flush(0, mmap.PAGESIZE)
            self.trusted = True
            self.reason = "reset after a full scan"

    def _release(self, slot: int) -> None:
        with self._lock():
            if not self._mm[_PENDING] or slot != 1 - self._mm[_ACTIVE]:
                return  # released already
            self._bits[slot][:] = 0  # killed half-way: the round was complete, its blocks are on the target
            self._mm[_PENDING] = 0


class Frozen:
    """The marks one round sends. Call :meth:`release` once the round is durable on the target."""

    def __init__(self, owner: DirtyMap, slot: int) -> None:
        self._owner = owner
        self._slot = slot

    @property
    def _snapshot(self) -> np.ndarray:
        return self._owner._bits[self._slot]

    def ranges(self) -> Iterator[tuple[int, int]]:
        yield from _ranges(self._snapshot, self._owner.size)

    def blocks(self, first: int, count: int) -> np.ndarray:
        """Bool array: which of blocks [first, first+count) this round must look at."""
        lo, hi = first // 8, -(-(first + count) // 8)
        bits = np.unpackbits(self._snapshot[lo:hi], bitorder="little").astype(bool)
        start = first - lo * 8
        return bits[start:start + count]

    def dirty_blocks(self) -> int:
        return _popcount(self._snapshot)

    def release(self) -> None:
        self._owner._release(self._slot)


def _padded(n: int) -> int:
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


def _set_bits(bits: np.ndarray, first: int, end: int) -> None:
    """Set bits [first, end) of a little-endian bitmap."""
    if end <= first:
        return
    lo_byte, hi_byte = first // 8, (end - 1) // 8
    if lo_byte == hi_byte:
        bits[lo_byte] |= ((1 << (end - first)) - 1) << (first % 8)
        return
    bits[lo_byte] |= (0xFF << (first % 8)) & 0xFF
    if hi_byte > lo_byte + 1:
        bits[lo_byte + 1:hi_byte] = 0xFF
    bits[hi_byte] |= (1 << ((end - 1) % 8 + 1)) - 1


def _popcount(bits: np.ndarray) -> int:
    total = 0
    for i in range(0, len(bits), SCAN_BYTES):
        total += int(np.unpackbits(bits[i:i + SCAN_BYTES]).sum(dtype=np.int64))
    return total


def _ranges(bits: np.ndarray, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each run of set bits, in bounded pieces; runs across pieces are joined."""
    pending: tuple[int, int] | None = None
    for i in range(0, len(bits), SCAN_BYTES):
        piece = bits[i:i + SCAN_BYTES]
        if not piece.any():
            continue
        mask = np.unpackbits(piece, bitorder="little").astype(bool)
        for b0, n in runs_of(mask, i * 8):
            off = b0 * FINE_BLOCK
            end = min((b0 + n) * FINE_BLOCK, size)
            if pending is not None and pending[0] + pending[1] == off:
                pending = (pending[0], end - pending[0])
                continue
            if pending is not None:
                yield pending
            pending = (off, end - off)
    if pending is not None:
        yield pending


def tracked_pwrite(fd: int, data, offset: int, dirty: DirtyMap) -> None:
    """pwrite ``data`` at ``offset`` and record it in ``dirty`` (before and after: see the module doc)."""
    view = memoryview(data).cast("B")
    dirty.mark(offset, len(view))
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    dirty.mark(offset, len(view))


class FrozenMarks(Protocol):
    """The marks one round sends: a :class:`Frozen` slot of a DirtyMap, or the kernel
    tracker's (blocks.tracker.FrozenBits)."""

    def ranges(self) -> Iterator[tuple[int, int]]: ...
    def dirty_blocks(self) -> int: ...
    def release(self) -> None: ...


class ChangeMap(Protocol):
    """What a block sender reads a round's changes from: a :class:`DirtyMap` that the
    source's writers mark, or the kernel tracker's map (blocks.tracker.TrackedDirtyMap)."""

    trusted: bool
    reason: str

    def freeze(self) -> FrozenMarks: ...
    def trust(self) -> None: ...
