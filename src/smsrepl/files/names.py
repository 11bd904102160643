"""Names under a target root: which entry paths are allowed, and the temporaries.

Every path a sender names is checked (:func:`check_path`: no absolute paths, no
``..``, no empty, ``.`` or over-long components, no NUL) before anything is
written. A file's data goes to a temporary name in its directory first
(:func:`temp_name`: ``.smsrepl~<16 hex>~<name>``), which only a rename turns into
its final name; a directory new in a round may be made under a temporary name too, and
renamed once what is in it is durable. Temporaries a killed run left are removed by
:func:`remove_temporaries` at the start of the next (and are never listed).
"""
from __future__ import annotations

import itertools
import os
import re

from smsrepl.errors import RemoteProtocolError

NAME_MAX = 255
_BAD_PARTS = frozenset((b"", b".", b".."))
TEMP_START = b".smsrepl~"
TEMP_RE = re.compile(rb"^\.smsrepl~[0-9a-f]{16}~")
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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
TEMP_TAG = int(_TEMP_PREFIX, 16) ^ 0x80000000  # link_files' temporaries: another prefix than ours
_temp_counter = itertools.count()


def temp_name(name: bytes) -> bytes:
    # a random part per process and a counter: unique without a getrandom() per file
    return b".smsrepl~%s%08x~%s" % (_TEMP_PREFIX, next(_temp_counter) & 0xFFFFFFFF, name[:NAME_MAX - 27])


def unlink_quiet(name: bytes, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def remove_tree(name: bytes, dir_fd: int, *, quiet: bool = False) -> None:
    """Remove directory ``name`` in ``dir_fd`` with everything in it (symlinks are removed, never
    followed); OSError where something cannot be, or with ``quiet`` whatever can be."""
    fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    try:
        for _top, dirs, files, dfd in os.fwalk(b".", topdown=False, dir_fd=fd, follow_symlinks=False):
            for n in files:
                try:
                    os.unlink(n, dir_fd=dfd)
                except OSError:
                    if not quiet:
                        raise
            for n in dirs:  # fwalk lists symlinks to directories among dirs: rmdir refuses those
                try:
                    try:
                        os.rmdir(n, dir_fd=dfd)
                    except NotADirectoryError:
                        os.unlink(n, dir_fd=dfd)
                except OSError:
                    if not quiet:
                        raise
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def remove_temporary(name: bytes, dir_fd: int) -> None:
    """Remove temporary ``name`` in ``dir_fd``: a file, or a directory made under a temporary
    name (files.durable) with everything in it; quietly where it is gone."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except IsADirectoryError:
        try:
            remove_tree(name, dir_fd, quiet=True)
        except OSError:
            pass
    except OSError:
        pass


def under_temporary(rel: bytes) -> bool:
    """Whether relative path ``rel`` lies in a directory made under a temporary name."""
    return TEMP_START in rel and any(TEMP_RE.match(c) for c in rel.split(b"/"))


def remove_temporaries(root: str | bytes) -> int:
    """Remove what a killed run left (``.smsrepl~...`` names, files and directories) anywhere
    under ``root``; returns how many."""
    removed = 0
    fd = os.open(os.fsencode(root), DIR_FLAGS)
    try:
        for _top, dirs, files, dfd in os.fwalk(b".", dir_fd=fd, follow_symlinks=False):
            temps = [n for n in files + dirs if TEMP_RE.match(n)]
            dirs[:] = [d for d in dirs if not TEMP_RE.match(d)]  # not walked into: removed whole
            for name in temps:
                remove_temporary(name, dfd)
                removed += 1
    finally:
        os.close(fd)
    return removed
