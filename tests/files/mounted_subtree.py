"""A file round into a target whose subdirectory is another file system; prints a JSON verdict.

    unshare -m --propagation private python tests/files/mounted_subtree.py WORK

A tmpfs is mounted at WORK/dst/sub (exit 99 where it cannot be), and a tree of small files,
files in a new directory and a large file is sent there over three connections. The verdict
lists the file systems the receiver's syncfs calls reached, and those its files went to.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from smsrepl.files import durable
from smsrepl.lab.certs import make_bundle
from smsrepl.transport.file_sender import FileSender
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.tls import client_context, server_context


def main() -> int:
    work = sys.argv[1]
    src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
    for d in ("src/sub/new", "dst/sub"):
        os.makedirs(os.path.join(work, d))
    for i in range(40):
        with open(os.path.join(src, "sub", f"f{i}"), "wb") as fh:
            fh.write(b"x" * 1000 * i)
        with open(os.path.join(src, "sub", "new", f"g{i}"), "wb") as fh:
            fh.write(b"y" * 1000 * i)
    with open(os.path.join(src, "sub", "big"), "wb") as fh:
        fh.write(os.urandom(3 << 20))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", os.path.join(dst, "sub")]).returncode:
        return 99
    synced: set[int] = set()
    real = durable._syncfs

    def syncfs(fd: int) -> None:
        synced.add(os.fstat(fd).st_dev)
        real(fd)

    durable._syncfs = syncfs
    bundle = make_bundle()
    rx = Receiver({"tree": dst}, server_context(bundle), os.path.join(work, "rx"), create=True)
    addr = rx.start()
    try:
        result = FileSender(src, "tree", addr, client_context(bundle), level=0, streams=3).run()
    finally:
        rx.stop()
    written = {os.stat(os.path.join(dst, "sub", n)).st_dev for n in ("f1", "big", "new/g1")}
    print(json.dumps({"files_sent": result.stats.files_sent, "written_to": sorted(written),
                      "synced": sorted(synced)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
