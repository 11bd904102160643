"""A change journal of a live source tree: which directories changed since the last round.

fanotify marks every file system the tree spans (FAN_MARK_FILESYSTEM) with
FAN_REPORT_DFID_NAME: each event names the directory (a file handle) and the
entry that changed in it. A reader thread keeps the kernel's queue (16,384
events) drained into a set of directories; a round calls :meth:`take` first,
which reads the queue to its end on the caller's thread, so the round covers
every change made before it began (the kernel queues an event inside the
system call that made the change, before that call returns) and the next
round covers the rest. The handles are turned into paths then
(open_by_handle_at, then the descriptor's path): a directory renamed since is
found under its new name, one removed since is gone, and its removal is an
event in its parent.

A round then scans (files.dirscan ``start``) and asks the receiver to list
(TREE_SUBSET) only those directories: each one whose entries changed, its
parent (its own time changed), and, with everything below it, each
directory that was created, moved or removed (a moved-in directory brings
content that raised no event). What the journal cannot vouch for makes the
next round a whole-tree one, with the reason: the first round of a journal;
a queue overflow (FAN_Q_OVERFLOW) or more directories than a TREE_SUBSET
carries; a reader that stopped; a round that failed (the receiver may hold
temporaries where the subset does not look); a receiver whose last round is
not the one this journal followed; a file system mounted in the tree or
unmounted from it since the last round (each round compares the mount table:
the journal then marks the file systems the tree spans now, before that round
walks it). Writes through a shared mmap raise no event: the cutover round and
every ``whole_every``-th round walk the whole tree.

Needs CAP_SYS_ADMIN; :func:`open_journal` says why not (and the rounds walk
the whole tree).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import select
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from smsrepl.errors import JournalUnavailable

log = logging.getLogger("smsrepl.journal")

FAN_CLOEXEC, FAN_NONBLOCK = 0x1, 0x2
FAN_REPORT_DFID_NAME = 0x00000C00
FAN_MARK_ADD, FAN_MARK_FILESYSTEM = 0x1, 0x100
FAN_MODIFY, FAN_ATTRIB = 0x2, 0x4
FAN_MOVED_FROM, FAN_MOVED_TO, FAN_CREATE, FAN_DELETE = 0x40, 0x80, 0x100, 0x200
FAN_Q_OVERFLOW = 0x4000
FAN_ONDIR = 0x40000000
FAN_EVENT_INFO_TYPE_DFID_NAME = 2
#: what the journal listens for: content, metadata, and names coming and going
MASK = FAN_MODIFY | FAN_ATTRIB | FAN_MOVED_FROM | FAN_MOVED_TO | FAN_CREATE | FAN_DELETE | FAN_ONDIR
#: events that change a directory's entries (and so its own mtime)
ENTRIES = FAN_MOVED_FROM | FAN_MOVED_TO | FAN_CREATE | FAN_DELETE
AT_FDCWD = -100
#: directories one round may name at most (a TREE_SUBSET of them stays well under a frame)
MAX_DIRS = 50_000
_META = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
_INFO = struct.Struct("=BBH")  # info_type, pad, len
_HANDLE = struct.Struct("=Ii")  # handle_bytes, handle_type (after the 8-byte fsid)
_OCTAL = re.compile(rb"\\([0-7]{3})")


@dataclass
class Changes:
    """What one round deals with: (relative directory, recursive) pairs, or the reason the
    round must walk the whole tree instead."""

    dirs: list[tuple[bytes, bool]] = field(default_factory=list)
    whole_because: str | None = None


class _Group:
    """One fanotify group, marking the file system (device ``dev``) mounted at ``path``. No
    descriptor of that file system is kept (it would keep an administrator from unmounting it):
    handles resolve through one opened for each round (:meth:`mount_fd`)."""

    def __init__(self, libc, path: bytes, dev: int) -> None:
        fd = libc.fanotify_init(FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_DFID_NAME, os.O_RDONLY | os.O_LARGEFILE)
        if fd < 0:
            e = ctypes.get_errno()
            raise JournalUnavailable(f"fanotify_init: {os.strerror(e)}"
                                     + (" (needs CAP_SYS_ADMIN)" if e == errno.EPERM else ""))
        self.fd = fd
        if libc.fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, MASK, AT_FDCWD, path) < 0:
            e = ctypes.get_errno()
            os.close(fd)
            raise JournalUnavailable(f"fanotify_mark of the file system at {os.fsdecode(path)!r}: {os.strerror(e)}"
                                     + (" (needs CAP_SYS_ADMIN)" if e == errno.EPERM else ""))
        self.path = path
        self.dev = dev

    def close(self) -> None:
        os.close(self.fd)

    def mount_fd(self) -> int:
        """A descriptor of the mount point, where the marked file system is still mounted there
        (OSError otherwise: its events would be resolved against another)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if os.fstat(fd).st_dev != self.dev:
            os.close(fd)
            raise OSError(errno.ESTALE, f"another file system is mounted at {os.fsdecode(self.path)!r} now")
        return fd


