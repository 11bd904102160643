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
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import xxhash

from smsrepl import kernels
from smsrepl.files.rules import Pattern, PathRules, RoundFilter
from smsrepl.files.scan import walk

READ = 1 << 20
#: files at least this large are read in steps of READ_STEP (progress between steps)
LARGE = 64 << 20
READ_STEP = 8 << 20
#: bytes per call of kernels.hash_files (how often a directory of many files reports progress)
HASH_BUDGET = 32 << 20
MODES = ("data", "metadata", "all")

_HEAD = struct.Struct(">BIIIQqQIHHIB")  # files.wire's entry record header
_SIZE = struct.Struct(">Q")  # a record's size, at offset 13
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
class Dir:
    """One directory's entries as wire records (files.wire), sorted by name: a DirBatch's,
    or a receiver's (with digests), indexed only when a check has to look inside."""

    records: bytes
    names: list[bytes] | None = None
    kinds: bytes | None = None
    ends: list[int] | None = None
    digests: dict[int, bytes] = field(default_factory=dict)  # record index -> content digest

    def index(self) -> None:
        if self.names is not None:
            return
        names, kinds, ends, pos, rec = [], bytearray(), [], 0, self.records
        while pos < len(rec):
            kind, _, _, _, _, _, _, _, plen, llen, xlen, has = _HEAD.unpack_from(rec, pos)
            path = rec[pos + 50:pos + 50 + plen]
            names.append(path.rpartition(b"/")[2])
            kinds.append(kind)
            pos += 50 + plen + llen + xlen + (16 if has else 0)
            ends.append(pos)
        self.names, self.kinds, self.ends = names, bytes(kinds), ends

    def files(self) -> list[int]:
        self.index()
        return [i for i, k in enumerate(self.kinds) if k == FILE]

    def count(self) -> int:
        """Non-directory entries."""
        self.index()
        return len(self.kinds) - self.kinds.count(DIR)

    def entries(self) -> dict[bytes, tuple[tuple, bytes | None]]:
        """name -> ((kind, mode, uid, gid, size, mtime_ns, rdev, link), digest) of each
        non-directory entry; the digest listed in the record, else the one read here."""
        out, pos, rec, i = {}, 0, self.records, 0
        while pos < len(rec):
            kind, mode, uid, gid, size, mtime, rdev, _, plen, llen, xlen, has = _HEAD.unpack_from(rec, pos)
            p = pos + 50
            pos = p + plen + llen + xlen + (16 if has else 0)
            if kind != DIR:
                link = rec[p + plen:p + plen + llen] if llen else None
                digest = rec[pos - 16:pos] if has else self.digests.get(i)
                out[rec[p:p + plen].rpartition(b"/")[2]] = ((kind, mode, uid, gid, size, mtime, rdev, link), digest)
            i += 1
        return out

    def with_digests(self) -> bytes:
        """The records with the digests read here in them, as a receiver lists them."""
        if not self.digests:
            return self.records
        parts, start = [], 0
        for i, end in enumerate(self.ends or ()):
            d = self.digests.get(i)
            if d is None:
                parts.append(self.records[start:end])
            else:
                parts += [self.records[start:start + 49], b"\x01", self.records[start + 50:end], d]
            start = end
        return b"".join(parts)


@dataclass
class Side:
    dirs: dict[bytes, Dir] = field(default_factory=dict)  # relative path -> its entries
    errors: dict[bytes, str] = field(default_factory=dict)  # path -> why it could not be read


def list_local(root: bytes, filt: RoundFilter | None, *, xattrs: bool = False) -> Side:
    """Every directory the walk enters, a Dir each (ONLY_SYNC's ancestors among the entries,
    as directories, which no count includes)."""
    side = Side()

    def failed(path: bytes, exc: OSError) -> None:
        side.errors[path] = exc.strerror or str(exc)

    if kernels.TREE:
        from smsrepl.files.dirscan import scan_dirs

        for b in scan_dirs(root, filt, on_error=failed, xattrs=xattrs, threads=1):  # a thread a side
            side.dirs[b.rel] = Dir(b.records, b.names, b.kinds, b.ends)
        return side
    from smsrepl.files import wire as W

    groups: dict[bytes, list] = {}
    for e in walk(root, filt, on_error=failed, xattrs=xattrs, implied=True):
        if e.kind == "dir":
            groups.setdefault(e.path, [])
        if e.path:
            groups.setdefault(e.path.rpartition(b"/")[0], []).append(e)
    for rel, entries in groups.items():
        recs = [W.encode_entry(e) for e in entries]
        ends, pos = [], 0
        for r in recs:
            pos += len(r)
            ends.append(pos)
        side.dirs[rel] = Dir(b"".join(recs), [e.path.rpartition(b"/")[2] for e in entries],
                             bytes(_KIND.get(e.kind, 0) for e in entries), ends)
    return side


