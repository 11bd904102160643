"""What block sources and targets share: image files and Linux block devices told apart and
sized, full positioned reads, and the text of an OSError for messages that name the path.
source.py reads them (BlockSource), target.py writes them (BlockTarget).
"""
from __future__ import annotations

import fcntl
import os
import stat
import struct

BLKGETSIZE64 = 0x80081272


def device_size(fd: int) -> int:
    buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    return struct.unpack("Q", buf)[0]


def describe(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def probe(fd: int) -> tuple[bool, int] | None:
    """(is a block device, size in bytes), or None when it is neither a device nor a regular file."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return True, device_size(fd)
    if stat.S_ISREG(st.st_mode):
        return False, st.st_size
    return None


def pread_into(fd: int, buf, offset: int) -> int:
    """Fill ``buf`` from ``offset``; short only at end of file. OSError propagates."""
    view = memoryview(buf)
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got
