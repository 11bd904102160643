"""Tree scan: every entry under a root, in a fixed order, without following symlinks.

Names are bytes end to end (Linux file names need not be UTF-8). Paths are
relative to the root, components joined by ``/``; the root itself is ``b""``.
A directory comes before its content; names within a directory are sorted
by their bytes, so two scans of equal trees yield equal sequences.
"""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from smsrepl.errors import SourceError
from smsrepl.files.beneath import fd_path, open_beneath
from smsrepl.files.names import DIR_FLAGS
from smsrepl.files.rules import RoundFilter

KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "chardev",
         stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


@dataclass(slots=True)
class Entry:
    path: bytes
    kind: str
    mode: int  # permission bits (S_IMODE)
    uid: int
    gid: int
    size: int
    mtime_ns: int
    dev: int
    ino: int
    nlink: int
    rdev: int
    link: bytes | None = None  # a symlink's target, as stored
    xattrs: dict[bytes, bytes] | None = None  # with walk(xattrs=True); POSIX ACLs are among them
    #: a directory walked only on the way to an included path (an ONLY_SYNC ancestor)
    implied: bool = False

    @property
    def parts(self) -> tuple[bytes, ...]:
        return tuple(self.path.split(b"/")) if self.path else ()

    @classmethod
    def from_stat(cls, path: bytes, st: os.stat_result, link: bytes | None = None) -> "Entry":
        return cls(path, KINDS.get(stat.S_IFMT(st.st_mode), "unknown"), stat.S_IMODE(st.st_mode), st.st_uid,
                   st.st_gid, st.st_size, mtime_ns(st), st.st_dev, st.st_ino, st.st_nlink, st.st_rdev, link)


_NS_MIN, _NS_MAX = -(1 << 63), (1 << 63) - 1


def mtime_ns(st: os.stat_result) -> int:
    """st_mtime_ns clamped to the int64 the wire carries (1677-09-21 to 2262-04-11; ext4 keeps
    times to 2446), as the native records clamp it (fstree_record.c: sms_mtime_ns)."""
    return min(max(st.st_mtime_ns, _NS_MIN), _NS_MAX)


def _raise(path: bytes, exc: OSError) -> None:
    raise SourceError(f"cannot read {os.fsdecode(path)!r}: {exc.strerror or exc}") from None


def read_xattrs(path: bytes) -> dict[bytes, bytes]:
    """Extended attributes of ``path`` itself (not a symlink's target); POSIX ACLs are the
    ``system.posix_acl_*`` ones. Empty where the file system has none."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out = {}
    for name in names:
        try:
            out[os.fsencode(name)] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                raise
    return out


def root_entry(top: bytes, xattrs: bool = True) -> Entry:
    """The root directory's own entry (walk() yields it first); SourceError where ``top``
    cannot be read or is not a directory."""
    try:
        st = os.lstat(top)
    except OSError as exc:
        _raise(top, exc)
    if not stat.S_ISDIR(st.st_mode):
        raise SourceError(f"{os.fsdecode(top)!r} is not a directory")
    e = Entry.from_stat(b"", st)
    if xattrs:
        e.xattrs = read_xattrs(top)
    return e


def walk(root: str | bytes, filt: RoundFilter | None = None, *,
         on_error: Callable[[bytes, OSError], None] = _raise, one_file_system: bool = False,
         xattrs: bool = False, implied: bool = False) -> Iterator[Entry]:
    """Yield the entries under ``root`` that ``filt`` includes (all without a filter).

    Directories that the filter neither includes nor needs to walk through are
    pruned. ``on_error(path, exc)`` decides about unreadable entries (default:
    SourceError naming the full path; a callback gets the relative path). With
    ``one_file_system``, mount points below the root are listed but not entered
    (as ``rsync -x``). With ``xattrs``, each entry carries its extended
    attributes (``rsync -X``, and ``-A`` through them). With ``implied``, the
    directories walked only on the way to included paths are yielded too,
    marked ``implied``.
    """
    top = os.fsencode(root)
    first = root_entry(top, xattrs)
    yield first
    dev = first.dev if one_file_system else None
    # an explicit stack, not recursion: trees can be deeper than Python's recursion limit
    stack = [_listing(top, b"", (), on_error, xattrs)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        child, cparts, st, link, attrs = item
        is_dir = stat.S_ISDIR(st.st_mode)
        if filt is not None and not filt.includes(cparts):
            if is_dir and filt.descend(cparts):
                # on the way to an included path: walked, but not itself part of the round
                if implied:
                    e = Entry.from_stat(child, st, link)
                    e.implied = True
                    yield e
                stack.append(_listing(top, child, cparts, on_error, xattrs))
            continue
        entry = Entry.from_stat(child, st, link)
        if attrs is not None:
            entry.xattrs = attrs
        yield entry
        if is_dir and (dev is None or st.st_dev == dev):
            stack.append(_listing(top, child, cparts, on_error, xattrs))


def _listing(top: bytes, rel: bytes, parts: tuple[bytes, ...], on_error, xattrs: bool):
    """(path, parts, lstat, symlink target, xattrs or None) of a directory's entries, sorted by
    name: read through one descriptor of the directory (beneath.py), all before the first is
    yielded, so that a walk holds no descriptor between its steps."""
    full = top + b"/" + rel if rel else top
    items = []
    try:
        fd = open_beneath(top, rel, DIR_FLAGS)
    except OSError as exc:
        if on_error is _raise:  # the default names the whole path
            _raise(full, exc)
        on_error(rel, exc)
        return
    try:
        try:
            names = sorted(os.fsencode(n) for n in os.listdir(fd))
        except OSError as exc:
            if on_error is _raise:
                _raise(full, exc)
            on_error(rel, exc)
            return
        here = fd_path(fd, full) if xattrs else b""
        for name in names:
            child = rel + b"/" + name if rel else name
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                link = os.readlink(name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else None
                attrs = read_xattrs(here + b"/" + name) if xattrs else None
            except OSError as exc:
                if on_error is _raise:
                    _raise(top + b"/" + child, exc)
                on_error(child, exc)
                continue
            items.append((child, parts + (name,), st, link, attrs))
    finally:
        os.close(fd)
    yield from items
