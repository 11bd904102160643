"""Durability: files under temporary names made durable together, then named.

A file's data goes to a temporary name in its directory (files.names), gets its
owner, mode, xattrs and times, is made durable, and only then is renamed onto its
final name: a half-written file never appears under that name. Durability is
batched: up to PENDING_FILES files (or PENDING_BYTES) wait under their temporary
names, one syncfs() makes them all durable, then they are renamed (one fsync per
small file made a tree of 10,000 files take 4x as long; 16 threads fsyncing
together still cost 0.07 ms per file against syncfs's 0.014 ms here). syncfs also
waits for whatever else is dirty on that file system: a target file system shared
with busy writers makes rounds slower, not less safe.

A directory new in a round is made under a temporary name (:meth:`PendingFiles.stage_dir`):
nothing in it can be seen, so runs of small files are created in it under their own names,
with no anonymous file to link (an O_TMPFILE file costs an orphan-list entry and a link:
0.3 of 1.5 system CPU seconds for 50,000 small files here). Such directories are closed
(no file is created in them by name any more) after STAGE_FILES or STAGE_BYTES, or at the
end of the round, and renamed after the next syncfs: then every file named in them is
durable.

Runs of small files written natively (kernels.write_files) wait as anonymous files,
linked under their names after the next syncfs (kernels.link_files), behind the writer
while the next runs are written: one thread makes batches durable, another links those
made durable, in order, so a batch's syncfs runs while the one before is linked (see
:meth:`PendingFiles._flush_behind`); their descriptors come from the process's budget
(files.fdbudget). At the end of a round the directories changed are made durable too
(:meth:`PendingFiles._sync_dirs`).
"""
from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from smsrepl import kernels
from smsrepl.errors import ReplicationError, TargetWriteError
from smsrepl.files.fdbudget import DescriptorBudget
from smsrepl.files.names import TEMP_TAG, check_path, remove_temporary, temp_name
from smsrepl.files.targetroot import Parts, TargetRoot

#: files written under temporary names before one syncfs() and their renames
PENDING_FILES = 4096
PENDING_BYTES = 256 << 20
#: how long a writer waits for descriptors other sessions hold before it writes one file at a
#: time the careful way (one descriptor, briefly)
FD_WAIT = 5.0
#: directories made durable one fsync each at the end of a round; more take one syncfs
FSYNC_DIRS = 16
#: files created under their own names (and bytes written, large files' too) while directories
#: are under temporary names, before all those directories are closed and named: what a killed
#: round can lose, and the next re-sends, when it removes them as temporaries
STAGE_FILES = 65536
STAGE_BYTES = 1 << 30
#: threads writing a run of small files (kernels.write_files): file creation is mostly
#: kernel time, and an anonymous file is made without the directory's lock
WRITE_THREADS = max(1, min(4, os.cpu_count() or 1))

#: a run of kernels.write_files: (file descriptors, directory descriptors, each file's directory
#: index, names, paths)
Run = tuple[list[int], list[int], list[int], list[bytes], list[bytes]]
#: a run after kernels.link_files, with what it could not link: (index, errno, temporary name or None)
Linked = tuple[Run, list[tuple[int, int, bytes | None]]]


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


def _syncfs_all(file_systems: list[int]) -> None:
    """syncfs of each file system the target's files lie on (TargetRoot.file_systems)."""
    for fd in file_systems:
        _syncfs(fd)


