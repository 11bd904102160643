"""Full target disks: one receiver serves every rerun once space is freed (fullfs.py).

A loop-mounted ext4 (block targets written with O_DIRECT there, where a failed
write used to keep the target claimed until the receiver restarted) and a
tmpfs. The default run takes 2 runs of each; SMSREPL_SLOW=1 takes 10.
"""
import os
import re

import pytest

from test_live_block import WHY_NOT, _drive

SLOW = bool(os.environ.get("SMSREPL_SLOW"))
pytestmark = [pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]


@pytest.mark.reliability("receiver under faults", "full target file system, then space freed: same receiver")
@pytest.mark.parametrize("fs", ["ext4", "tmpfs"])
def test_after_a_full_disk_the_same_receiver_completes_the_reruns(tmp_path, certkey_file, fs):
    v = _drive("fullfs.py", tmp_path, certkey_file, fs=fs, runs=10 if SLOW else 2, seed=len(fs))
    log = "\n".join(v.get("receiver_log", []))
    assert v["receiver_alive"] and v["receiver_tracebacks"] == 0, log
    for r in v["runs"]:
        why = f"{r}\nreceiver:\n{log}"
        for kind in ("files", "block"):
            # full: exit 3 (retry later), one line naming the problem
            assert r[f"{kind}_full_rc"] == 3, why
            err = r[f"{kind}_full_stderr"]
            assert "SMS.2007" in err and "No space left on device" in err and "\n" not in err, why
            # it names the target, its path, and the file (in the tree) or the offset written
            name = f"{'tree' if kind == 'files' else 'disk'}{r['run']}"
            assert re.search(rf"target '{name}' \(/\S+/targets/{name}\): ", err), why
            if kind == "files":
                assert re.search(r"writing 'f\d\d' \(", err) or "syncfs" in err, why
            else:
                assert re.search(r"write failed at offset \d+", err) or "sync failed" in err, why
            assert r[f"{kind}_rerun_rc"] == 0, why
        assert r["tree_identical"] and r["disk_identical"] and r["temporaries"] == [], why
