"""One round of tree replication: scan the source, decide, apply to a target.

The target is either a local directory (:class:`LocalTarget`) or the far end
of a file session (files.remote.RemoteTarget): the decisions are the same.
Preserves what ``rsync -aHAXS --numeric-ids`` does: kinds, hard links,
permission bits, numeric owner and group (as root), mtimes in nanoseconds,
xattrs and ACLs, holes.
"""
from __future__ import annotations

import errno
import fcntl
import os
import queue
import signal
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from smsrepl import kernels
from smsrepl.errors import SourceError
from smsrepl.files.apply import TreeWriter, remove_temporaries
from smsrepl.files.compare import content_digest
from smsrepl.files.rules import PathRules, RoundFilter
from smsrepl.files.scan import Entry, _raise, walk

READ = 1 << 20
#: a file that keeps changing while it is read is read again this many times
RETRIES = 3
#: what a system call says about a path that a live source removed or replaced meanwhile
VANISHED = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ESTALE, errno.ELOOP})
#: paths named per round for each kind of source change (the counts cover them all)
EXAMPLES = 5
#: a file nobody lets us lease (open for writing elsewhere) is trusted only if its last change
#: (ctime) is this much older than the read: a write() under way moves the times when it
#: starts, not when it ends (see read_lease)
SETTLE_NS = 250_000_000


@dataclass
class RoundStats:
    entries: int = 0
    files_sent: int = 0
    bytes_sent: int = 0
    unchanged: int = 0
    deleted: int = 0
    temporaries_removed: int = 0
    reread: int = 0
    #: listed, then gone (or replaced by another kind) before it was read: the next round sees it
    vanished: int = 0
    #: kept changing through every read: not sent (the target keeps its copy); the next round sends it
    changed_during_read: int = 0
    #: files with other names (hard links) sent or linked: a journal round may not see the others
    hard_links_changed: int = 0
    #: (entry, basis, ctime) of files changed too recently to trust, read again at the round's end
    deferred: list = field(default_factory=list)
    reported: list[str] = field(default_factory=list)
    #: (config key, rule) of the round's path rules that matched nothing in the source (rules.
    #: RoundFilter.unmatched); rounds that walk a part of the tree (a journal's) leave it empty
    unmatched_rules: list[tuple[str, str]] = field(default_factory=list)

    @property
    def source_moved(self) -> bool:
        """The round completed, but the source changed under it: the target matches the source
        as read, not as it is now (the next round catches up)."""
        return bool(self.vanished or self.changed_during_read)

    def gone(self, path: bytes) -> None:
        self.vanished += 1
        if self.vanished <= EXAMPLES:
            self.reported.append(f"{os.fsdecode(path)}: vanished before it was read; the next round deals with it")

    def unsettled(self, path: bytes) -> None:
        self.changed_during_read += 1
        if self.changed_during_read <= EXAMPLES:
            self.reported.append(f"{os.fsdecode(path)}: kept changing while being read; not sent this round "
                                 f"(the target keeps its copy)")


class SourceWalkErrors:
    """``on_error`` for the walk of a live source: entries and directories that vanished between
    being listed and being read are counted (a busy tree never fails a round); any other error
    (permission, I/O) stops the round, naming the full path."""

    def __init__(self, top: bytes) -> None:
        self.top = top
        self.vanished: list[bytes] = []

    def __call__(self, rel: bytes, exc: OSError) -> None:
        if exc.errno in VANISHED:
            self.vanished.append(rel)
            return
        _raise(self.top + b"/" + rel if rel else self.top, exc)

    def into(self, stats: RoundStats) -> None:
        for rel in self.vanished:
            stats.gone(rel)
        self.vanished = []


class LocalTarget:
    """A directory on this machine, written through a TreeWriter."""

    def __init__(self, root: str) -> None:
        os.makedirs(root, exist_ok=True)
        self.root = os.fsencode(root)
        self.temporaries_removed = remove_temporaries(root)
        self.w = TreeWriter(root)
        self.reported = self.w.reported

    def existing(self, path: bytes) -> Entry | None:
        st = self.w.existing(path)
        if st is None:
            return None
        e = Entry.from_stat(path, st)
        if e.kind == "symlink":
            e.link = self.w.readlink(path)
        return e

    def content_digest(self, path: bytes) -> bytes:
        return content_digest(self.root + b"/" + path)

    def open_file(self, entry: Entry, basis: Entry | None = None):
        return self.w.open_file(entry)  # a local copy gains nothing from a delta

    def paths(self, filt: RoundFilter | None):
        return (e.path for e in walk(self.root, filt, on_error=lambda p, exc: None))

    def __getattr__(self, name):  # mkdir, open_file, symlink, hardlink, special, set_meta, delete, finish, ...
        return getattr(self.w, name)

    def close(self) -> None:
        self.w.close()