class PendingFiles(TargetRoot):
    """The files a writer wrote and has not named yet, and how they become durable."""

    def __init__(self, root: str | bytes, *, preserve_owner: bool, fsync: bool, cache: int = 64) -> None:
        super().__init__(root, cache=cache)
        self.preserve_owner = preserve_owner
        self.fsync = fsync
        #: written files waiting for one syncfs and their renames: (temporary name, parts)
        self._pending: list[tuple[bytes, Parts]] = []
        self._pending_paths: set[bytes] = set()
        self._pending_bytes = 0
        #: runs of anonymous files written by kernels.write_files, named after the next syncfs
        self._runs: list[Run] = []
        self._run_files = 0
        #: the threads behind the writer: one makes batches durable, one links them
        self._syncer: ThreadPoolExecutor | None = None
        self._linker: ThreadPoolExecutor | None = None
        #: the batches handed to them, oldest first: each future ends once it is linked; with
        #: each, the directories to name once it is
        self._flushing: deque[tuple[Future, list[Parts]]] = deque()
        #: set once a syncfs behind failed: no later batch is linked (its syncfs may have
        #: been told nothing of an error the failed one was told of)
        self._sync_failed = threading.Event()
        self._native = self._budget is not None and self._budget.total >= 256
        if self._budget is not None:
            self._budget.join()
        self._held = 0  # descriptors of this writer's runs, taken from the budget
        #: directories under temporary names (TargetRoot._staged) still taking files by name
        self._stage_open: set[Parts] = set()
        #: those closed, to be named after the next syncfs
        self._stage_closed: list[Parts] = []
        self._stage_files = self._stage_bytes = 0
        #: how many directories under temporary names each path prefix leads to
        self._stage_prefixes: dict[Parts, int] = {}

    def close(self) -> None:
        try:
            if self._linker is not None:
                while self._flushing:
                    try:
                        self._reap()
                    except (OSError, ReplicationError) as exc:  # closing after a failure: say it, keep closing
                        self.reported.append(f"files of the last batch not kept: {exc}")
                for pool in (self._syncer, self._linker):
                    if pool is not None:
                        pool.shutdown(wait=True)
                self._syncer = self._linker = None
            runs, self._runs, self._run_files = self._runs, [], 0
            for run in runs:  # files never made durable are dropped: they have no name
                _drop_run(*run)
            self._close_dirs()
        finally:
            # whatever failed above, the process's descriptor budget gets this writer's share back:
            # a share kept by a writer that is gone starves every later session of the process
            if self.root_fd >= 0:
                self.root_fd, fd = -1, self.root_fd
                if self._budget is not None:
                    self._budget.leave(self._held)
                    self._held = 0
                os.close(fd)

    def _defer(self, tmp: bytes, parts: Parts, size: int) -> None:
        self._pending.append((tmp, parts))
        self._pending_paths.add(b"/".join(parts))
        self._pending_bytes += size
        self._count_staged(1, size)
        if len(self._pending) + self._run_files >= PENDING_FILES or self._pending_bytes >= PENDING_BYTES:
            self.flush_pending()

    def flush_pending(self) -> None:
        """Make the waiting files durable, then give them their names. Once a syncfs failed,
        none: a later one is not told of the error the failed one was (once per error), so
        its success proves nothing of the files written before it; they stay temporaries."""
        self._reap()
        if not self._pending and not self._runs and not self._stage_closed:
            return
        if self._sync_failed.is_set():
            self._drop_unnamed()
            raise TargetWriteError("a syncfs of the target failed earlier: the files received since are not kept")
        runs, closed, self._stage_closed = self._take_runs(), self._stage_closed, []
        self._settle_all(_sync_and_link(self.file_systems(), runs, failed=self._sync_failed))
        self._name_staged(closed)
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        self._pending_paths.clear()
        for tmp, parts in pending:
            self._install(tmp, parts, self.dir_fd(parts[:-1]))

    def _drop_unnamed(self) -> None:
        """Forget the files waiting for their names (they stay temporaries, removed by the next
        round's listing; a run's descriptors are closed)."""
        runs, self._runs, self._run_files = self._runs, [], 0
        for run in runs:
            _drop_run(*run)
        self._pending, self._pending_bytes = [], 0
        self._pending_paths.clear()

    # --- runs of small files, natively (kernels.write_files) ---------------------
    def write_run(self, body: bytes | memoryview, pos: int) -> tuple[int, int, int]:
        """Write the run of plain FILE operations of a FILE_OPS ``body`` that starts at ``pos``
        (see kernels.write_files); they get their names with the next flush_pending().
        Returns (where the first operation not taken starts, files, bytes): ``pos`` itself
        where this writer cannot, or the operation there is one for the careful path."""
        budget = self._budget
        if not self._native or budget is None:
            return pos, 0, 0
        room = self._descriptors(budget, PENDING_FILES - self._run_files - len(self._pending))
        if not room:
            return pos, 0, 0  # none to be had now: this file goes the careful way
        try:
            end, files, nbytes, fds, dirs, fdirs, names, paths = kernels.write_files(
                body, pos, self._run_dir, self.preserve_owner, room, WRITE_THREADS)
        except OSError as exc:
            budget.give_back(room)
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
            budget.give_back(room)
            raise
        used = _held_by(fds, dirs)
        if used > room:
            budget.force(used - room)  # the runs' directories
        else:
            budget.give_back(room - used)
        self._held += used
        self._count_staged(fds.count(-1), nbytes)
        if files:
            self._runs.append((fds, dirs, fdirs, names, paths))
            self._run_files += files
            self._pending_bytes += nbytes
            self._pending_paths.update(paths)
            if not self.fsync:
                self._settle_all(_sync_and_link([], self._take_runs(), sync=False))
            elif self._run_files + len(self._pending) >= PENDING_FILES or self._pending_bytes >= PENDING_BYTES \
                    or self._held >= budget.share():
                self._flush_behind()
        return end, files, nbytes

    def _descriptors(self, budget: DescriptorBudget, want: int) -> int:
        """Descriptors for up to ``want`` more run files from the budget: this writer's own
        waiting files made durable first when none are left, then a wait for other sessions';
        0 when none came within FD_WAIT."""
        if want <= 0:
            self.flush_pending()
            want = PENDING_FILES
        got = budget.take(want, self._held)
        if got:
            return got
        self.flush_pending()  # gives this writer's back
        deadline = time.monotonic() + FD_WAIT
        while not (got := budget.take(want, self._held)) and time.monotonic() < deadline:
            budget.wait(0.2)
        return got

    def _release(self, n: int) -> None:
        if self._budget is not None and n:
            self._held -= n
            self._budget.give_back(n)

    def _flush_behind(self) -> None:
        """flush_pending() for the runs waiting, done behind the writer while the next runs
        are written: their syncfs on one thread, then their linking on another, so that the
        next batch's syncfs (a wait for the disk) runs while this one is linked (CPU). At
        most two batches are behind: this one, and the one before, still being linked."""
        self._reap(keep=1)
        if self._pending:  # named temporaries are renamed here: the careful, synchronous way
            self.flush_pending()
            return
        runs, self._pending_bytes = self._take_runs(), 0
        closed, self._stage_closed = self._stage_closed, []
        if self._syncer is None or self._linker is None:
            self._syncer = ThreadPoolExecutor(1, thread_name_prefix="flush-sync")
            self._linker = ThreadPoolExecutor(1, thread_name_prefix="flush-link")
        synced = self._syncer.submit(_sync_behind, self.file_systems(), self._sync_failed)
        self._flushing.append((self._linker.submit(_link_after, synced, runs, self._sync_failed), closed))

    def _reap(self, keep: int = 0) -> None:
        """Wait until at most ``keep`` batches are behind, settle what they could not link, and
        name the directories closed before their syncfs."""
        while len(self._flushing) > keep:
            linked, closed = self._flushing.popleft()
            self._settle_all(linked.result())
            self._name_staged(closed)

    # --- new directories under temporary names -------------------------------------
    def stage_dir(self, parts: Parts, parent: int) -> bool:
        """Make new directory ``parts`` under a temporary name in ``parent`` (its descriptor),
        where runs of small files are then created under their own names; False (nothing
        made) where files are not made durable before they are named, or not natively."""
        if not (self.fsync and self._native):
            return False
        tmp = temp_name(parts[-1])
        os.mkdir(tmp, 0o700, dir_fd=parent)
        self._staged[parts] = tmp
        self._stage_open.add(parts)
        for i in range(1, len(parts) + 1):
            self._stage_prefixes[parts[:i]] = self._stage_prefixes.get(parts[:i], 0) + 1
        return True

    def close_stages(self) -> None:
        """No more files by name in the directories under temporary names: they are named
        after the next syncfs."""
        self._stage_closed += self._stage_open
        self._stage_open.clear()
        self._stage_files = self._stage_bytes = 0

    def _count_staged(self, files: int, nbytes: int) -> None:
        """``files`` more files (``nbytes`` more bytes, written any way) while directories are
        under temporary names: past STAGE_FILES or STAGE_BYTES they are closed."""
        if self._stage_open:
            self._stage_files += files
            self._stage_bytes += nbytes
            if self._stage_files >= STAGE_FILES or self._stage_bytes >= STAGE_BYTES:
                self.close_stages()

    def settle_staged(self, parts: Parts) -> None:
        """Entry ``parts`` is about to be looked up, changed or removed under its final name:
        where it is (or holds) a directory still under a temporary name, all of those are
        closed and named first."""
        if parts in self._stage_prefixes:
            self.close_stages()
            self.flush_pending()

    def _name_staged(self, closed: list[Parts]) -> None:
        """Rename directories ``closed`` (what was created in them by name is durable) onto
        their final names, the deepest first."""
        for parts in sorted(closed, key=len, reverse=True):
            tmp = self._staged.get(parts)
            if tmp is None:
                continue
            parent = self.dir_fd(parts[:-1])
            try:
                os.rename(tmp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
            except NotADirectoryError:
                # a later entry of the round took the name (the source's file replaced the
                # directory): it wins, as a rename onto the directory would have
                self._forget(parts)
                remove_temporary(tmp, parent)
            except OSError as exc:
                raise TargetWriteError(f"naming new directory {self._show(parts)!r}: {exc.strerror}") from None
            del self._staged[parts]
            for i in range(1, len(parts) + 1):
                left = self._stage_prefixes.pop(parts[:i]) - 1
                if left:
                    self._stage_prefixes[parts[:i]] = left

    def _run_dir(self, parent: bytes) -> int | tuple[int, bool]:
        """kernels.write_files' directory descriptor of ``parent``; (descriptor, True) where its
        files are created under their own names."""
        parts = check_path(parent) if parent else ()
        fd = self.dir_fd(parts)
        return (fd, True) if parts in self._stage_open else fd

    def _take_runs(self) -> list[Run]:
        """The runs waiting, their directories' times noted first (linking changes them)."""
        runs, self._runs, self._run_files = self._runs, [], 0
        for run in runs:
            for parent in {p.rpartition(b"/")[0] for p in run[4]}:
                self._touch(tuple(parent.split(b"/")) if parent else ())
        return runs

    def _settle_all(self, linked: list[Linked]) -> None:
        """After _sync_and_link: the paths are named; what could not be linked is dealt with."""
        for run, failures in linked:
            paths = run[4]
            self._pending_paths.difference_update(paths)
            self._release(_held_by(run[0], run[1]))  # linked: their descriptors are closed
            for i, err, tmp in failures:
                parts = check_path(paths[i])
                if tmp is None:
                    raise TargetWriteError(f"writing {os.fsdecode(paths[i])!r} (FILE): {os.strerror(err)}")
                self._install(tmp, parts, self.dir_fd(parts[:-1]))  # a directory held the name


    def _sync_dirs(self) -> None:
        """Make every rename, link and removal durable: fsync of the directories they changed
        (one syncfs for more than FSYNC_DIRS)."""
        if self.fsync and len(self._touched) > FSYNC_DIRS:
            _syncfs_all(self.file_systems())  # one flush for them all
        elif self.fsync:
            for parts in sorted(self._touched, key=len, reverse=True):
                try:
                    os.fsync(self.dir_fd(parts))
                except TargetWriteError:
                    pass  # removed later in the round
        self._touched.clear()


def _sync_and_link(file_systems: list[int], runs: list[Run], sync: bool = True,
                   failed: threading.Event | None = None) -> list[Linked]:
    """A syncfs of each of ``file_systems`` (with ``sync``), then every run linked
    (kernels.link_files closes its descriptors); [(run, failures)]. Runs on the flush-behind
    thread too: no writer state. A failed syncfs sets ``failed``."""
    try:
        if sync:
            _syncfs_all(file_systems)
    except BaseException:
        if failed is not None:
            failed.set()
        for run in runs:
            _drop_run(*run)
        raise
    done: list[Linked] = []
    for i, run in enumerate(runs):
        try:
            done.append((run, kernels.link_files(*run[:4], TEMP_TAG)))
        except BaseException:
            for later in runs[i + 1:]:
                _drop_run(*later)
            raise
    return done


def _sync_behind(file_systems: list[int], failed: threading.Event) -> None:
    """The syncfs calls of a batch behind the writer; ``failed`` is set if one fails."""
    try:
        _syncfs_all(file_systems)
    except BaseException:
        failed.set()
        raise


def _link_after(synced: Future, runs: list[Run], failed: threading.Event) -> list[Linked]:
    """_sync_and_link() for a batch whose syncfs is ``synced``: its runs are linked once it
    succeeded, and only if no syncfs behind failed before it; else dropped."""
    try:
        synced.result()
        if failed.is_set():
            raise TargetWriteError("syncfs failed for an earlier batch")
    except BaseException:
        for run in runs:
            _drop_run(*run)
        raise
    return _sync_and_link([], runs, sync=False)


def _held_by(fds: list[int], dirs: list[int]) -> int:
    """The descriptors a run holds: its directories' and its anonymous files' (a file created
    under its name was closed at once: fd -1)."""
    return len(dirs) + len(fds) - fds.count(-1)


def _drop_run(fds: list[int], dirs: list[int], fdirs: list[int], names: list[bytes],
              paths: list[bytes]) -> None:
    for fd in fds + dirs:
        try:
            os.close(fd)
        except OSError:
            pass
