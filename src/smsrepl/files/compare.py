"""Compare a source tree with its copy, in the 5.4.13 consistency-result shape.

One engine for every file check: against a tree on this host (``compare_trees``) and
against a receiver's target (``compare_with_listing``: the receiver lists its tree with
content digests; no file data travels). It works in three steps:

1. both sides are listed at once (files.sides: a thread each; with the native kernels a
   directory per call, files.dirscan), under the same rules as the transfer that made the copy
   (``check_filter``: what migration and sync rounds leave out stays out of the check);
2. entries on both sides whose kind and size agree are the only ones whose content is
   read (files.digests): a directory's files per call of ``kernels.hash_files`` (XXH3-128,
   one reused buffer, the GIL let go), both sides at once, large files in steps that
   report progress;
3. each checked directory (CONSISTENCY_DIR, ``dirs``) gets its counts.

What "different" means is the ``compare`` mode: ``data`` (default: kind, size and content
of files, a symlink's target, a device's numbers: what ``rclone check`` compares),
``metadata`` (no data read: kind, size, mtime, permission bits, owner and group, as rsync's
quick check plus the permissions a copy keeps, and the xattrs of files, symlinks and special
files: POSIX ACLs and SELinux labels among them) or ``all`` (both). ``num_total_files``
counts the source's non-directory entries; ``num_target_miss_files`` those only on the
source, ``num_target_more_files`` those only on the target. Directories are walked but not
counted, as ``rclone check`` does. An entry that cannot be read on either side is counted
as different and listed with ``!``.
"""
from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from smsrepl.files.digests import Meter, hash_side
from smsrepl.files.rules import Pattern, PathRules, RoundFilter
from smsrepl.files.sides import DIR, FILE, Dir, Meta, Side, child_path, list_local, list_remote

TYPE_CHECKING = False  # typing itself would cost a short command 3 ms of imports

if TYPE_CHECKING:
    from smsrepl.files.listing import Listing

MODES = ("data", "metadata", "all")


def check_filter(rules: PathRules | None) -> RoundFilter | None:
    """What a check of a copy made under ``rules`` covers: what every round copied, i.e. not
    what migration or sync rounds exclude, and with ONLY_SYNC only those paths (the rest was
    copied once and may since have changed on the source, by design)."""
    if rules is None:
        return None
    filt = rules.for_round("sync")
    return filt if filt.exclude or filt.only else None


class Background(threading.Thread):
    """``fn(*args)`` on a thread of its own; ``result()`` waits and returns or raises it."""

    def __init__(self, fn: Callable[..., object], *args: object) -> None:
        super().__init__(name="check", daemon=True)
        self._fn, self._args = fn, args
        self._out: tuple[object, BaseException | None] = (None, None)
        self.start()

    def run(self) -> None:
        try:
            self._out = (self._fn(*self._args), None)
        except BaseException as exc:  # noqa: BLE001 - raised again by result()
            self._out = (None, exc)

    def result(self) -> object:
        self.join()
        value, exc = self._out
        if exc is not None:
            raise exc
        return value


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


def _key(m: Meta, mode: str) -> tuple:
    kind, perm, uid, gid, size, mtime, rdev, link, xattrs = m
    if mode == "data":
        return (kind, size if kind == FILE else 0, rdev if kind in (4, 5) else 0, link)
    return (kind, perm, uid, gid, size if kind == FILE else 0, mtime if kind == FILE else 0,
            rdev if kind in (4, 5) else 0, link, xattrs)


class _Verdicts:
    """One directory's outcome: all its entries alike (``alike``, counted, not listed one by
    one unless asked), or per name: "=", "*", "!", "+" (source only), "-" (target only)."""

    __slots__ = ("alike", "names", "marks", "dir")

    def __init__(self) -> None:
        self.alike: list[bytes] | int = 0
        self.names: list[bytes] = []
        self.marks: list[str] = []
        self.dir: Dir | None = None  # where ``alike`` is a count: the entries it counts

    def alike_names(self) -> list[bytes]:
        if isinstance(self.alike, list):
            return self.alike
        if self.dir is None:
            return []
        names, kinds, _ = self.dir.index()
        return [n for n, k in zip(names, kinds) if k != DIR]


Entries = dict[bytes, tuple[Meta, bytes | None]]


