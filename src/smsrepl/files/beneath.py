"""Opening a path below a live source tree's root without following a symlink anywhere in it.

O_NOFOLLOW guards only a path's last component. A live source may swap a directory for a
symlink between the listing and the read (a user's ``mv dir x; ln -s /etc dir``): opening
``top/dir/shadow`` by path then reads /etc/shadow, and a later round sends the user's own
file of the same size and times as attributes only, leaving the root-only data on the
target under the user's owner and mode. Every source path below the root is therefore
opened with openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH) from the root's descriptor, or,
where the kernel lacks openat2 (before 5.6, or a seccomp filter refuses it) and for paths
longer than the kernel takes in one call, one component at a time with O_NOFOLLOW. A
symlink met on the way fails with ELOOP or ENOTDIR: the entry changed under us, as callers
treat it (liveread.VANISHED). The root itself is opened as the user named it (through any
symlinks of its own path).
"""
from __future__ import annotations

import ctypes
import errno
import os

#: flags of the directories walked through: no read permission needed, never a symlink
_WALK = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ROOT = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_SYS_OPENAT2 = 437  # the same number on every architecture (added after the tables were unified)
_RESOLVE_NO_SYMLINKS, _RESOLVE_BENEATH = 0x04, 0x08
#: longer relative paths are walked: openat2 takes at most PATH_MAX (4096) bytes with the NUL
_ONE_CALL = 4000


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_syscall = None
_have_openat2: bool | None = None


def _openat2(dir_fd: int, rel: bytes, flags: int) -> int | None:
    """openat2's descriptor; None where the kernel will not do it (then walk)."""
    global _syscall, _have_openat2
    if _have_openat2 is False:
        return None
    if _syscall is None:
        try:
            _syscall = ctypes.CDLL(None, use_errno=True).syscall
        except (OSError, AttributeError):
            _have_openat2 = False
            return None
        _syscall.restype = ctypes.c_long
    how = _OpenHow(flags, 0, _RESOLVE_NO_SYMLINKS | _RESOLVE_BENEATH)
    fd = _syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(rel), ctypes.byref(how),
                  ctypes.c_size_t(ctypes.sizeof(how)))
    if fd >= 0:
        _have_openat2 = True
        return fd
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM) and not _have_openat2:
        _have_openat2 = False  # an old kernel, or a filter that refuses it: walk from now on
        return None
    if err == errno.EAGAIN:  # a rename elsewhere on the system raced the lookup: walk this once
        return None
    raise OSError(err, os.strerror(err), rel)


def openat_beneath(dir_fd: int, rel: bytes, flags: int) -> int:
    """``rel`` below directory ``dir_fd`` opened with ``flags`` (O_NOFOLLOW added): no
    component of ``rel`` may be a symlink (OSError ELOOP or ENOTDIR)."""
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if len(rel) < _ONE_CALL:
        fd = _openat2(dir_fd, rel, flags)
        if fd is not None:
            return fd
    parts = rel.split(b"/")
    if any(p in (b"", b".", b"..") for p in parts):
        raise OSError(errno.EINVAL, "not a plain relative path", rel)
    at = dir_fd
    try:
        for name in parts[:-1]:
            step = os.open(name, _WALK, dir_fd=at)
            if at != dir_fd:
                os.close(at)
            at = step
        return os.open(parts[-1], flags, dir_fd=at)
    finally:
        if at != dir_fd:
            os.close(at)


def open_beneath(top: bytes, rel: bytes, flags: int) -> int:
    """``top/rel`` opened with ``flags``, no symlink followed below ``top`` (``rel`` empty:
    ``top`` itself)."""
    if not rel:
        return os.open(top, flags | os.O_CLOEXEC)
    root = os.open(top, _ROOT)
    try:
        return openat_beneath(root, rel, flags)
    finally:
        os.close(root)


def lstat_beneath(top: bytes, rel: bytes) -> os.stat_result:
    """lstat of ``top/rel`` (``rel`` not empty), its parent reached as open_beneath does."""
    parent, _, name = rel.rpartition(b"/")
    pfd = open_beneath(top, parent, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW) if parent else os.open(top, _ROOT)
    try:
        return os.stat(name, dir_fd=pfd, follow_symlinks=False)
    finally:
        os.close(pfd)


_PROC_FD = b"/proc/self/fd"
_have_proc: bool | None = None


def fd_path(fd: int, fallback: bytes) -> bytes:
    """A path that names the directory open at ``fd`` whatever is renamed meanwhile, for the
    calls that take no descriptor (the xattr calls: ``fd_path(fd, p) + b"/" + name`` with the
    l* variants reads ``name`` in that very directory, without following it); ``fallback``
    (the directory's path) where /proc is not mounted."""
    global _have_proc
    if _have_proc is None:
        _have_proc = os.path.isdir(_PROC_FD)
    return b"%s/%d" % (_PROC_FD, fd) if _have_proc else fallback
