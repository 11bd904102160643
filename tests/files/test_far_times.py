"""Modification times beyond what an int64 of nanoseconds holds (after 2262-04-11; ext4 keeps
them to 2446): clamped to that end on both sides, so a round copies the file once and the next
leaves it alone (the native records wrapped 2300 into 1901 and resent it every round; the
pure backend could not pack it)."""
import os

import pytest

from smsrepl.files.local import sync_tree

from .test_source_moves import remote_round

NS_MAX = (1 << 63) - 1
YEAR_2300 = 10_418_000_000 * 10**9  # 2300-02-18, in nanoseconds


@pytest.mark.parametrize("how", ["local", "remote"])
def test_a_time_past_2262_is_copied_clamped_and_left_alone_by_the_next_round(tmp_path, how):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "far").write_bytes(b"far")
    os.utime(src / "far", ns=(YEAR_2300, YEAR_2300))
    if os.stat(src / "far").st_mtime_ns != YEAR_2300:
        pytest.skip("this file system does not keep times past 2262")
    first = sync_tree(str(src), str(dst)) if how == "local" else remote_round(src, dst)
    again = sync_tree(str(src), str(dst)) if how == "local" else remote_round(src, dst)
    assert first.files_sent == 1 and again.files_sent == 0 and again.unchanged == 1
    assert os.stat(dst / "far").st_mtime_ns == NS_MAX and (dst / "far").read_bytes() == b"far"