def sync_tree(source: str, target, *, rules: PathRules | None = None, kind: str = "full",
              checksum: bool = False, delete: bool | None = None,
              on_done: Callable[[int], None] | None = None, entries=None,
              walk_errors: SourceWalkErrors | None = None) -> RoundStats:
    """Make ``target`` (a directory path or a target object) equal ``source``, as
    filtered by ``rules`` for a round of ``kind``.

    Unchanged files (same size and mtime, or same content with ``checksum``)
    are not rewritten; their metadata is corrected. ``delete`` (default: in
    every round: whatever rounds failed before, a completed one leaves the
    target without what the source lacks) removes target entries the source no
    longer has, never under an excluded path. ``on_done(file_bytes)`` is called
    as source entries were dealt with (progress). ``entries``: the source as
    walk_round() yields it, or as scan_round() does for a target that takes a
    directory at a time, when the caller started that walk early (see
    Prefetch); ``walk_errors``: the SourceWalkErrors that walk reports to. The rules
    are anchored to ``source`` (PathRules.anchored). A round that walks the source itself
    lists the rules that matched nothing in ``unmatched_rules``; with ``entries``, that
    is for the caller to do (it has the walk's filter).
    """
    own = isinstance(target, (str, bytes, os.PathLike))
    t = LocalTarget(os.fsdecode(target)) if own else target
    delete = True if delete is None else delete
    src = os.fsencode(source)
    rules = rules.anchored(src) if rules is not None else None
    walk_filter = None
    if entries is None:
        walk_errors = SourceWalkErrors(src)
        walk_filter = rules.for_round(kind) if rules else None
    try:
        if hasattr(t, "dir_records") and by_dirs(checksum):
            from smsrepl.files.dirround import round_by_dirs

            stats = round_by_dirs(src, t, entries if entries is not None else
                                  scan_round(src, rules, kind, walk_errors, filt=walk_filter),
                                  rules.for_round(kind) if rules else None, delete, on_done)
        else:
            stats = _round(src, t, rules, kind, checksum, delete, on_done,
                           entries if entries is not None else walk_round(src, rules, kind, walk_errors, walk_filter))
        if walk_errors is not None:
            walk_errors.into(stats)
        if walk_filter is not None:
            stats.unmatched_rules = walk_filter.unmatched()
        return stats
    finally:
        if own:
            t.close()


def by_dirs(checksum: bool) -> bool:
    """Rounds to a target that takes a directory at a time go that way (files.dirround): with
    the native kernels, and without content checksums (which need a digest per file)."""
    return kernels.TREE and not checksum


def round_filter(source: str | bytes, rules: PathRules | None, kind: str) -> RoundFilter | None:
    """The filter of a round of ``kind`` over ``source``: the rules anchored to it."""
    return rules.anchored(source).for_round(kind) if rules else None


def walk_round(source: str | bytes, rules: PathRules | None, kind: str, on_error=_raise,
               filt: RoundFilter | None = None):
    """The source entries one round of ``kind`` deals with, in order; ``filt``: the round's
    filter (round_filter()'s), when the caller wants to know which rules matched."""
    if filt is None:
        filt = round_filter(source, rules, kind)
    return walk(os.fsencode(source), filt, xattrs=True, implied=True, on_error=on_error)


def scan_round(source: str | bytes, rules: PathRules | None, kind: str, on_error=_raise, start=None,
               filt: RoundFilter | None = None):
    """walk_round() a directory at a time (files.dirscan); ``start``: only those directories."""
    from smsrepl.files.dirscan import scan_dirs

    if filt is None:
        filt = round_filter(source, rules, kind)
    return scan_dirs(os.fsencode(source), filt, xattrs=True, on_error=on_error, start=start)


