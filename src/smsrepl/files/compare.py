"""Compare a source tree with its copy, in the 5.4.13 consistency-result shape.

One engine for every file check: against a tree on this host (``compare_trees``) and
against a receiver's target (``compare_with_listing``: the receiver lists its tree with
content digests; no file data travels). It works in three steps:

1. both sides are listed at once (a thread each; with the native kernels a directory per
   call, files.dirscan), under the same rules as the transfer that made the copy
   (``check_filter``: what migration and sync rounds leave out stays out of the check);
2. entries on both sides whose kind and size agree are the only ones whose content is
   read: a directory's files per call of ``kernels.hash_files`` (XXH3-128, one reused
   buffer, the GIL let go), both sides at once, large files in steps that report progress;
3. each checked directory (CONSISTENCY_DIR, ``dirs``) gets its counts.

What "different" means is the ``compare`` mode: ``data`` (default: kind, size and content
of files, a symlink's target, a device's numbers: what ``rclone check`` compares),
``metadata`` (no data read: kind, size, mtime, permission bits, owner and group, as rsync's
quick check plus the permissions a copy keeps) or ``all`` (both). ``num_total_files``
counts the source's non-directory entries; ``num_target_miss_files`` those only on the
source, ``num_target_more_files`` those only on the target. Directories are walked but not
counted, as ``rclone check`` does. An entry that cannot be read on either side is counted
as different and listed with ``!``.
"""
from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import xxhash

from .. import kernels
from .rules import Pattern, PathRules, RoundFilter
from .scan import walk

READ = 1 << 20
#: files at least this large are read in steps of READ_STEP (progress between steps)
LARGE = 64 << 20
READ_STEP = 8 << 20
#: bytes per call of kernels.hash_files (how often a directory of many files reports progress)
HASH_BUDGET = 32 << 20
MODES = ("data", "metadata", "all")

_HEAD = struct.Struct(">BIIIQqQIHHIB")  # files.wire's entry record header
FILE, DIR, SYMLINK = 1, 2, 3
_KIND = {"file": 1, "dir": 2, "symlink": 3, "chardev": 4, "blockdev": 5, "fifo": 6, "socket": 7}

_tls = threading.local()


def content_digest(path: bytes) -> bytes:
    """XXH3-128 of a file's data, read into a buffer reused by the thread."""
    buf = getattr(_tls, "buf", None)
    if buf is None:
        buf = _tls.buf = bytearray(READ)
    view = memoryview(buf)
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.digest()


def check_filter(rules: PathRules | None) -> RoundFilter | None:
    """What a check of a copy made under ``rules`` covers: what every round copied, i.e. not
    what migration or sync rounds exclude, and with ONLY_SYNC only those paths (the rest was
    copied once and may since have changed on the source, by design)."""
    if rules is None:
        return None
    filt = rules.for_round("sync")
    return filt if filt.exclude or filt.only else None


# --- one side's listing -------------------------------------------------------------
@dataclass
class Side:
    """A tree as the check sees it: path -> (kind, mode, uid, gid, size, mtime_ns, rdev, link)
    of each non-directory entry, files grouped by directory for reading, digests once read."""

    meta: dict[bytes, tuple] = field(default_factory=dict)
    files_in: dict[bytes, list[bytes]] = field(default_factory=dict)  # dir -> file names
    digests: dict[bytes, bytes] = field(default_factory=dict)
    errors: dict[bytes, str] = field(default_factory=dict)  # path -> why it could not be read

    def add_records(self, records: bytes, rel: bytes | None = None) -> None:
        """Entries from wire records (a DirBatch's, or a receiver's listing with digests)."""
        pos, end = 0, len(records)
        meta, digests = self.meta, self.digests
        while pos < end:
            kind, mode, uid, gid, size, mtime, rdev, _, plen, llen, xlen, has = _HEAD.unpack_from(records, pos)
            p = pos + 50
            path = records[p:p + plen]
            link = records[p + plen:p + plen + llen] if llen else None
            pos = p + plen + llen + xlen + (16 if has else 0)
            if kind == DIR or not path:
                continue
            meta[path] = (kind, mode, uid, gid, size, mtime, rdev, link)
            if has:
                digests[path] = records[pos - 16:pos]
            if kind == FILE:
                parent, _, name = path.rpartition(b"/")
                self.files_in.setdefault(parent, []).append(name)


