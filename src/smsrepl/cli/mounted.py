"""A block source's mounted file systems, for the commands that read it: synced first, and a
warning when one is mounted read-write (what it writes while the disk is read shows).

The sender's one-shot round and ``verify block`` read a disk as its disk holds it (O_DIRECT); a
mounted file system keeps what it wrote a moment ago in memory until writeback, so both sync
it first (blocks/quiesce.py finds it, on the disk, its partitions or devices stacked on them).
"""
from __future__ import annotations

import os
import stat


def block_device(path: str) -> bool:
    """True for a block device; file systems are mounted from those only (an image file's own
    file system is never synced or frozen for it: it holds the image)."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False  # the command's reader names the problem


def warn_written(source: str, quiesce, note, what: str) -> None:
    """One line through ``note`` when file systems mounted read-write from ``source`` are not
    frozen while it is read; ``what`` says what their writes meanwhile make."""
    busy = [m for m in quiesce.mounts() if m.writable]
    if busy:
        where = ", ".join(f"{m.point} ({m.fstype})" for m in busy)
        note(f"warning: {source} has file systems mounted read-write: {where}; they are synced first, but what "
             f"is written while the disk is read {what}")
