"""`verify block` reads a device coherently: a mounted ext4 writes around the device's page cache,
and the check must compare what the disk holds, not pages an earlier reader left cached.

The driver (verifydisk.py) runs in a private mount namespace as root with a loop device of its
own; it needs losetup, unshare, mkfs.ext4, mount and dd, and the test skips naming what is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = ("losetup", "unshare", "mkfs.ext4", "mount", "umount", "dd")


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop devices, mounts)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    probe = subprocess.run(["losetup", "-f"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"no free loop device: {probe.stderr.strip()}"
    return None


WHY_NOT = _why_not()
pytestmark = [pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]


@pytest.mark.reliability("live block sources", "verify block of a device a mounted ext4 writes to")
def test_verify_block_of_a_mounted_device_compares_what_the_disk_holds(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    cp = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable,
                         os.path.join(HERE, "verifydisk.py"), json.dumps({"work": str(work)})],
                        capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stderr[-3000:]
    v = json.loads(cp.stdout.strip().splitlines()[-1])
    # the device's page cache really was stale: a buffered read would have compared old data
    assert v["stale_blocks"] > 0, v
    disk, stale = v["verify_disk"], v["verify_stale"]
    assert disk["rc"] == 0 and disk["result"]["check_result"] == "consistent", disk
    assert stale["rc"] == 1, stale
    entry = stale["result"]["consistency_result"][0]
    assert entry["num_different_files"] == v["stale_blocks"], (v["stale_blocks"], stale)
    assert entry["num_target_miss_files"] == 0
