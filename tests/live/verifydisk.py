"""`verify block` of a device a mounted ext4 writes to: it must see what the disk holds. Prints a JSON verdict.

    unshare -m --propagation private python tests/live/verifydisk.py CONFIG_JSON

CONFIG: work, and optionally size_mib (64).

A loop device gets an ext4, mounted here; files are written and synced, then the whole device
is read through its page cache (as a buffered reader would: the pages stay cached), then the
files are rewritten and synced again. ext4 writes file data to the disk around the device's
page cache, so those cached pages are now stale. Then:

* ``disk``: the device as its disk holds it (dd with O_DIRECT);
* ``stale``: the device read through its page cache (dd without O_DIRECT);
* ``stale_blocks``: how many 4 KiB blocks the two differ in (> 0: the cache really is stale);
* ``verify_disk`` / ``verify_stale``: exit code and result of `smsrepl verify block DEVICE X`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from lab import CLI, diff_blocks, direct_copy, loop_device, run


def write_files(root: str, seed: int, count: int = 40, size: int = 256 << 10) -> None:
    for i in range(count):
        with open(os.path.join(root, f"f{i:03d}"), "wb") as fh:
            fh.write(bytes([(seed * 31 + i) % 251 + 1]) * size)
    run("sync")


def verify(dev: str, copy: str) -> dict:
    cp = subprocess.run(CLI + ["verify", "block", dev, copy], capture_output=True, text=True)
    return {"rc": cp.returncode, "result": json.loads(cp.stdout) if cp.stdout.strip() else None,
            "stderr": cp.stderr.strip()[-2000:]}


def main() -> int:
    cfg = json.loads(sys.argv[1])
    work = cfg["work"]
    size = int(cfg.get("size_mib", 64)) << 20
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    dev = loop_device(os.path.join(work, "disk.img"), size)
    mounted = False
    verdict: dict = {}
    try:
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
        run("mount", dev, mnt)
        mounted = True
        write_files(mnt, 1)
        run("dd", f"if={dev}", "of=/dev/null", "bs=1M", "status=none")  # the device's page cache, filled
        write_files(mnt, 2)  # through the file system: around that cache
        disk, stale = os.path.join(work, "disk.copy"), os.path.join(work, "stale.copy")
        direct_copy(dev, disk)
        run("dd", f"if={dev}", f"of={stale}", "bs=1M", "status=none")
        verdict["stale_blocks"] = diff_blocks(disk, stale)
        verdict["verify_disk"] = verify(dev, disk)
        verdict["verify_stale"] = verify(dev, stale)
    finally:
        if mounted:
            run("umount", mnt, check=False)
        run("losetup", "-d", dev, check=False)
    print(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