class Prefetch:
    """Runs an iterator on a thread of its own, up to ``limit`` items ahead of the consumer:
    the source tree is walked while the receiver is still describing its own. Items cross
    in batches of ``batch``: one queue hand-off (two futex calls) per item cost more than the
    lstat of a small file."""

    _END = object()

    def __init__(self, it, limit: int = 65536, batch: int = 256) -> None:
        self.batch = batch
        self.errors: SourceWalkErrors | None = None  # where the walk reports what vanished
        self.filter: RoundFilter | None = None  # the walk's (which rules matched: RoundFilter.unmatched)
        self._q: queue.Queue = queue.Queue(maxsize=max(1, limit // batch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(it,), name="walk-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it) -> None:
        batch: list = []
        try:
            for item in it:
                batch.append(item)
                if len(batch) >= self.batch:
                    if not self._put(batch):
                        return
                    batch = []
            if (not batch or self._put(batch)):
                self._put(self._END)
        except BaseException as exc:  # handed to the consumer (after what came before), raised there
            if not batch or self._put(batch):
                self._put(exc)

    def __iter__(self):
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _round(src: bytes, t, rules, kind, checksum, delete, on_done, entries) -> RoundStats:
    stats = RoundStats(temporaries_removed=getattr(t, "temporaries_removed", 0))
    filt = rules.for_round(kind) if rules else None
    seen: set[bytes] = set()
    links: dict[tuple[int, int], bytes] = {}
    for e in entries:
        stats.entries += 1
        seen.add(e.path)
        _entry(src, t, e, filt, checksum, links, stats)
        if on_done is not None:
            on_done(e.size if e.kind == "file" else 0)
    settle_deferred(t, src, stats)
    if delete:
        delete_gone(t, [path for path in t.paths(filt) if path and path not in seen], stats)
    t.finish()
    stats.reported += t.reported
    return stats


def delete_gone(t, gone: list[bytes], stats: RoundStats) -> None:
    """Remove the target entries the source lost (sorted paths), deepest first: a directory
    goes once empty, so what an exclude rule hides inside it keeps it (as rsync does). A target
    with a ``deletion_limit(count)`` (files.deletions) may refuse them all first."""
    limit = getattr(t, "deletion_limit", None)
    if limit is not None and gone:
        limit(len(gone))
    for path in reversed(gone):
        t.delete(path)
    stats.deleted = len(gone)


def _entry(src: bytes, t, e: Entry, filt, checksum: bool, links: dict, stats: RoundStats) -> None:
    """Bring one source entry to the target."""
    if not e.path:
        t.set_root_meta(e)
        return
    have = t.existing(e.path)
    if e.implied:  # only on the way to an ONLY_SYNC path: make it exist, leave it alone otherwise
        if have is None or have.kind != "dir":
            t.mkdir(e)
        return
    if (have is not None and have.kind == "dir" and e.kind != "dir" and filt is not None
            and any(p.may_be_below(e.parts) or p.covers(e.parts) for p in filt.exclude)):
        stats.reported.append(f"{os.fsdecode(e.path)}: a directory here that may hold excluded entries; "
                              f"not replaced by the source's {e.kind}")
        return
    if e.kind == "dir":
        t.mkdir(e)
    elif e.kind == "file":
        key = (e.dev, e.ino)
        if e.nlink > 1 and key in links:
            t.hardlink(e, links[key])
            stats.hard_links_changed += 1
            return
        if e.nlink > 1:
            links[key] = e.path
        if (have is not None and have.kind == "file" and have.size == e.size
                and not (have.nlink > 1 and e.nlink == 1)  # a hard link there that is not one here
                and (t.content_digest(e.path) == _source_digest(src, e.path) if checksum
                     else have.mtime_ns == e.mtime_ns)):
            stats.unchanged += 1
            t.set_meta(e)
            return
        if e.nlink > 1:
            stats.hard_links_changed += 1
        if _send_file(t, src, e, stats, have) is False and e.nlink > 1:
            del links[key]  # not there: its other names get their own copy
    elif e.kind == "symlink":
        if have is not None and have.kind == "symlink" and have.link == e.link:
            t.set_meta(e)
        else:
            t.symlink(e)
    else:
        t.special(e)


def _source_digest(src: bytes, path: bytes) -> bytes | None:
    """The source file's content digest; None where it vanished (then it is not alike: the
    copy's read finds it gone and counts it)."""
    try:
        return content_digest(src + b"/" + path)
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


def _send_file(t, src: bytes, e: Entry, stats: RoundStats, basis: Entry | None = None) -> bool | None:
    """Copy one file in bounded chunks; if it changed while being read, drop the copy and read it
    again. False when it was not copied: it vanished (or is no longer a regular file), or it
    never stopped changing; the target then keeps what it had under that name (never a copy
    that mixes two versions) and the next round deals with it. None when it was put off to
    the round's end (``stats.deferred``; see settle_deferred): open for writing elsewhere and
    changed within SETTLE_NS."""
    path = src + b"/" + e.path
    for attempt in range(RETRIES + 1):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
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


def settle_deferred(t, src: bytes, stats: RoundStats) -> None:
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
            _send_file(t, src, e, stats, basis)
    for e, _, _ in stats.deferred:
        stats.unsettled(e.path)
    stats.deferred = []
