"""durable.py: owner-only state directories and records replaced whole."""
import json
import os
import stat

from smsrepl.durable import fsync_dir, private_makedirs, write_json_atomic


def test_private_makedirs_makes_every_new_parent_owner_only(tmp_path):
    path = tmp_path / "a" / "b" / "c"
    private_makedirs(str(path))
    for p in (tmp_path / "a", tmp_path / "a" / "b", path):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700
    private_makedirs(str(path))  # already there: nothing to do


def test_write_json_atomic_replaces_the_record_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    write_json_atomic(str(path), {"round_id": 1})
    write_json_atomic(str(path), {"round_id": 2, "complete": True})
    assert json.loads(path.read_text()) == {"round_id": 2, "complete": True}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["state.json"]
    fsync_dir(str(path))
