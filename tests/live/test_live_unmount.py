"""A continuous file sender whose source file system is unmounted under it (unmount.py).

The deletion guard of a continuous sender's later rounds lets a tree turn over or move but
stops a source that collapsed: on a real ext4, a directory holding most of the tree is renamed
(followed), then the file system is unmounted, leaving its empty mount point (stopped at the
next round, exit 2, nothing deleted). Needs root, losetup, unshare, mkfs.ext4 and mount.
"""
import pytest

from test_live_block import WHY_NOT, _drive

pytestmark = [pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]


@pytest.mark.parametrize("journal", ["off", "auto"])
def test_a_source_unmounted_under_a_continuous_sender_stops_it_with_the_target_kept(tmp_path, certkey_file, journal):
    v = _drive("unmount.py", tmp_path, certkey_file, timeout=300, journal=journal)
    assert v["first"]["entries"] == 165 and v["first"]["files_sent"] == 160, v
    moved = v["moved"]
    assert moved is not None, v  # the rename of most of the tree did not stop the sender
    assert moved["deleted"] == 121 and moved["files_sent"] == 120 and v["identical_after_move"], v
    assert v["after_unmount"] is None and not v["cutover_needed"], v  # the next round stopped it
    assert v["sender_rc"] == 2, v
    assert ("would delete 164 of 164 entries on target 't' (more than half), and the source holds 1 entries "
            "where the last whole-tree round saw 165: source unmounted or emptied? nothing was changed"
            in v["sender_stderr"]), v
    assert v["target_kept"] and v["kept_files"] == 160, v
