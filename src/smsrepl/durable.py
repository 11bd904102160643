"""Small files and directories that survive a crash: owner-only state directories, JSON
records replaced atomically (written, fsynced, renamed, their directory fsynced), and the
directory fsync that makes a rename or a new name durable. The agent, the sender, the receiver
and the block replica keep their state with these."""
from __future__ import annotations

import json
import os


def private_makedirs(path: str) -> None:
    """Create ``path`` and any missing parent as owner-only directories (state holds digests
    of the data and session records; os.makedirs would leave new parents at 0755)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        private_makedirs(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass


def fsync_dir(path: str) -> None:
    """Make the names in the directory of ``path`` durable (after a rename or a new file)."""
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_json_atomic(path: str, obj: dict) -> None:
    """Replace ``path`` with ``obj`` as JSON (owner-only), durably: readers see the old record
    or the new one, never a part."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(obj, indent=1).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path)
