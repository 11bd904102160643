"""A directory target that spans file systems (a disk mounted under it, as a migrated server's
/var or /boot): a file is named only after a syncfs of the file system it was written to, not
only the target root's."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

HELPER = os.path.join(os.path.dirname(__file__), "mounted_subtree.py")
WHY_NOT = ("needs root" if os.geteuid() != 0 else
           "needs unshare and mount" if not (shutil.which("unshare") and shutil.which("mount")) else None)


@pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")
def test_files_on_a_file_system_mounted_under_the_target_are_synced_before_they_are_named(tmp_path):
    cp = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, HELPER, str(tmp_path)],
                        capture_output=True, text=True, timeout=60)
    if cp.returncode == 99:
        pytest.skip("cannot mount a tmpfs in a private mount namespace here")
    assert cp.returncode == 0, cp.stderr
    verdict = json.loads(cp.stdout.splitlines()[-1])
    assert verdict["files_sent"] == 81
    assert set(verdict["written_to"]) <= set(verdict["synced"]), verdict