def _file_systems(root: bytes) -> list[tuple[bytes, int]]:
    """(mount point, device) of each file system the tree at ``root`` spans, the root's own
    first; JournalUnavailable where one file system is mounted twice in it."""
    devs: dict[int, bytes] = {}
    for point in _mounts_below(root):
        try:
            dev = os.stat(point).st_dev
        except OSError:
            continue  # a mount point hidden by another mount
        if dev in devs:  # a handle would resolve through one of the two: paths would be guessed
            raise JournalUnavailable(f"{os.fsdecode(point)!r} and {os.fsdecode(devs[dev])!r} are one file "
                                     f"system mounted twice in the tree")
        devs[dev] = point
    return [(point, dev) for dev, point in devs.items()]


def _mounts_below(root: bytes) -> list[bytes]:
    """Mount points at or below ``root`` (this process's mount table), the root's own first."""
    out = []
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            point = _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), line.split(b" ")[4])  # \040 is a space
            if point.startswith(root + b"/") and point != root:
                out.append(point)
    return [root] + sorted(set(out))


class ChangeJournal:
    def __init__(self, root: str | bytes, *, whole_every: int = 10) -> None:
        self.root = os.path.realpath(os.fsencode(root))
        self.whole_every = whole_every
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
        self._libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.groups: list[_Group] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        #: (group index, handle bytes) -> [event mask bits, names of directories that came or went in it]
        self._pending: dict[tuple[int, bytes], list] = {}
        self._whole: str | None = "the first round of a change journal walks the whole tree"
        #: why every round walks the whole tree from now on (the file systems could not be marked)
        self._unmarked: str | None = None
        self._journal_rounds = 0
        self._paused = threading.Event()  # tests: let the kernel's queue fill
        self.last_round: int | None = None  # the receiver's round id after the last round that completed
        self._mark(_file_systems(self.root))

    @property
    def file_systems(self) -> list[tuple[bytes, int]]:
        """(mount point, device) of the file systems the tree spans, as marked."""
        return [(g.path, g.dev) for g in self.groups]

    def _mark(self, file_systems: list[tuple[bytes, int]]) -> None:
        """A fanotify group for each of ``file_systems`` and a reader thread for them (those of
        before are closed)."""
        self._stop_reading()
        try:
            for point, dev in file_systems:
                self.groups.append(_Group(self._libc, point, dev))
        except BaseException:
            self.close()
            raise
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self.groups, self._closed), name="change-journal",
                                        daemon=True)
        self._thread.start()

    def _stop_reading(self) -> None:
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        for g in self.groups:
            g.close()
        self.groups = []

    # --- reading ---------------------------------------------------------------------
    def _run(self, groups: list[_Group], closed: threading.Event) -> None:
        poller = select.poll()
        for g in groups:
            poller.register(g.fd, select.POLLIN)
        try:
            while not closed.is_set():
                if not poller.poll(200) or self._paused.is_set():
                    continue
                with self._lock:
                    self._drain()
        except BaseException as exc:  # noqa: BLE001 - a dead reader means missed events
            log.error("change journal reader stopped: %s", exc)
            with self._lock:
                self._whole = f"the change journal's reader stopped ({exc})"
                self._pending.clear()

    def _drain(self) -> None:
        """Read every group's queue to its end (the lock is held)."""
        for i, g in enumerate(self.groups):
            while True:
                try:
                    data = os.read(g.fd, 256 << 10)
                except BlockingIOError:
                    break
                if not data:
                    break
                self._parse(i, data)

    def _parse(self, group: int, data: bytes) -> None:
        pos, pending = 0, self._pending
        while pos + _META.size <= len(data):
            length, _, _, meta_len, mask, _, _ = _META.unpack_from(data, pos)
            if length < _META.size:
                raise ValueError("a fanotify event shorter than its header")
            if mask & FAN_Q_OVERFLOW:
                self._whole = "the change journal's queue overflowed (events were lost)"
                pending.clear()
            if self._whole is not None:  # the next round walks the whole tree: nothing to keep
                pos += length
                continue
            p = pos + meta_len
            while p + _INFO.size <= pos + length:
                itype, _, ilen = _INFO.unpack_from(data, p)
                if ilen < _INFO.size:
                    break
                if itype == FAN_EVENT_INFO_TYPE_DFID_NAME:
                    hbytes, _ = _HANDLE.unpack_from(data, p + 12)
                    hend = p + 12 + _HANDLE.size + hbytes
                    key = (group, data[p + 12:hend])  # handle_bytes, handle_type, f_handle
                    name = data[hend:p + ilen].split(b"\0", 1)[0]
                    got = pending.get(key)
                    if got is None:
                        got = pending[key] = [0, set()]
                    got[0] |= mask
                    if mask & FAN_ONDIR and name:
                        got[1].add(name)
                p += ilen
            pos += length
        if len(pending) > MAX_DIRS and self._whole is None:
            self._whole = f"more than {MAX_DIRS} directories changed since the last round"
            pending.clear()

    # --- rounds -----------------------------------------------------------------------
    def take(self, *, round_id: int | None, whole: str | None = None) -> Changes:
        """What the round about to start deals with; call it before the round reads anything.
        ``round_id``: the receiver's last completed round (None: unknown); ``whole``: a reason
        of the caller's for a whole-tree round (the cutover)."""
        moved = self._file_systems_moved() if self._unmarked is None else self._unmarked
        with self._lock:
            self._drain()
            pending, self._pending = self._pending, {}
            reason, self._whole = self._whole, None
        if moved is not None:  # the new marks are in place: the whole walk's changes go to the next round
            pending, reason = {}, reason or moved
        if reason is None and whole is not None:
            reason = whole
        if reason is None and round_id != self.last_round:
            reason = f"the receiver's last round is {round_id}, not {self.last_round} as this journal followed"
        if reason is None and self.whole_every and self._journal_rounds + 1 >= self.whole_every:
            reason = f"every {self.whole_every}th round walks the whole tree (writes through mmap raise no event)"
        if reason is not None:
            self._journal_rounds = 0
            return Changes(whole_because=reason)
        try:
            dirs = self._resolve(pending)
        except OSError as exc:
            self._journal_rounds = 0
            return Changes(whole_because=f"a directory's file handle does not resolve here ({exc.strerror})")
        if len(dirs) > MAX_DIRS:
            return Changes(whole_because=f"more than {MAX_DIRS} directories changed since the last round")
        self._journal_rounds += 1
        return Changes(dirs=dirs)

    def _file_systems_moved(self) -> str | None:
        """Why the next round walks the whole tree where a file system was mounted in the tree
        or unmounted from it since the last round (after marking those it spans now), or None."""
        try:
            now = _file_systems(self.root)
        except (JournalUnavailable, OSError) as exc:
            now, why = [], str(exc)
        else:
            why = "" if now and now[0][0] == self.root else "the tree's root cannot be read"
        if now == self.file_systems:
            return None
        before = dict(self.file_systems)
        after = dict(now)
        came = [os.fsdecode(p) for p, d in now if before.get(p) != d]
        went = [os.fsdecode(p) for p, d in self.file_systems if after.get(p) != d]
        reason = ("the file systems in the tree changed since the last round"
                  + (f" (mounted at {', '.join(came)})" if came else "")
                  + (f" (gone from {', '.join(went)})" if went else "") + (f": {why}" if why else ""))
        log.info("change journal: %s", reason)
        if why:
            self._unmarked = reason
            self._stop_reading()
            return reason
        try:
            self._mark(now)
        except (JournalUnavailable, OSError) as exc:
            self._unmarked = f"the change journal cannot mark the tree's file systems ({exc})"
        return reason

    def _resolve(self, pending: dict) -> list[tuple[bytes, bool]]:
        out: list[tuple[bytes, bool]] = []
        fds: dict[int, int] = {}
        try:
            for (group, handle), (mask, subdirs) in pending.items():
                if group not in fds:
                    fds[group] = self.groups[group].mount_fd()
                self._resolve_one(fds[group], handle, mask, subdirs, out)
        finally:
            for fd in fds.values():
                os.close(fd)
        return out

    def _resolve_one(self, mount_fd: int, handle: bytes, mask: int, subdirs: set,
                     out: list[tuple[bytes, bool]]) -> None:
        rel = self._path(mount_fd, handle)
        if rel is None:
            return  # removed since (its parent's event covers it) or outside the tree
        out.append((rel, False))
        if mask & ENTRIES or b"." in subdirs:  # its own time (or mode, ...) changed: its parent lists it
            if rel:
                out.append((rel.rpartition(b"/")[0], False))
        for name in subdirs:
            if name != b".":
                out.append((rel + b"/" + name if rel else name, True))

    def _path(self, mount_fd: int, handle: bytes) -> bytes | None:
        """The directory's path relative to the root, or None where it is gone or outside;
        OSError where the handle cannot be turned into a directory (a change would be lost)."""
        fd = self._libc.open_by_handle_at(mount_fd, handle, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            if e in (errno.ESTALE, errno.ENOENT):
                return None  # removed: its removal is an event in its parent
            raise OSError(e, os.strerror(e))
        try:
            path = os.readlink(f"/proc/self/fd/{fd}".encode())
        finally:
            os.close(fd)
        if path == self.root:
            return b""
        if not path.startswith(self.root + b"/") or path.endswith(b" (deleted)"):
            return None
        return path[len(self.root) + 1:]

    def completed(self, round_id: int) -> None:
        """The round that took its changes last completed as the receiver's round ``round_id``."""
        self.last_round = round_id

    def force_whole(self, reason: str) -> None:
        """The next round walks the whole tree (the last one failed, or found what the journal
        cannot vouch for)."""
        with self._lock:
            self._whole = self._whole or reason

    def pause(self, paused: bool = True) -> None:
        """Stop (or resume) the reader thread, so the kernel's queue fills (tests)."""
        if paused:
            self._paused.set()
        else:
            self._paused.clear()

    def close(self) -> None:
        self._stop_reading()


def open_journal(root: str, *, whole_every: int = 10, notice: Callable[[str], None] | None = None) -> ChangeJournal | None:
    """A ChangeJournal of ``root``, or None (with one notice line) where it cannot run: rounds
    then walk the whole tree."""
    try:
        return ChangeJournal(root, whole_every=whole_every)
    except (JournalUnavailable, OSError) as exc:
        if notice is not None:
            notice(f"notice: no change journal for {root} ({exc}); every round walks the whole tree")
        return None
