"""Whether a range of a file is in the page cache, without reading it: cachestat(2) (Linux 6.5).

An image file's pages that the page cache holds are its latest contents (dirty ones
included), so a source read through the cache is as coherent as a direct read; it costs a
copy instead of a disk read. Where cachestat is missing (an older kernel, another
system), ``resident`` says None and callers read as they would without it.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os

SYS_CACHESTAT = 451  # the same number on every architecture (added after the tables were unified)
PAGE = mmap.PAGESIZE
#: a range is read through the cache when it holds this share of its pages: the few others
#: are read from the disk into the cache (a file read whole a while ago has lost some)
MOSTLY = 0.75

_libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc: find_library() runs ldconfig
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64), ("nr_writeback", ctypes.c_uint64),
                ("nr_evicted", ctypes.c_uint64), ("nr_recently_evicted", ctypes.c_uint64)]


_works: bool | None = None if os.uname().sysname == "Linux" else False


def resident(fd: int, offset: int, length: int) -> bool | None:
    """True when the page cache holds at least MOSTLY of the pages of [offset, offset+length)
    of ``fd``'s file, False when it holds fewer, None when this kernel cannot tell."""
    global _works
    if _works is False or length <= 0:
        return None
    rng, st = _Range(offset, length), _Stat()
    if _syscall(SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
            _works = False  # seccomp may refuse it as unknown, too
        return None
    _works = True
    first = offset // PAGE
    return st.nr_cache >= MOSTLY * (-(-(offset + length) // PAGE) - first)
