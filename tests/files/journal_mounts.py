"""A change journal while file systems are mounted in its tree and unmounted from it; prints a
JSON verdict.

    unshare -m --propagation private python tests/files/journal_mounts.py WORK

Exit 99 where a tmpfs cannot be mounted. Each step is one round's take(): after a tmpfs is
mounted at WORK/src/sub, after a file is written there, after it is unmounted, and after a
change with no mount change. Each entry is the round's whole_because, or its directories.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from smsrepl.files.journal import ChangeJournal


def take(j: ChangeJournal, round_id: int):
    c = j.take(round_id=round_id)
    j.completed(round_id + 1)
    return c.whole_because or sorted(d.decode() for d, _ in c.dirs)


def main() -> int:
    src = os.path.join(sys.argv[1], "src")
    os.makedirs(os.path.join(src, "sub"))
    os.makedirs(os.path.join(src, "plain"))
    j = ChangeJournal(src, whole_every=0)
    steps = {"first": take(j, 0)}
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", os.path.join(src, "sub")]).returncode:
        return 99
    steps["mounted"] = take(j, 1)
    with open(os.path.join(src, "sub", "on-tmpfs"), "w") as fh:
        fh.write("x")
    steps["written_on_the_mount"] = take(j, 2)
    subprocess.run(["umount", os.path.join(src, "sub")], check=True)
    steps["unmounted"] = take(j, 3)
    with open(os.path.join(src, "plain", "f"), "w") as fh:
        fh.write("y")
    steps["written_after"] = take(j, 4)
    steps["file_systems"] = len(j.file_systems)
    j.close()
    print(json.dumps(steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