def list_local(root: bytes, filt: RoundFilter | None) -> Side:
    side = Side()

    def failed(path: bytes, exc: OSError) -> None:
        side.errors[path] = exc.strerror or str(exc)

    if kernels.TREE:
        from .dirscan import scan_dirs

        for batch in scan_dirs(root, filt, on_error=failed, xattrs=False, threads=1):  # a thread a side
            side.add_records(batch.records)  # directories (ONLY_SYNC's ancestors among them) not kept
        return side
    for e in walk(root, filt, on_error=failed):
        if e.kind == "dir" or not e.path:
            continue
        kind = _KIND.get(e.kind, 0)
        side.meta[e.path] = (kind, e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.rdev, e.link)
        if kind == FILE:
            parent, _, name = e.path.rpartition(b"/")
            side.files_in.setdefault(parent, []).append(name)
    return side


def list_remote(listing) -> Side:
    """A receiver's listing (files.remote.Listing, with digests) as a Side."""
    side = Side()
    listing.wait(whole=True)
    for rel, parts in listing.groups.items():
        for body in parts:
            side.add_records(body)
    return side


# --- reading content ------------------------------------------------------------------
class Meter:
    """Bytes read so far, for progress (added to from several threads)."""

    def __init__(self, total: int, on_progress: Callable[[int, int], None] | None) -> None:
        self.total, self.done = total, 0
        self._lock = threading.Lock()
        self._report = on_progress

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
        if self._report is not None:
            self._report(self.done, self.total)


def hash_side(root: bytes, side: Side, want: dict[bytes, list[bytes]], meter: Meter) -> None:
    """Digests of the files ``want`` names (dir -> names) into ``side.digests``; the ones
    that cannot be read go to ``side.errors``."""
    for rel, names in want.items():
        base = root + b"/" + rel if rel else root
        try:
            dfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            for n in names:
                side.errors[rel + b"/" + n if rel else n] = exc.strerror or str(exc)
            continue
        try:
            small = [n for n in names if side.meta[rel + b"/" + n if rel else n][4] < LARGE]
            for n in names:
                if side.meta[rel + b"/" + n if rel else n][4] >= LARGE:
                    _hash_large(dfd, rel, n, side, meter)
            out = bytearray(16 * len(small))
            start = 0
            while start < len(small):
                chunk = small[start:]
                done, nbytes, errs = kernels.hash_files(dfd, chunk, memoryview(out)[16 * start:], HASH_BUDGET)
                bad = {i for i, _ in errs}
                for i, err in errs:
                    path = rel + b"/" + chunk[i] if rel else chunk[i]
                    side.errors[path] = "not a regular file now" if err in (errno.EINVAL, errno.EISDIR) \
                        else os.strerror(err)
                for i in range(done):
                    if i not in bad:
                        path = rel + b"/" + chunk[i] if rel else chunk[i]
                        side.digests[path] = bytes(out[16 * (start + i):16 * (start + i + 1)])
                meter.add(nbytes)
                start += done
        finally:
            os.close(dfd)


def _hash_large(dfd: int, rel: bytes, name: bytes, side: Side, meter: Meter) -> None:
    path = rel + b"/" + name if rel else name
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
    except OSError as exc:
        side.errors[path] = exc.strerror or str(exc)
        return
    buf = bytearray(READ_STEP)
    view = memoryview(buf)
    h = xxhash.xxh3_128()
    try:
        while n := os.readv(fd, [buf]):
            h.update(view[:n])
            meter.add(n)
        side.digests[path] = h.digest()
    except OSError as exc:
        side.errors[path] = exc.strerror or str(exc)
    finally:
        os.close(fd)


