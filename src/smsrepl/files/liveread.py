"""Reading a file of a live source: a copy is sent only if no write went on meanwhile.

A file is read under a read lease (:func:`read_lease`) where the kernel grants one,
and checked before and after (size, mtime, ctime); one that changed is read again,
up to RETRIES times, and one nobody lets us lease that changed within SETTLE_NS is
put off to the round's end (:func:`settle_deferred`). What vanished meanwhile is
counted (the next round deals with it), never a failure of the round.
"""
from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import time

from smsrepl.errors import SourceError
from smsrepl.files.beneath import open_beneath
from smsrepl.files.digests import content_digest
from smsrepl.files.roundstats import RoundStats
from smsrepl.files.scan import Entry
from smsrepl.files.target import RoundTarget

READ = 1 << 20
#: a file that keeps changing while it is read is read again this many times
RETRIES = 3
#: what a system call says about a path that a live source removed or replaced meanwhile
VANISHED = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ESTALE, errno.ELOOP})
#: a file nobody lets us lease (open for writing elsewhere) is trusted only if its last change
#: (ctime) is this much older than the read: a write() under way moves the times when it
#: starts, not when it ends (see read_lease)
SETTLE_NS = 250_000_000


def source_digest(src: bytes, path: bytes) -> bytes | None:
    """The source file's content digest; None where it vanished (then it is not alike: the
    copy's read finds it gone and counts it)."""
    try:
        return content_digest(src, path)
    except OSError as exc:
        if exc.errno in VANISHED:
            return None
        raise


def read_lease(fd: int) -> bool:
    """Take a read lease on ``fd``: granted only while nobody has the file open for writing,
    and broken (lease_held() turns False) as soon as anybody opens it so. Held from before a
    read to after it, it proves that no write went on meanwhile, which equal sizes and times
    do not: a write() under way changed them when it started. The opener waits until ``fd``
    is closed (right after the read, or after the chunk that sees the break). The break is
    signalled with SIGURG, which is ignored by default (SIGIO would end the process)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        return True
    except OSError:
        return False  # open for writing elsewhere, not ours without CAP_LEASE, or no leases here


def lease_held(fd: int) -> bool:
    try:
        return fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
    except OSError:
        return False


def send_file(t: RoundTarget, src: bytes, e: Entry, stats: RoundStats, basis: Entry | None = None) -> bool | None:
    """Copy one file in bounded chunks; if it changed while being read, drop the copy and read it
    again. False when it was not copied: it vanished (or is no longer a regular file), or it
    never stopped changing; the target then keeps what it had under that name (never a copy
    that mixes two versions) and the next round deals with it. None when it was put off to
    the round's end (``stats.deferred``; see settle_deferred): open for writing elsewhere and
    changed within SETTLE_NS."""
    path = src + b"/" + e.path
    for attempt in range(RETRIES + 1):
        try:
            fd = open_beneath(src, e.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno in VANISHED:
                stats.gone(e.path)
                return False
            raise SourceError(f"cannot read {os.fsdecode(path)!r}: {exc.strerror}") from None
        try:
            leased = read_lease(fd)
            settle_before = time.time_ns() - SETTLE_NS
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):  # replaced by a directory, a fifo, ...
                stats.gone(e.path)
                return False
            cur = Entry.from_stat(e.path, before)
            cur.xattrs = e.xattrs
            sink = t.open_file(cur, basis)
            try:
                left = before.st_size
                while left:
                    data = os.read(fd, min(READ, left))
                    if not data:
                        break  # truncated meanwhile: the check below sees it
                    sink.write(data)
                    left -= len(data)
                    if leased and not lease_held(fd):
                        break  # opened for writing: let the writer go (closing the descriptor) and read again
                after = os.fstat(fd)
                held = lease_held(fd) if leased else None
            except BaseException:
                sink.abort()
                raise
        finally:
            os.close(fd)
        stable = not left and held is not False and (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (
            after.st_size, after.st_mtime_ns, after.st_ctime_ns)
        if stable and not leased and after.st_ctime_ns > settle_before:
            sink.abort()  # a write may still be under way: nothing tells
            if e.nlink == 1:  # one with other names waits here: they may be linked to it next
                stats.deferred.append((e, basis, after.st_ctime_ns))
                return None
            time.sleep(max(0.0, (after.st_ctime_ns + SETTLE_NS - time.time_ns()) / 1e9))
        elif stable:
            sink.commit()
            stats.files_sent += 1
            stats.bytes_sent += before.st_size
            return True
        else:
            sink.abort()
        if attempt == RETRIES:
            stats.unsettled(e.path)
            return False
        stats.reread += 1
    return False


def settle_deferred(t: RoundTarget, src: bytes, stats: RoundStats) -> None:
    """Read again the files put off because they changed within SETTLE_NS of being read: once
    the newest of those changes is SETTLE_NS old (one wait for them all), up to RETRIES times."""
    for _ in range(RETRIES):
        todo, stats.deferred = stats.deferred, []
        if not todo:
            return
        wait = (max(c for _, _, c in todo) + SETTLE_NS - time.time_ns()) / 1e9
        if wait > 0:
            time.sleep(wait)
        for e, basis, _ in todo:
            send_file(t, src, e, stats, basis)
    for e, _, _ in stats.deferred:
        stats.unsettled(e.path)
    stats.deferred = []
