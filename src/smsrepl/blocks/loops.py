"""Loop devices backed by an image file (``losetup``): /sys/block/loop*/loop/backing_file.

An image file attached to a loop device is a disk in use: a receiver must not write it as
a target (the file system mounted from the loop device would change under the kernel), and
a sender that copies it as a source must sync or freeze what is mounted from that device, as
it does for a block device's partitions and holders (blocks/quiesce.py).
"""
from __future__ import annotations

import os

SYS_BLOCK = "/sys/block"


def loop_devices_of(path: str) -> list[tuple[str, int]]:
    """(name, device number) of each loop device whose backing file is ``path`` (the same file:
    its device and inode, or, where the backing file cannot be looked up, its resolved path)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    real = os.path.realpath(path)
    found = []
    try:
        names = sorted(n for n in os.listdir(SYS_BLOCK) if n.startswith("loop"))
    except OSError:
        return []
    for name in names:
        try:
            with open(os.path.join(SYS_BLOCK, name, "loop", "backing_file"), "rb") as fh:
                backing = os.fsdecode(fh.read().rstrip(b"\n"))
            with open(os.path.join(SYS_BLOCK, name, "dev")) as fh:
                major, minor = (int(x) for x in fh.read().split(":"))
        except (OSError, ValueError):
            continue  # not attached (no loop/ directory), or gone meanwhile
        try:
            other = os.stat(backing)
            same = (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)
        except OSError:
            same = backing == real  # deleted or renamed since: "(deleted)" never matches
        if same:
            found.append((name, os.makedev(major, minor)))
    return found
