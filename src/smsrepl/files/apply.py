"""Apply tree entries under a target root: atomically, and never outside it.

Every name is checked (no absolute paths, no ``..``, no empty, ``.`` or
over-long components, no NUL). Directories are opened one component at a
time relative to their parent's descriptor with O_NOFOLLOW, so a symlink in
the target (planted or left from an old tree) is never followed by a write.

A file's data goes to a temporary name in its directory, gets its owner,
mode, xattrs and times, is made durable, and only then is renamed onto its
final name: a half-written file never appears under that name. Durability
is batched: up to PENDING_FILES files (or PENDING_BYTES) wait under their
temporary names, one syncfs() makes them all durable, then they are renamed
(one fsync per small file made a tree of 10,000 files take 4x as long; 16
threads fsyncing together still cost 0.07 ms per file against syncfs's 0.014
ms here). syncfs also waits for whatever else is dirty on that file system:
a target file system shared with busy writers makes rounds slower, not less
safe. Temporaries
left by a killed run are named ``.smsrepl~<16 hex>~<name>`` and removed by
:func:`remove_temporaries` at the start of the next. Directory times are
set last (adding entries changes them), by :meth:`TreeWriter.finish`.
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import os
import re
import stat
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import xxhash

from smsrepl import kernels
from smsrepl._lazy import np
from smsrepl.errors import (DecompressionError, RemoteProtocolError, ReplicationError,
                            TargetWriteError)
from smsrepl.files.fdbudget import process_budget
from smsrepl.files.scan import KINDS as KIND_OF, Entry

NAME_MAX = 255
_BAD_PARTS = frozenset((b"", b".", b".."))
TEMP_START = b".smsrepl~"
TEMP_RE = re.compile(rb"^\.smsrepl~[0-9a-f]{16}~")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: hole granularity when writing sparse files
SPARSE_BLOCK = 4096
_ZERO_BLOCK = bytes(SPARSE_BLOCK)
#: files written under temporary names before one syncfs() and their renames
PENDING_FILES = 4096
PENDING_BYTES = 256 << 20
#: how long a writer waits for descriptors other sessions hold before it writes one file at a
#: time the careful way (one descriptor, briefly)
FD_WAIT = 5.0
#: directories made durable one fsync each at the end of a round; more take one syncfs
FSYNC_DIRS = 16
#: threads writing a run of small files (kernels.write_files): file creation is mostly
#: kernel time, and an anonymous file is made without the directory's lock
WRITE_THREADS = max(1, min(4, os.cpu_count() or 1))


def _syncfs(fd: int) -> None:
    """Flush the file system holding ``fd`` (syncfs(2)); sync() where libc lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        os.sync()
        return
    if fn(fd) != 0:
        err = ctypes.get_errno()
        raise TargetWriteError(f"syncfs failed: {os.strerror(err)}")


def check_path(path: bytes) -> tuple[bytes, ...]:
    """The components of a relative entry path, or RemoteProtocolError (SMS.1908) naming the problem."""
    if not isinstance(path, bytes) or not path:
        raise RemoteProtocolError(f"entry path {path!r} is empty or not bytes")
    if path.startswith(b"/"):
        raise RemoteProtocolError(f"entry path {path!r} is absolute")
    parts = tuple(path.split(b"/"))
    if not _BAD_PARTS.isdisjoint(parts):
        raise RemoteProtocolError(f"entry path {path!r} has an empty, '.' or '..' component")
    if b"\0" in path:
        raise RemoteProtocolError(f"entry path {path!r} contains a NUL byte")
    if max(map(len, parts)) > NAME_MAX:
        raise RemoteProtocolError(f"entry path {path!r} has a component longer than {NAME_MAX} bytes")
    return parts


_TEMP_PREFIX = os.urandom(4).hex().encode()
_TEMP_TAG = int(_TEMP_PREFIX, 16) ^ 0x80000000  # link_files' temporaries: another prefix than ours
_temp_counter = itertools.count()


def _temp_name(name: bytes) -> bytes:
    # a random part per process and a counter: unique without a getrandom() per file
    return b".smsrepl~%s%08x~%s" % (_TEMP_PREFIX, next(_temp_counter) & 0xFFFFFFFF, name[:NAME_MAX - 27])


