"""Tree rounds between local directories, with rsync as the oracle: after a round,
``rsync -aHAXn --numeric-ids --checksum -i SRC/ DST/`` must print nothing."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from smsrepl.errors import RemoteProtocolError, TargetWriteError
from smsrepl.files.apply import TreeWriter
from smsrepl.files.names import TEMP_RE, check_path
from smsrepl.files.local import sync_tree
from smsrepl.files.rules import PathRules
from smsrepl.files.scan import Entry, walk

from .trees import oracle, rich_tree

pytestmark = pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync (the oracle) is not installed")


def test_full_round_matches_rsync_oracle_and_keeps_holes(tmp_path):
    src = rich_tree(tmp_path / "src")
    dst = tmp_path / "dst"
    stats = sync_tree(src, str(dst))
    assert oracle(os.fsdecode(src), dst) == ""
    st = os.stat(dst / "sparse.img")
    assert st.st_blocks * 512 < 1 << 20  # 8 MiB apparent, one data block
    assert stats.files_sent >= 8 and not stats.reported or all("device" in r for r in stats.reported)
    assert os.path.islink(dst / "abs-link") and os.readlink(dst / "abs-link") == "/etc/passwd"
    again = sync_tree(src, str(dst), kind="sync")  # nothing changed: nothing sent
    assert again.files_sent == 0 and again.deleted == 0 and oracle(os.fsdecode(src), dst) == ""


def test_sync_round_applies_changes_deletes_and_respects_excludes(tmp_path):
    src = rich_tree(tmp_path / "src")
    dst = tmp_path / "dst"
    sync_tree(src, str(dst))
    s = os.fsdecode(src)
    with open(f"{s}/with space/plain.txt", "r+b") as fh:  # same size, new content and time
        fh.seek(10)
        fh.write(b"CHANGED")
    os.unlink(f"{s}/rel-link")
    os.symlink("sparse.img", f"{s}/rel-link")  # a link that points elsewhere now
    shutil.rmtree(f"{s}/with space/deeper")  # a whole subtree gone
    os.rename(f"{s}/empty dir", f"{s}/renamed dir")
    os.makedirs(f"{s}/logs")
    open(f"{s}/logs/app.log", "w").write("new log")
    os.unlink(f"{s}/fifo")
    os.makedirs(f"{s}/fifo")  # a fifo became a directory
    os.chmod(f"{s}/sparse.img", 0o600)
    os.makedirs(dst / "logs", exist_ok=True)
    open(dst / "logs" / "target-only.log", "w").write("keep me: excluded on the source side")
    rules = PathRules.from_configurations({"configurations": [
        {"config_key": "SYNC_EXCLUDE_PATH", "config_value": "/logs"}]})
    stats = sync_tree(src, str(dst), rules=rules, kind="sync")
    out = oracle(s, dst, "--exclude=/logs", "--delete")
    assert out == "", out
    assert (dst / "logs" / "target-only.log").exists() and not (dst / "logs" / "app.log").exists()
    assert not (dst / "with space" / "deeper").exists() and stats.deleted >= 2


def test_unchanged_size_and_mtime_is_skipped_unless_checksum(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"a" * 100)
    sync_tree(str(src), str(dst))
    st = os.stat(src / "f")
    (src / "f").write_bytes(b"b" * 100)
    os.utime(src / "f", ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: a quick check misses it
    assert sync_tree(str(src), str(dst), kind="sync").files_sent == 0
    assert (dst / "f").read_bytes() == b"a" * 100
    assert sync_tree(str(src), str(dst), kind="sync", checksum=True).files_sent == 1
    assert oracle(str(src), dst) == ""


def test_names_that_escape_the_root_are_refused(tmp_path):
    for bad in (b"/etc/passwd", b"../x", b"a/../../x", b"a//b", b"./a", b"a/\0b", b"", b"x" * 256):
        with pytest.raises(RemoteProtocolError):
            check_path(bad)
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "evil")  # a symlink in the target where the sender names a directory
    entry = Entry(b"evil/file", "file", 0o644, 0, 0, 3, 0, 0, 0, 1, 0)
    with TreeWriter(str(root)) as w:
        with pytest.raises(TargetWriteError, match="symlink or not a directory"):
            w.write_file(entry, [b"abc"])
        with pytest.raises(RemoteProtocolError):
            w.write_file(Entry(b"../outside/file", "file", 0o644, 0, 0, 3, 0, 0, 0, 1, 0), [b"abc"])
    assert os.listdir(outside) == []


def test_a_file_changing_while_read_is_read_again(tmp_path, monkeypatch):
    from smsrepl.files import liveread

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"1" * 5000)
    real_read, writers = os.read, []

    def read(fd, n):  # another process opens the file to write while the first read is under way
        data = real_read(fd, n)
        if not writers:
            writers.append(None)  # Popen reads a pipe with os.read too
            writers[0] = subprocess.Popen([sys.executable, "-c", f"open({str(src / 'f')!r}, 'ab').write(b'2' * 10)"])
            deadline = time.monotonic() + 30
            while liveread.lease_held(fd) and time.monotonic() < deadline:  # its open() breaks the read lease
                time.sleep(0.01)
        return data

    monkeypatch.setattr(liveread.os, "read", read)
    stats = sync_tree(str(src), str(dst))
    monkeypatch.undo()
    assert writers[0].wait(30) == 0
    assert stats.reread >= 1  # the broken lease: the first read was not trusted
    assert (dst / "f").read_bytes() in (b"1" * 5000, b"1" * 5000 + b"2" * 10)  # one version or the other
    again = sync_tree(str(src), str(dst))
    assert (dst / "f").read_bytes() == b"1" * 5000 + b"2" * 10 and again.changed_during_read == 0
    assert oracle(str(src), dst) == ""


KILLER = """
import sys
from smsrepl.files.local import sync_tree
sync_tree(sys.argv[1], sys.argv[2])
"""


@pytest.mark.reliability("fault", "kill during a local file round (no half-written file)")
@pytest.mark.parametrize("seed", range(6))
def test_killed_round_leaves_no_half_file_and_the_next_run_cleans_up(tmp_path, seed):
    rng = random.Random(seed)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(60):
        (src / f"f{i:03}").write_bytes(rng.randbytes(rng.randint(1, 3 << 20)))
    proc = subprocess.Popen([sys.executable, "-c", KILLER, str(src), str(dst)])
    time.sleep(rng.uniform(0.1, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    temps = 0
    if dst.exists():
        for name in os.listdir(dst):  # every final name holds a whole file
            if TEMP_RE.match(name.encode()):
                temps += 1
            else:
                assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    stats = sync_tree(str(src), str(dst))
    assert not [n for n in os.listdir(dst) if TEMP_RE.match(n.encode())]
    assert oracle(str(src), dst) == ""
    assert stats.temporaries_removed == temps
    assert [e.path for e in walk(str(dst))] == [e.path for e in walk(str(src))]