def list_remote(listing) -> Side:
    """A receiver's listing (files.remote.Listing, with digests) as a Side."""
    listing.wait(whole=True)
    side = Side()
    for rel, parts in listing.groups.items():
        if rel is not None:  # None: the root's own record
            side.dirs[rel] = Dir(b"".join(parts))
    return side


# --- reading content ------------------------------------------------------------------
class Meter:
    """Bytes read so far, for progress (added to from several threads): ``on_progress(done,
    total)`` at most every EVERY seconds (the caller reports the end)."""

    EVERY = 0.5

    def __init__(self, total: int, on_progress: Callable[[int, int], None] | None) -> None:
        self.total, self.done = total, 0
        self._lock = threading.Lock()
        self._report = on_progress
        self._last = 0.0

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self._report is None:
                return
            now = time.monotonic()
            if now - self._last < self.EVERY:
                return
            self._last = now
            done, total = self.done, self.total
        self._report(done, total)

    def start(self, total: int) -> None:
        """The bytes to read are known: the first report (a check with nothing to read has it too)."""
        self.total = total
        self._last = time.monotonic()
        if self._report is not None:
            self._report(0, total)


def _size(d: Dir, i: int) -> int:
    return _SIZE.unpack_from(d.records, d.ends[i - 1] + 13 if i else 13)[0]


def hash_side(root: bytes, side: Side, want: dict[bytes, list[int]], meter: Meter) -> None:
    """Digests of the files ``want`` names (directory -> record indices) into each Dir's
    ``digests``; the ones that cannot be read go to ``side.errors``."""
    for rel, idx in want.items():
        d = side.dirs[rel]
        base = root + b"/" + rel if rel else root
        try:
            dfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            for i in idx:
                side.errors[_join(rel, d.names[i])] = exc.strerror or str(exc)
            continue
        try:
            small = []
            for i in idx:
                if _size(d, i) >= LARGE:
                    _hash_large(dfd, rel, d, i, side, meter)
                else:
                    small.append(i)
            names = [d.names[i] for i in small]
            out = bytearray(16 * len(small))
            start = 0
            while start < len(small):
                done, nbytes, errs = kernels.hash_files(dfd, names[start:], memoryview(out)[16 * start:], HASH_BUDGET)
                bad = {start + k for k, _ in errs}
                for k, err in errs:
                    side.errors[_join(rel, names[start + k])] = "not a regular file now" \
                        if err in (errno.EINVAL, errno.EISDIR) else os.strerror(err)
                for k in range(start, start + done):
                    if k not in bad:
                        d.digests[small[k]] = bytes(out[16 * k:16 * k + 16])
                meter.add(nbytes)
                start += done
        finally:
            os.close(dfd)


def _join(rel: bytes, name: bytes) -> bytes:
    return rel + b"/" + name if rel else name


def _hash_large(dfd: int, rel: bytes, d: Dir, i: int, side: Side, meter: Meter) -> None:
    name = d.names[i]
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
    except OSError as exc:
        side.errors[_join(rel, name)] = exc.strerror or str(exc)
        return
    buf = bytearray(READ_STEP)
    view = memoryview(buf)
    h = xxhash.xxh3_128()
    try:
        while n := os.readv(fd, [buf]):
            h.update(view[:n])
            meter.add(n)
        d.digests[i] = h.digest()
    except OSError as exc:
        side.errors[_join(rel, name)] = exc.strerror or str(exc)
    finally:
        os.close(fd)


def records_with_digests(top: bytes, rel: bytes, records: bytes, names: list[bytes], kinds: bytes,
                         ends: list[int]) -> bytes:
    """A directory's wire records (a DirBatch's) with the XXH3-128 of each regular file's
    content: what a receiver lists for a check. A file that cannot be read goes without one
    (a check counts it as different)."""
    d = Dir(records, names, kinds, ends)
    files = d.files()
    if not files:
        return records
    hash_side(top, Side({rel: d}), {rel: files}, Meter(0, None))
    return d.with_digests()


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
    same_count: int = 0  # alike and not in ``same`` (a check run without list_paths)

    def entry(self) -> dict:
        from smsrepl.control.consistency import entry

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
        if isinstance(d, Pattern):  # a CONSISTENCY_DIR naming SRC_DIR itself has no parts: all of it
            out.append((d.text, d if d.parts else None))
        else:
            out.append((d, None if d.strip("/") == "" else Pattern.parse(d, "--dir-check", "--dir-check")))
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