class TreeWriter:
    def __init__(self, root: str | bytes, *, preserve_owner: bool | None = None, fsync: bool = True,
                 cache: int = 64) -> None:
        self.root = os.fsencode(root)
        try:
            self.root_fd = os.open(self.root, _DIR_FLAGS)
        except OSError as exc:
            raise TargetWriteError(f"target root {os.fsdecode(self.root)!r}: {exc.strerror}") from None
        self.preserve_owner = os.geteuid() == 0 if preserve_owner is None else preserve_owner
        self.fsync = fsync
        self._fds: OrderedDict[tuple[bytes, ...], int] = OrderedDict()
        self._cache = cache
        self._dirs: list[tuple[tuple[bytes, ...], Entry]] = []
        #: directories whose entries changed (made durable by finish()), with their times before
        #: the first change: a directory the round gives no metadata for gets them back
        self._touched: dict[tuple[bytes, ...], tuple[int, int] | None] = {}
        #: written files waiting for one syncfs and their renames: (temporary name, parts)
        self._pending: list[tuple[bytes, tuple[bytes, ...]]] = []
        self._pending_paths: set[bytes] = set()
        self._pending_bytes = 0
        #: runs of anonymous files written by kernels.write_files, named after the next syncfs
        self._runs: list[tuple] = []
        self._run_files = 0
        self._behind: ThreadPoolExecutor | None = None
        self._flushing: Future | None = None
        #: descriptors of run files come from the process's budget, shared by its writers
        self._budget = process_budget() if kernels.TREE else None
        self._native = self._budget is not None and self._budget.total >= 256
        if self._budget is not None:
            self._budget.join()
        self._held = 0  # descriptors of this writer's runs, taken from the budget
        #: what could not be recreated (device files without root, xattrs the file system refused)
        self.reported: list[str] = []

    # --- directory descriptors ------------------------------------------------
    def dir_fd(self, parts: tuple[bytes, ...]) -> int:
        """An O_NOFOLLOW descriptor of directory ``parts`` (which must exist as a real directory)."""
        if not parts:
            return self.root_fd
        fd = self._fds.get(parts)
        if fd is not None:
            self._fds.move_to_end(parts)
            return fd
        parent = self.dir_fd(parts[:-1])
        try:
            fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            what = "is a symlink or not a directory" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else exc.strerror
            raise TargetWriteError(f"target {self._show(parts)!r}: {what}") from None
        self._fds[parts] = fd
        limit = self._cache if self._budget is None else min(self._cache, max(8, self._budget.share() // 8))
        while len(self._fds) > limit:
            old, ofd = self._fds.popitem(last=False)
            os.close(ofd)
        return fd

    def _touch(self, parts: tuple[bytes, ...]) -> None:
        """Directory ``parts`` is about to change: note its times first."""
        if parts in self._touched:
            return
        try:
            st = os.fstat(self.dir_fd(parts))
            self._touched[parts] = (st.st_atime_ns, st.st_mtime_ns)
        except (OSError, TargetWriteError):
            self._touched[parts] = None

    def _forget(self, parts: tuple[bytes, ...]) -> None:
        for key in [k for k in self._fds if k[:len(parts)] == parts]:
            os.close(self._fds.pop(key))

    def _show(self, parts) -> str:
        return os.fsdecode(b"/".join((self.root,) + tuple(parts)))

    def close(self) -> None:
        try:
            if self._behind is not None:
                try:
                    self._reap()
                except (OSError, ReplicationError) as exc:  # closing after a failure: say it, keep closing
                    self.reported.append(f"files of the last batch not kept: {exc}")
                self._behind.shutdown(wait=True)
                self._behind = None
            runs, self._runs, self._run_files = self._runs, [], 0
            for run in runs:  # files never made durable are dropped: they have no name
                _drop_run(*run)
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        finally:
            # whatever failed above, the process's descriptor budget gets this writer's share back:
            # a share kept by a writer that is gone starves every later session of the process
            if self.root_fd >= 0:
                self.root_fd, fd = -1, self.root_fd
                if self._budget is not None:
                    self._budget.leave(self._held)
                    self._held = 0
                os.close(fd)

    def __enter__(self) -> "TreeWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- entries ---------------------------------------------------------------
    def existing(self, path: bytes) -> os.stat_result | None:
        parts = check_path(path)
        try:
            return os.stat(parts[-1], dir_fd=self.dir_fd(parts[:-1]), follow_symlinks=False)
        except FileNotFoundError:
            return None

    def mkdir(self, entry: Entry) -> None:
        """Create directory ``entry`` (or keep it); its metadata is set by finish()."""
        parts = check_path(entry.path)
        parent = self.dir_fd(parts[:-1])
        st = self._lstat(parts, parent)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            self._touch(parts[:-1])
            self._remove(parts, parent, st)
            st = None
        if st is None:
            self._touch(parts[:-1])
            os.mkdir(parts[-1], 0o700, dir_fd=parent)
        self._dirs.append((parts, entry))

    def write_file(self, entry: Entry, chunks: Iterable[bytes | memoryview], *, sparse: bool = True) -> None:
        """Write a regular file from its data, in order; atomically replaces what is there."""
        sink = self.open_file(entry, sparse=sparse)
        try:
            for chunk in chunks:
                sink.write(chunk)
        except BaseException:
            sink.abort()
            raise
        sink.commit()

    def write_small(self, entry: Entry, data) -> None:
        """write_file() for a whole file in one buffer, without a FileSink: the common case
        of many small files, where per-file overhead is what counts."""
        parts = check_path(entry.path)
        parent = self.dir_fd(parts[:-1])
        self._touch(parts[:-1])  # before its temporary name changes the directory's times
        tmp = _temp_name(parts[-1])
        if len(data) != entry.size:
            raise RemoteProtocolError(f"{os.fsdecode(entry.path)!r}: got {len(data)} bytes, "
                                      f"the entry says {entry.size}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
        try:
            if self._write_data(fd, data, 0, True):
                os.ftruncate(fd, len(data))  # a file ending in a hole
            self._set_meta_fd(fd, entry, new=True)
        except BaseException:
            os.close(fd)
            _unlink_quiet(tmp, parent)
            raise
        os.close(fd)
        if self.fsync:
            self._defer(tmp, parts, len(data))
        else:
            self._install(tmp, parts, parent)

    def open_file(self, entry: Entry, *, sparse: bool = True, digest: bool = False) -> "FileSink":
        """Start writing regular file ``entry`` under a temporary name (see FileSink); with
        ``digest``, commit() can check the data against an XXH3-128."""
        parts = check_path(entry.path)
        parent = self.dir_fd(parts[:-1])
        self._touch(parts[:-1])  # before its temporary name changes the directory's times
        tmp = _temp_name(parts[-1])
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
        return FileSink(self, entry, parts, parent, tmp, fd, sparse, digest)

    def symlink(self, entry: Entry) -> None:
        parts = check_path(entry.path)
        parent = self.dir_fd(parts[:-1])
        self._touch(parts[:-1])  # before its temporary name changes the directory's times
        tmp = _temp_name(parts[-1])
        os.symlink(entry.link, tmp, dir_fd=parent)
        try:
            if self.preserve_owner:
                os.chown(tmp, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
            os.utime(tmp, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent, follow_symlinks=False)
        except BaseException:
            _unlink_quiet(tmp, parent)
            raise
        self._install(tmp, parts, parent)

    def hardlink(self, entry: Entry, to: bytes) -> None:
        """Make ``entry`` another name of the already applied ``to``."""
        parts, target = check_path(entry.path), check_path(to)
        if to in self._pending_paths:
            self.flush_pending()  # ``to`` still waits under its temporary name
        parent = self.dir_fd(parts[:-1])
        tdir = self.dir_fd(target[:-1])
        have = self._lstat(parts, parent)
        if have is not None:
            other = os.stat(target[-1], dir_fd=tdir, follow_symlinks=False)
            if (have.st_dev, have.st_ino) == (other.st_dev, other.st_ino):
                return
        self._touch(parts[:-1])  # before its temporary name changes the directory's times
        tmp = _temp_name(parts[-1])
        os.link(target[-1], tmp, src_dir_fd=tdir, dst_dir_fd=parent, follow_symlinks=False)
        self._install(tmp, parts, parent)

    def special(self, entry: Entry) -> bool:
        """A FIFO, socket or device node; False (and reported) where it cannot be made."""
        parts = check_path(entry.path)
        parent = self.dir_fd(parts[:-1])
        kind = {"fifo": stat.S_IFIFO, "chardev": stat.S_IFCHR, "blockdev": stat.S_IFBLK, "socket": stat.S_IFSOCK}
        if entry.kind in ("chardev", "blockdev") and os.geteuid() != 0:
            self.reported.append(f"{os.fsdecode(entry.path)}: device file not recreated (needs root)")
            return False
        self._touch(parts[:-1])  # before its temporary name changes the directory's times
        tmp = _temp_name(parts[-1])
        os.mknod(tmp, 0o600 | kind[entry.kind], entry.rdev, dir_fd=parent)
        try:
            self._set_meta_path(tmp, parent, entry)
        except BaseException:
            _unlink_quiet(tmp, parent)
            raise
        self._install(tmp, parts, parent)
        return True

    def set_meta(self, entry: Entry) -> None:
        """Bring an existing entry's owner, mode, xattrs and times to ``entry``'s (data untouched).

        The entry there must be of the same kind (RemoteProtocolError otherwise): a
        mode meant for a FIFO must never reach a file through a symlink, nor an
        open() meant for a file block on a FIFO."""
        parts = check_path(entry.path)
        if entry.path in self._pending_paths:
            self.flush_pending()
        parent = self.dir_fd(parts[:-1])
        st = self._lstat(parts, parent)
        if st is None:
            return
        if KIND_OF.get(stat.S_IFMT(st.st_mode)) != entry.kind:
            raise RemoteProtocolError(f"metadata for a {entry.kind} at {os.fsdecode(entry.path)!r}, "
                                      f"which is a {KIND_OF.get(stat.S_IFMT(st.st_mode), 'unknown')} here")
        if entry.kind == "symlink":
            if self.preserve_owner:
                os.chown(parts[-1], entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
            os.utime(parts[-1], ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent, follow_symlinks=False)
        elif entry.kind == "dir":
            self._dirs.append((parts, entry))
        elif entry.kind == "file":
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
            except PermissionError:  # mode 000 and not root: what can be set without data access
                self._set_meta_path(parts[-1], parent, entry)
                return
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise RemoteProtocolError(f"{os.fsdecode(entry.path)!r} changed kind while being updated")
                self._set_meta_fd(fd, entry)
            finally:
                os.close(fd)
        else:
            self._set_meta_path(parts[-1], parent, entry)

    def set_root_meta(self, entry: Entry) -> None:
        """The target root takes the source root's metadata (at finish())."""
        self._dirs.append(((), entry))

    def readlink(self, path: bytes) -> bytes:
        parts = check_path(path)
        return os.readlink(parts[-1], dir_fd=self.dir_fd(parts[:-1]))

    def delete(self, path: bytes, *, recursive: bool = False) -> None:
        """Remove an entry; symlinks are removed, not followed. A directory goes only when empty
        (what is left in it, such as excluded entries, keeps it), or with everything in it when
        ``recursive``. An entry whose parent is already gone is gone."""
        parts = check_path(path)
        self.flush_pending()
        try:
            parent = self.dir_fd(parts[:-1])
        except TargetWriteError:
            return  # a parent removed or replaced by a file earlier in the round
        st = self._lstat(parts, parent)
        if st is None:
            return
        self._touch(parts[:-1])
        if stat.S_ISDIR(st.st_mode) and not recursive:
            self._forget(parts)
            try:
                os.rmdir(parts[-1], dir_fd=parent)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                return
        else:
            self._remove(parts, parent, st)

    def _defer(self, tmp: bytes, parts: tuple[bytes, ...], size: int) -> None:
        self._pending.append((tmp, parts))
        self._pending_paths.add(b"/".join(parts))
        self._pending_bytes += size
        if len(self._pending) + self._run_files >= PENDING_FILES or self._pending_bytes >= PENDING_BYTES:
            self.flush_pending()

    def flush_pending(self) -> None:
        """Make the waiting files durable, then give them their names."""
        self._reap()
        if not self._pending and not self._runs:
            return
        self._settle_all(_sync_and_link(self.root_fd, self._take_runs()))  # its syncfs covers both kinds
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        self._pending_paths.clear()
        for tmp, parts in pending:
            self._install(tmp, parts, self.dir_fd(parts[:-1]))

    # --- runs of small files, natively (kernels.write_files) ---------------------
    def write_run(self, body, pos: int) -> tuple[int, int, int]:
        """Write the run of plain FILE operations of a FILE_OPS ``body`` that starts at ``pos``
        (see kernels.write_files); they get their names with the next flush_pending().
        Returns (where the first operation not taken starts, files, bytes): ``pos`` itself
        where this writer cannot, or the operation there is one for the careful path."""
        if not self._native:
            return pos, 0, 0
        room = self._descriptors(PENDING_FILES - self._run_files - len(self._pending))
        if not room:
            return pos, 0, 0  # none to be had now: this file goes the careful way
        try:
            end, files, nbytes, fds, dirs, fdirs, names, paths = kernels.write_files(
                body, pos, self._parent_fd, self.preserve_owner, room, WRITE_THREADS)
        except OSError as exc:
            self._budget.give_back(room)
            if getattr(exc, "step", "") == "create" and exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                self._native = False  # no O_TMPFILE here: the careful path writes named temporaries
                return pos, 0, 0
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # descriptors outside the budget ran short: make this writer's files durable
                # (which closes theirs) and take this one the careful way
                self.flush_pending()
                return pos, 0, 0
            name = repr(os.fsdecode(exc.filename)) if exc.filename else "a new file"
            raise TargetWriteError(f"writing {name} under {os.fsdecode(self.root)!r}: {exc.strerror}") from None
        except BaseException:
            # anything else (a directory that could not be opened for the run, a stop): the room
            # goes back too, or the process's budget stays short of it for every later session
            self._budget.give_back(room)
            raise
        used = len(fds) + len(dirs)
        if used > room:
            self._budget.force(used - room)  # the runs' directories
        else:
            self._budget.give_back(room - used)
        self._held += used
        if files:
            self._runs.append((fds, dirs, fdirs, names, paths))
            self._run_files += files
            self._pending_bytes += nbytes
            self._pending_paths.update(paths)
            if not self.fsync:
                self._settle_all(_sync_and_link(self.root_fd, self._take_runs(), sync=False))
            elif self._run_files + len(self._pending) >= PENDING_FILES or self._pending_bytes >= PENDING_BYTES \
                    or self._held >= self._budget.share():
                self._flush_behind()
        return end, files, nbytes

    def _descriptors(self, want: int) -> int:
        """Descriptors for up to ``want`` more run files from the budget: this writer's own
        waiting files made durable first when none are left, then a wait for other sessions';
        0 when none came within FD_WAIT."""
        if want <= 0:
            self.flush_pending()
            want = PENDING_FILES
        got = self._budget.take(want, self._held)
        if got:
            return got
        self.flush_pending()  # gives this writer's back
        deadline = time.monotonic() + FD_WAIT
        while not (got := self._budget.take(want, self._held)) and time.monotonic() < deadline:
            self._budget.wait(0.2)
        return got

    def _release(self, n: int) -> None:
        if self._budget is not None and n:
            self._held -= n
            self._budget.give_back(n)

    def _flush_behind(self) -> None:
        """flush_pending() for the runs waiting, with their syncfs and linking done by a
        thread of its own while the next runs are written (one such flush at a time)."""
        self._reap()
        if self._pending:  # named temporaries are renamed here: the careful, synchronous way
            self.flush_pending()
            return
        runs, self._pending_bytes = self._take_runs(), 0
        if self._behind is None:
            self._behind = ThreadPoolExecutor(1, thread_name_prefix="flush-behind")
        self._flushing = self._behind.submit(_sync_and_link, self.root_fd, runs)

    def _reap(self) -> None:
        """Wait for the flush behind, and settle what it could not link."""
        fut, self._flushing = self._flushing, None
        if fut is not None:
            self._settle_all(fut.result())

    def _take_runs(self) -> list[tuple]:
        """The runs waiting, their directories' times noted first (linking changes them)."""
        runs, self._runs, self._run_files = self._runs, [], 0
        for run in runs:
            for parent in {p.rpartition(b"/")[0] for p in run[4]}:
                self._touch(tuple(parent.split(b"/")) if parent else ())
        return runs

    def _parent_fd(self, parent: bytes) -> int:
        return self.dir_fd(check_path(parent) if parent else ())

    def _settle_all(self, linked: list[tuple]) -> None:
        """After _sync_and_link: the paths are named; what could not be linked is dealt with."""
        for run, failures in linked:
            paths = run[4]
            self._pending_paths.difference_update(paths)
            self._release(len(run[0]) + len(run[1]))  # linked: their descriptors are closed
            for i, err, tmp in failures:
                parts = check_path(paths[i])
                if tmp is None:
                    raise TargetWriteError(f"writing {os.fsdecode(paths[i])!r} (FILE): {os.strerror(err)}")
                self._install(tmp, parts, self.dir_fd(parts[:-1]))  # a directory held the name

    def finish(self) -> None:
        """Set the metadata of the directories created or touched, deepest first, and make
        every rename, link and removal durable (fsync of the directories they changed)."""
        self.flush_pending()
        given = set()
        for parts, entry in sorted(self._dirs, key=lambda d: len(d[0]), reverse=True):
            self._set_meta_fd(self.dir_fd(parts), entry)
            given.add(parts)
        self._dirs.clear()
        for parts, times in self._touched.items():
            if times is not None and parts not in given:
                try:
                    os.utime(self.dir_fd(parts), ns=times)
                except (OSError, TargetWriteError):
                    pass  # removed later in the round
        if self.fsync and len(self._touched) > FSYNC_DIRS:
            _syncfs(self.root_fd)  # one flush for them all
        elif self.fsync:
            for parts in sorted(self._touched, key=len, reverse=True):
                try:
                    os.fsync(self.dir_fd(parts))
                except TargetWriteError:
                    pass  # removed later in the round
        self._touched.clear()

    # --- helpers ---------------------------------------------------------------
    @staticmethod
    def _lstat(parts, parent) -> os.stat_result | None:
        try:
            return os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _remove(self, parts, parent, st) -> None:
        if stat.S_ISDIR(st.st_mode):
            self._forget(parts)
            fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
            try:
                for top, dirs, files, dfd in os.fwalk(".", topdown=False, dir_fd=fd, follow_symlinks=False):
                    for name in files:
                        os.unlink(name, dir_fd=dfd)
                    for name in dirs:
                        # fwalk lists symlinks to directories among dirs: unlink those, rmdir the rest
                        if stat.S_ISLNK(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                            os.unlink(name, dir_fd=dfd)
                        else:
                            os.rmdir(name, dir_fd=dfd)
            finally:
                os.close(fd)
            os.rmdir(parts[-1], dir_fd=parent)
        else:
            os.unlink(parts[-1], dir_fd=parent)

    def _install(self, tmp: bytes, parts, parent) -> None:
        self._touch(parts[:-1])
        try:
            os.rename(tmp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
            return
        except OSError as exc:
            if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise
        st = self._lstat(parts, parent)
        if st is not None and stat.S_ISDIR(st.st_mode):  # a directory gives way to a file or link
            self._remove(parts, parent, st)
        os.rename(tmp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)

    @staticmethod
    def _write_data(fd: int, chunk, pos: int, sparse: bool) -> bool:
        """Write ``chunk`` at ``pos``, all-zero blocks skipped when ``sparse``; True if its end was skipped."""
        view = memoryview(chunk).cast("B")
        runs = [(0, len(view))]
        # bytes: a C-speed search rules out zero blocks without numpy's per-call cost (small files)
        if sparse and len(view) >= SPARSE_BLOCK and (not isinstance(chunk, bytes) or _ZERO_BLOCK in chunk):
            # all-zero 4 KiB blocks stay holes, as rsync --sparse keeps them
            zero = np.empty(-(-len(view) // SPARSE_BLOCK), dtype=np.uint8)
            if kernels.zero_map(view, SPARSE_BLOCK, zero):
                from smsrepl.blocks.manifest import run_arrays

                starts, counts = run_arrays(zero == 0)
                runs = [(s * SPARSE_BLOCK, min(len(view), (s + c) * SPARSE_BLOCK))
                        for s, c in zip(starts.tolist(), counts.tolist())]
        for lo, hi in runs:
            done = 0
            while done < hi - lo:
                done += os.pwrite(fd, view[lo + done:hi], pos + lo + done)
        return bool(len(view)) and (not runs or runs[-1][1] < len(view))

    def _set_meta_fd(self, fd: int, entry: Entry, *, new: bool = False) -> None:
        if self.preserve_owner:
            os.fchown(fd, entry.uid, entry.gid)
        os.fchmod(fd, entry.mode)  # after chown, which clears set-id bits
        if entry.xattrs or not new:  # a file just created has none to remove
            self._set_xattrs(fd, entry)
        os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))

    def _set_meta_path(self, name: bytes, parent: int, entry: Entry) -> None:
        """Owner, mode and times of an entry that cannot be opened for reading (special files),
        through an O_PATH descriptor: chmod by name would follow a symlink put there meanwhile."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise RemoteProtocolError(f"{os.fsdecode(entry.path)!r} is a symlink here, not a {entry.kind}")
            proc = f"/proc/self/fd/{fd}"
            if self.preserve_owner:
                os.chown(proc, entry.uid, entry.gid)
            os.chmod(proc, entry.mode)
            os.utime(proc, ns=(entry.mtime_ns, entry.mtime_ns))
        finally:
            os.close(fd)

    def _set_xattrs(self, fd: int, entry: Entry) -> None:
        want = getattr(entry, "xattrs", None)
        if want is None:
            return
        try:
            have = {os.fsencode(n) for n in os.listxattr(fd)}
        except OSError:
            have = set()
        for name, value in want.items():
            try:
                os.setxattr(fd, name, value)
            except OSError as exc:
                self.reported.append(f"{os.fsdecode(entry.path)}: xattr {name} not set ({exc.strerror})")
        for name in have - set(want):
            try:
                os.removexattr(fd, name)
            except OSError:
                pass


class FileSink:
    """A regular file being written: write() its data in order, then commit() (durable,
    metadata set, renamed onto its name) or abort() (the temporary is removed)."""

    def __init__(self, w: TreeWriter, entry: Entry, parts, parent: int, tmp: bytes, fd: int, sparse: bool,
                 digest: bool = False) -> None:
        self.w, self.entry, self.parts, self.parent, self.tmp, self.fd, self.sparse = w, entry, parts, parent, tmp, fd, sparse
        self.pos = 0
        self.holes = False
        self.digest = xxhash.xxh3_128() if digest else None

    def write(self, chunk) -> None:
        if self.pos + len(chunk) > self.entry.size:
            self.abort()
            raise RemoteProtocolError(f"{os.fsdecode(self.entry.path)!r}: more data than its {self.entry.size} bytes")
        if self.digest is not None:
            self.digest.update(chunk)
        if len(chunk):
            self.holes = self.w._write_data(self.fd, chunk, self.pos, self.sparse)
            self.pos += len(chunk)

    def commit(self, digest: bytes | None = None) -> None:
        try:
            if self.pos != self.entry.size:
                raise RemoteProtocolError(f"{os.fsdecode(self.entry.path)!r}: got {self.pos} bytes, "
                                          f"the entry says {self.entry.size}")
            if digest is not None and (self.digest is None or digest != self.digest.digest()):
                raise DecompressionError(f"{os.fsdecode(self.entry.path)!r}: data does not match its digest")
            if self.holes:
                os.ftruncate(self.fd, self.pos)  # a file ending in a hole
            self.w._set_meta_fd(self.fd, self.entry, new=True)
        except BaseException:
            self.abort()
            raise
        os.close(self.fd)
        self.fd = -1
        if self.w.fsync:
            self.w._defer(self.tmp, self.parts, self.pos)
        else:
            self.w._install(self.tmp, self.parts, self.parent)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            _unlink_quiet(self.tmp, self.parent)


def _sync_and_link(root_fd: int, runs: list[tuple], sync: bool = True) -> list[tuple]:
    """One syncfs (with ``sync``), then every run linked (kernels.link_files closes its
    descriptors); [(run, failures)]. Runs on the flush-behind thread too: no writer state."""
    try:
        if sync:
            _syncfs(root_fd)
    except BaseException:
        for run in runs:
            _drop_run(*run)
        raise
    done = []
    for i, run in enumerate(runs):
        try:
            done.append((run, kernels.link_files(*run[:4], _TEMP_TAG)))
        except BaseException:
            for later in runs[i + 1:]:
                _drop_run(*later)
            raise
    return done


def _drop_run(fds, dirs, fdirs, names, paths) -> None:
    for fd in fds + dirs:
        try:
            os.close(fd)
        except OSError:
            pass



def _unlink_quiet(name: bytes, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def remove_temporaries(root: str | bytes) -> int:
    """Remove what a killed run left (``.smsrepl~...`` names) anywhere under ``root``; returns how many."""
    removed = 0
    fd = os.open(os.fsencode(root), _DIR_FLAGS)
    try:
        for _top, dirs, files, dfd in os.fwalk(b".", dir_fd=fd, follow_symlinks=False):
            for name in files + [d for d in dirs if TEMP_RE.match(d)]:
                if TEMP_RE.match(name):
                    _unlink_quiet(name, dfd)
                    removed += 1
    finally:
        os.close(fd)
    return removed