def records_with_digests(top: bytes, rel: bytes, records: bytes, names: list[bytes], kinds: bytes,
                         ends: list[int]) -> bytes:
    """A directory's wire records (a DirBatch's) with the XXH3-128 of each regular file's
    content: what a receiver lists for a check. A file that cannot be read goes without one
    (a check counts it as different)."""
    files = [i for i, k in enumerate(kinds) if k == FILE]
    if not files:
        return records
    digests: dict[int, bytes] = {}
    try:
        dfd = os.open(top + b"/" + rel if rel else top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        dfd = -1
    if dfd >= 0:
        try:
            want = [names[i] for i in files]
            out = bytearray(16 * len(want))
            done, _, errs = kernels.hash_files(dfd, want, out, 1 << 62)
            bad = {i for i, _ in errs}
            digests = {files[k]: bytes(out[16 * k:16 * k + 16]) for k in range(done) if k not in bad}
        finally:
            os.close(dfd)
    parts, start = [], 0
    for i, end in enumerate(ends):
        d = digests.get(i)
        if d is None:
            parts.append(records[start:end])
        else:
            parts += [records[start:start + 49], b"\x01", records[start + 50:end], d]
        start = end
    return b"".join(parts)


class Background(threading.Thread):
    """``fn(*args)`` on a thread of its own; ``result()`` waits and returns or raises it."""

    def __init__(self, fn, *args) -> None:
        super().__init__(name="check", daemon=True)
        self._fn, self._args = fn, args
        self._out: tuple = (None, None)
        self.start()

    def run(self) -> None:
        try:
            self._out = (self._fn(*self._args), None)
        except BaseException as exc:  # noqa: BLE001 - raised again by result()
            self._out = (None, exc)

    def result(self):
        self.join()
        value, exc = self._out
        if exc is not None:
            raise exc
        return value


# --- the comparison ----------------------------------------------------------------------
@dataclass
class DirCheck:
    dir_check: str
    total: int = 0
    different: list[bytes] = field(default_factory=list)
    missing: list[bytes] = field(default_factory=list)  # on the source only
    extra: list[bytes] = field(default_factory=list)  # on the target only
    same: list[bytes] = field(default_factory=list)
    errors: list[bytes] = field(default_factory=list)  # unreadable: counted as different too

    def entry(self) -> dict:
        from ..consistency import entry

        return entry(self.dir_check, self.total, len(self.different), len(self.missing), len(self.extra))

    @property
    def consistent(self) -> bool:
        return not (self.different or self.missing or self.extra)

    def combined(self) -> list[str]:
        """Per path, in ``rclone check --combined``'s marks: ``=`` same, ``*`` different,
        ``+`` only on the source (missing on the target), ``-`` only on the target,
        ``!`` could not be read; names escaped as ``escape_name`` does, sorted by path."""
        err = set(self.errors)
        rows = [(p, "=") for p in self.same] + [(p, "!" if p in err else "*") for p in self.different]
        rows += [(p, "+") for p in self.missing] + [(p, "-") for p in self.extra]
        return [f"{mark} {escape_name(p)}" for p, mark in sorted(rows)]


_ESCAPES = {ord("\\"): "\\\\", ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"}


def escape_name(path: bytes) -> str:
    """A path on one line, as ``ls -b`` writes it: backslash as ``\\\\``, newline, tab and
    carriage return as ``\\n \\t \\r``, other control characters and bytes that are not
    UTF-8 as ``\\ooo`` (three octal digits)."""
    text = path.decode("utf-8", "surrogateescape")
    out = []
    for ch in text:
        c = ord(ch)
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif 0xDC80 <= c <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\{c - 0xDC00:03o}")
        elif c < 0x20 or c == 0x7F or 0x80 <= c < 0xA0:
            out.append("".join(f"\\{b:03o}" for b in ch.encode()))
        else:
            out.append(ch)
    return "".join(out)


def _dir_patterns(dirs: Iterable[str | Pattern]) -> list[tuple[str, Pattern | None]]:
    out = []
    for d in list(dirs) or ["/"]:
        if isinstance(d, Pattern):
            out.append((d.text, d))
        else:
            out.append((d, None if d.strip("/") == "" else Pattern.parse(d, "dir_check")))
    return out


def _scan_filter(filt: RoundFilter | None, pats: list[tuple[str, Pattern | None]]) -> RoundFilter | None:
    """The listing's filter: the rules', narrowed to the checked directories where it can be
    (one ``only`` list holds either ONLY_SYNC's paths or the directories, not both)."""
    narrow = tuple(p for _, p in pats if p is not None)
    if len(narrow) != len(pats):  # "/" among them: the whole tree
        return filt
    if filt is None:
        return RoundFilter((), narrow)
    return filt if filt.only else RoundFilter(filt.exclude, narrow)


class Covered:
    """Whether a checked directory's pattern covers a path, with the answer for each parent
    directory kept (a pattern that covers a directory covers all below it)."""

    def __init__(self, pat: Pattern | None) -> None:
        self.pat = pat
        self._dirs: dict[bytes, bool] = {}

    def __call__(self, path: bytes) -> bool:
        if self.pat is None:
            return True
        parent = path.rpartition(b"/")[0]
        got = self._dirs.get(parent)
        if got is None:
            got = self._dirs[parent] = bool(parent) and self.pat.covers(tuple(parent.split(b"/")))
        return got or self.pat.covers(tuple(path.split(b"/")))


def _key(m: tuple, mode: str) -> tuple:
    kind, perm, uid, gid, size, mtime, rdev, link = m
    if mode == "data":
        return (kind, size if kind == FILE else 0, rdev if kind in (4, 5) else 0, link)
    return (kind, perm, uid, gid, size if kind == FILE else 0, mtime if kind == FILE else 0,
            rdev if kind in (4, 5) else 0, link)


def run_check(source: str, target: str | None, dirs: Iterable[str] = (), *, rules: PathRules | None = None,
              mode: str = "data", on_progress: Callable[[int, int], None] | None = None,
              target_lister: Callable[[], Side] | None = None) -> tuple[dict, list[DirCheck]]:
    """The engine: ``target`` is a directory on this host, or None with ``target_lister``
    (a receiver's listing, fetched while the source is listed). Returns the 5.4.13 body
    and the per-directory details."""
    if mode not in MODES:
        raise ValueError(f"compare mode must be one of {', '.join(MODES)}, not {mode!r}")
    src = os.fsencode(source)
    pats = _dir_patterns(dirs)
    filt = check_filter(rules)
    scan = _scan_filter(filt, pats)
    dst = os.fsencode(target) if isinstance(target, str) else None
    remote = target_lister is not None
    other = Background(target_lister) if remote else Background(list_local, dst, scan)
    a = list_local(src, scan)
    meter = Meter(0, on_progress)
    if remote and mode != "metadata":
        # the receiver reads all its files meanwhile: read all of ours too, not after its listing
        meter.total = sum(a.meta[p][4] for p in _paths(a.files_in))
        hash_side(src, a, a.files_in, meter)
    b = other.result()
    if remote and scan is not None:
        b.meta = {p: m for p, m in b.meta.items() if scan.includes(tuple(p.split(b"/"))) and _walked_to(scan, p)}
    # step 2: read only what could be alike
    same_meta: list[bytes] = []
    different: set[bytes] = set()
    for path, m in a.meta.items():
        o = b.meta.get(path)
        if o is None:
            continue
        if _key(m, mode) != _key(o, mode):
            different.add(path)
        else:
            same_meta.append(path)
    read = [p for p in same_meta if a.meta[p][0] == FILE] if mode != "metadata" else []
    if not remote:
        want: dict[bytes, list[bytes]] = {}
        for p in read:
            parent, _, name = p.rpartition(b"/")
            want.setdefault(parent, []).append(name)
        meter.total = sum(a.meta[p][4] for p in read) * 2
        other = Background(hash_side, dst, b, want, meter)
        hash_side(src, a, want, meter)
        other.result()
    errors = set(a.errors) | set(b.errors)
    for p in read:
        if p in errors or a.digests.get(p) != b.digests.get(p):
            different.add(p)
    checks = []
    for text, pat in pats:
        covered = Covered(pat)
        check = DirCheck(text)
        for path in sorted(a.meta):
            if not covered(path):
                continue
            check.total += 1
            if path not in b.meta:
                check.missing.append(path)
            elif path in different:
                check.different.append(path)
                if path in errors:
                    check.errors.append(path)
            else:
                check.same.append(path)
        check.extra = sorted(p for p in b.meta if p not in a.meta and covered(p))
        checks.append(check)
    from ..consistency import result_body

    notes = [f"could not read {escape_name(p)}: {(a.errors.get(p) or b.errors.get(p))}" for p in sorted(errors)][:20]
    return result_body([c.entry() for c in checks], notes=notes), checks


def _paths(files_in: dict[bytes, list[bytes]]):
    for rel, names in files_in.items():
        for n in names:
            yield rel + b"/" + n if rel else n


def _walked_to(filt: RoundFilter, path: bytes) -> bool:
    """The local walk would have reached ``path``: none of its ancestors is pruned."""
    parts = path.split(b"/")
    return all(filt.includes(parts[:n]) or filt.descend(parts[:n]) for n in range(1, len(parts)))


def compare_trees(source: str, target: str, dirs: Iterable[str] = (), **kw) -> tuple[dict, list[DirCheck]]:
    """Compare ``source`` and ``target`` under each of ``dirs`` (absolute paths or globs
    taken relative to the roots, as CONSISTENCY_DIR; the whole tree without any)."""
    return run_check(source, target, dirs, **kw)


def compare_with_listing(source: str, describe: Callable[[], object], dirs: Iterable[str] = (),
                         **kw) -> tuple[dict, list[DirCheck]]:
    """As compare_trees, against a receiver: ``describe()`` returns its listing with
    content digests (files.remote.Listing); it runs while the source is listed."""
    return run_check(source, None, dirs, target_lister=lambda: list_remote(describe()), **kw)