def _coverage(pat: Pattern | None, rel: bytes) -> str:
    """How a checked directory's pattern meets the entries of directory ``rel``: "all" of
    them, "some" (decide entry by entry) or "none"."""
    if pat is None:
        return "all"
    parts = tuple(rel.split(b"/")) if rel else ()
    if parts and pat.covers(parts):
        return "all"
    return "some" if pat.may_be_below(parts) else "none"


def _key(m: tuple, mode: str) -> tuple:
    kind, perm, uid, gid, size, mtime, rdev, link = m
    if mode == "data":
        return (kind, size if kind == FILE else 0, rdev if kind in (4, 5) else 0, link)
    return (kind, perm, uid, gid, size if kind == FILE else 0, mtime if kind == FILE else 0,
            rdev if kind in (4, 5) else 0, link)


class _Verdicts:
    """One directory's outcome: all its entries alike (``alike``, counted, not listed one by
    one unless asked), or per name: "=", "*", "!", "+" (source only), "-" (target only)."""

    __slots__ = ("alike", "names", "marks")

    def __init__(self) -> None:
        self.alike: list[bytes] | int = 0
        self.names: list[bytes] = []
        self.marks: list[str] = []


def _entry_verdicts(rel: bytes, ea: dict, eb: dict, mode: str, errors: set[bytes]) -> _Verdicts:
    v = _Verdicts()
    for name, (m, da) in ea.items():
        got = eb.get(name)
        if got is None:
            mark = "+"
        elif _key(m, mode) != _key(got[0], mode):
            mark = "*"
        elif mode != "metadata" and m[0] == FILE:
            path = _join(rel, name)
            mark = "!" if path in errors or da is None or got[1] is None else "=" if da == got[1] else "*"
        else:
            mark = "="
        v.names.append(name)
        v.marks.append(mark)
    for name in eb:
        if name not in ea:
            v.names.append(name)
            v.marks.append("-")
    return v


def _needs_filter(filt: RoundFilter | None, rel: bytes) -> bool:
    """Whether some entries of directory ``rel`` may be left out by ``filt`` (so a receiver's
    listing of it, made without the rules, must be filtered entry by entry)."""
    if filt is None:
        return False
    parts = tuple(rel.split(b"/")) if rel else ()
    if any(p.may_be_below(parts) for p in filt.exclude):
        return True
    return bool(filt.only) and not (parts and any(p.covers(parts) for p in filt.only))


def run_check(source: str, target: str | None, dirs: Iterable[str | Pattern] = (), *,
              rules: PathRules | None = None, mode: str = "data",
              on_progress: Callable[[int, int], None] | None = None,
              target_lister: Callable[[], Side] | None = None,
              list_paths: bool = True) -> tuple[dict, list[DirCheck]]:
    """The engine: ``target`` is a directory on this host, or None with ``target_lister``
    (a receiver's listing, fetched while the source is listed and read). Returns the 5.4.13
    body and the per-directory details (every path listed only with ``list_paths``)."""
    if mode not in MODES:
        raise ValueError(f"compare mode must be one of {', '.join(MODES)}, not {mode!r}")
    src = os.fsencode(source)
    pats = _dir_patterns(dirs)
    scan = _scan_filter(check_filter(rules), pats)
    remote = target_lister is not None
    dst = None if remote else os.fsencode(target)
    other = Background(target_lister) if remote else Background(list_local, dst, scan)
    # a receiver lists with xattrs: ours the same way, so that alike directories are alike bytes
    a = list_local(src, scan, xattrs=remote)
    meter = Meter(0, on_progress)
    content = mode != "metadata"
    if remote and content:  # the receiver reads all its files meanwhile: read all of ours now
        want = {rel: d.files() for rel, d in a.dirs.items()}
        meter.start(sum(_size(a.dirs[rel], i) for rel, idx in want.items() for i in idx))
        hash_side(src, a, want, meter)
    b = other.result()
    if remote and scan is not None:
        from smsrepl.files.dirscan import walked

        b.dirs = {rel: d for rel, d in b.dirs.items() if not rel or walked(scan, tuple(rel.split(b"/")))}
    fast: set[bytes] = set()
    if not remote:
        # alike listings need only their content compared; others entry by entry
        want_a: dict[bytes, list[int]] = {}
        want_b: dict[bytes, list[int]] = {}
        for rel, da in a.dirs.items():
            db = b.dirs.get(rel)
            if db is None:
                continue
            if da.records == db.records:
                fast.add(rel)
                if content:
                    want_a[rel] = want_b[rel] = da.files()
            elif content:
                ea, eb = da.entries(), db.entries()
                pairs = [(n, m) for n, (m, _) in ea.items() if m[0] == FILE and n in eb
                         and _key(m, mode) == _key(eb[n][0], mode)]
                if pairs:
                    da.index()
                    db.index()
                    ia = {n: i for i, n in enumerate(da.names)}
                    ib = {n: i for i, n in enumerate(db.names)}
                    want_a[rel] = [ia[n] for n, _ in pairs]
                    want_b[rel] = [ib[n] for n, _ in pairs]
        meter.start(sum(_size(a.dirs[rel], i) for rel, idx in want_a.items() for i in idx) * 2)
        hashing = Background(hash_side, dst, b, want_b, meter)
        hash_side(src, a, want_a, meter)
        hashing.result()
    errors = set(a.errors) | set(b.errors)
    verdicts: dict[bytes, _Verdicts] = {}
    for rel in a.dirs.keys() | b.dirs.keys():
        da, db = a.dirs.get(rel), b.dirs.get(rel)
        v = None
        if da is not None and db is not None:
            if rel in fast and (not content or da.digests == db.digests):
                v = _Verdicts()
            elif remote and da.with_digests() == db.records:
                v = _Verdicts()
            if v is not None:
                da.index()
                v.alike = [n for n, k in zip(da.names, da.kinds) if k != DIR] if list_paths else da.count()
        if v is None:
            ea = da.entries() if da is not None else {}
            eb = db.entries() if db is not None else {}
            if remote and eb and _needs_filter(scan, rel):
                parts = tuple(rel.split(b"/")) if rel else ()
                eb = {n: e for n, e in eb.items() if scan.includes(parts + (n,))}
            v = _entry_verdicts(rel, ea, eb, mode, errors)
        verdicts[rel] = v
    checks = [_count(text, pat, verdicts, list_paths) for text, pat in pats]
    from smsrepl.control.consistency import result_body

    return result_body([c.entry() for c in checks], notes=_notes(source, scan, pats, checks, a, b, errors)), checks


