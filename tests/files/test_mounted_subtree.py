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


def test_a_directory_whose_file_system_cannot_be_kept_is_not_left_open(tmp_path, monkeypatch):
    """The descriptor kept of another file system is a dup of the directory's: where that fails
    (no descriptors left), the directory's own is closed, not leaked with the error."""
    from smsrepl.files.targetroot import TargetRoot

    (tmp_path / "sub").mkdir()
    root = TargetRoot(str(tmp_path))
    root.root_dev = -1  # every directory below is on "another" file system
    before = len(os.listdir("/proc/self/fd"))

    def no_descriptors(fd):
        raise OSError(24, os.strerror(24))

    monkeypatch.setattr("smsrepl.files.targetroot.os.dup", no_descriptors)
    with pytest.raises(OSError):
        root.dir_fd((b"sub",))
    monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) == before
    root._close_dirs()
    os.close(root.root_fd)