def _entry_verdicts(rel: bytes, ea: Entries, eb: Entries, mode: str, errors: set[bytes]) -> _Verdicts:
    v = _Verdicts()
    for name, (m, da) in ea.items():
        got = eb.get(name)
        if got is None:
            mark = "+"
        elif _key(m, mode) != _key(got[0], mode):
            mark = "*"
        elif mode != "metadata" and m[0] == FILE:
            path = child_path(rel, name)
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
    other: Background
    # metadata includes the xattrs (POSIX ACLs and SELinux labels among them)
    xattrs = mode != "data"
    if target_lister is None:
        if target is None:
            raise ValueError("a check needs a target directory or a target_lister")
        dst: bytes | None = os.fsencode(target)
        other = Background(functools.partial(list_local, xattrs=xattrs), dst, scan)
    else:
        dst = None
        other = Background(target_lister)
    remote = dst is None
    # a receiver lists with xattrs: ours the same way, so that alike directories are alike bytes
    a = list_local(src, scan, xattrs=remote or xattrs)
    meter = Meter(0, on_progress)
    content = mode != "metadata"
    if remote and content:  # the receiver reads all its files meanwhile: read all of ours now
        want = {rel: d.files() for rel, d in a.dirs.items()}
        meter.start(sum(a.dirs[rel].size(i) for rel, idx in want.items() for i in idx))
        hash_side(src, a, want, meter)
    b = other.result()
    assert isinstance(b, Side)
    if remote and scan is not None:
        from smsrepl.files.dirscan import walked

        b.dirs = {rel: d for rel, d in b.dirs.items() if not rel or walked(scan, tuple(rel.split(b"/")))}
    fast: set[bytes] = set()
    if dst is not None:
        # alike listings need only their content compared; others entry by entry
        want_a, want_b = _to_read(a, b, mode, fast)
        meter.start(sum(a.dirs[rel].size(i) for rel, idx in want_a.items() for i in idx) * 2)
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
                v.alike, v.dir = da.count(), da
                if list_paths:
                    v.alike = v.alike_names()
        if v is None:
            ea = da.entries() if da is not None else {}
            eb = db.entries() if db is not None else {}
            if remote and eb and scan is not None and _needs_filter(scan, rel):
                parts = tuple(rel.split(b"/")) if rel else ()
                eb = {n: e for n, e in eb.items() if scan.includes(parts + (n,))}
            v = _entry_verdicts(rel, ea, eb, mode, errors)
        verdicts[rel] = v
    checks = [_count(text, pat, verdicts, list_paths) for text, pat in pats]
    from smsrepl.control.consistency import result_body

    return result_body([c.entry() for c in checks], notes=_notes(source, scan, pats, checks, a, b, errors)), checks


def _to_read(a: Side, b: Side, mode: str, fast: set[bytes]) -> tuple[dict[bytes, list[int]], dict[bytes, list[int]]]:
    """The files whose content a check of two local trees reads: (source side's, target
    side's) record indices per directory. Directories listed alike (same records) go to
    ``fast``: all their files are read; in others, the files alike in kind and size."""
    content = mode != "metadata"
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
                ia = {n: i for i, n in enumerate(da.index()[0])}
                ib = {n: i for i, n in enumerate(db.index()[0])}
                want_a[rel] = [ia[n] for n, _ in pairs]
                want_b[rel] = [ib[n] for n, _ in pairs]
    return want_a, want_b


def _notes(source: str, scan: RoundFilter | None, pats: list[tuple[str, Pattern | None]], checks: list[DirCheck],
           a: Side, b: Side, errors: set[bytes]) -> list[str]:
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
        if isinstance(v.alike, int):  # counted, not listed
            n = v.alike if cover == "all" else sum(1 for name in v.alike_names()
                                                   if pat is not None and pat.covers(parts + (name,)))
            check.total += n
            check.same_count += n
        else:
            for name in v.alike:
                if cover == "all" or (pat is not None and pat.covers(parts + (name,))):
                    check.total += 1
                    check.same.append(child_path(rel, name))
        for name, mark in zip(v.names, v.marks):
            if cover == "some" and not (pat is not None and pat.covers(parts + (name,))):
                continue
            path = child_path(rel, name)
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


def compare_with_listing(source: str, describe: Callable[[], Listing], dirs: Iterable[str | Pattern] = (),
                         **kw) -> tuple[dict, list[DirCheck]]:
    """As compare_trees, against a receiver: ``describe()`` returns its listing with
    content digests (files.listing.Listing); it runs while the source is listed."""
    return run_check(source, None, dirs, target_lister=lambda: list_remote(describe()), **kw)