def _notes(source: str, scan: RoundFilter | None, pats, checks: list[DirCheck], a: Side, b: Side,
           errors: set[bytes]) -> list[str]:
    """What the operator should know besides the counts: rules and checked directories that
    matched nothing (a typo, or a path of another tree), entries that could not be read."""
    from smsrepl.files.rules import unmatched_note

    notes = [unmatched_note(key or "rule", text, source) for key, text in (scan.unmatched() if scan else [])
             if key not in ("CONSISTENCY_DIR", "--dir-check")]
    notes += [unmatched_note(pat.key or "CONSISTENCY_DIR", text, source) for (text, pat), c in zip(pats, checks)
              if pat is not None and c.total == 0 and not c.extra]
    notes += [f"could not read {escape_name(p)}: {a.errors.get(p) or b.errors.get(p)}" for p in sorted(errors)[:20]]
    if len(errors) > 20:
        notes.append(f"... and {len(errors) - 20} more that could not be read")
    return notes


def _count(text: str, pat: Pattern | None, verdicts: dict[bytes, _Verdicts], list_paths: bool) -> DirCheck:
    check = DirCheck(text)
    lists = {"=": check.same, "*": check.different, "!": check.different, "+": check.missing, "-": check.extra}
    for rel, v in verdicts.items():
        cover = _coverage(pat, rel)
        if cover == "none":
            continue
        parts = tuple(rel.split(b"/")) if rel else ()
        if isinstance(v.alike, int) and cover == "all":
            check.total += v.alike
            check.same_count += v.alike
        elif v.alike:
            for name in v.alike:
                if cover == "all" or pat.covers(parts + (name,)):
                    check.total += 1
                    check.same.append(_join(rel, name))
        for name, mark in zip(v.names, v.marks):
            if cover == "some" and not pat.covers(parts + (name,)):
                continue
            path = _join(rel, name)
            lists[mark].append(path)
            if mark == "!":
                check.errors.append(path)
            if mark != "-":
                check.total += 1
    for ls in (check.same, check.different, check.missing, check.extra, check.errors):
        ls.sort()
    return check


def compare_trees(source: str, target: str, dirs: Iterable[str] = (), **kw) -> tuple[dict, list[DirCheck]]:
    """Compare ``source`` and ``target`` under each of ``dirs`` (absolute paths or globs
    taken relative to the roots, as CONSISTENCY_DIR; the whole tree without any)."""
    return run_check(source, target, dirs, **kw)


def compare_with_listing(source: str, describe: Callable[[], object], dirs: Iterable[str] = (),
                         **kw) -> tuple[dict, list[DirCheck]]:
    """As compare_trees, against a receiver: ``describe()`` returns its listing with
    content digests (files.remote.Listing); it runs while the source is listed."""
    return run_check(source, None, dirs, target_lister=lambda: list_remote(describe()), **kw)
