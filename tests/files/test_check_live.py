"""A check of a tree that a writer churns while it is read: it never fails or hangs, says
what it saw, and once the writer stops and a round runs, finds the copy consistent (as
rclone does)."""
import json
import os
import random
import shutil
import subprocess
import sys
import threading

import pytest

from smsrepl.files.local import sync_tree

from .trees import as_nobody

CLI = [sys.executable, "-m", "smsrepl"]


def churn(root, stop, seed=5):
    rng = random.Random(seed)
    while not stop.is_set():
        d = root / f"d{rng.randrange(8)}"
        d.mkdir(exist_ok=True)
        p = d / f"f{rng.randrange(60)}"
        action = rng.random()
        try:
            if action < 0.5:
                p.write_bytes(os.urandom(rng.randrange(1, 200_000)))
            elif action < 0.7:
                p.unlink(missing_ok=True)
            elif action < 0.85:
                os.replace(p, d / f"f{rng.randrange(60)}")
            else:
                with open(p, "ab") as fh:
                    fh.write(b"appended" * rng.randrange(1, 500))
        except (FileNotFoundError, NotADirectoryError):
            pass


def test_a_check_of_a_churned_tree_reports_and_the_next_round_makes_it_consistent(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    stop = threading.Event()
    writer = threading.Thread(target=churn, args=(src, stop), daemon=True)
    writer.start()
    try:
        sync_tree(str(src), str(dst))
        for _ in range(3):
            cp = subprocess.run(CLI + ["verify", "files", str(src), str(dst), "--list"], capture_output=True,
                                text=True, timeout=120)
            assert cp.returncode in (0, 1), cp.stderr
            body = json.loads(cp.stdout)
            assert body["check_result"] == ("consistent" if cp.returncode == 0 else "inconsistent")
            assert "Traceback" not in cp.stderr
    finally:
        stop.set()
        writer.join()
    sync_tree(str(src), str(dst))
    cp = subprocess.run(CLI + ["verify", "files", str(src), str(dst)], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    if shutil.which("rclone"):
        rc = subprocess.run(["rclone", "check", str(src), str(dst), "--config", "/dev/null"], capture_output=True)
        assert rc.returncode == 0, rc.stderr
    with open(next(p for p in sorted(src.rglob("f*")) if p.stat().st_size > 100), "r+b") as fh:
        fh.seek(50)
        byte = fh.read(1)
        fh.seek(50)
        fh.write(bytes([byte[0] ^ 0xFF]))  # same size, same second: only the content tells
    cp = subprocess.run(CLI + ["verify", "files", str(src), str(dst)], capture_output=True, text=True)
    assert cp.returncode == 1 and json.loads(cp.stdout)["consistency_result"][0]["num_different_files"] == 1


@pytest.mark.parametrize("where", ["source", "target"])
def test_an_unreadable_file_counts_as_different_and_is_named(where):
    import pathlib
    import tempfile

    from smsrepl.files.compare import compare_trees

    base = pathlib.Path(tempfile.mkdtemp(prefix="smsrepl-check-"))  # pytest's tmp_path is root's alone
    try:
        os.chmod(base, 0o755)
        src, dst = base / "src", base / "dst"
        (src / "d").mkdir(parents=True)
        (src / "d" / "secret").write_bytes(b"s")
        (src / "d" / "open").write_bytes(b"o")
        shutil.copytree(src, dst)
        compare_trees(str(src), str(dst))  # what the check imports on first use is imported as root:
        # nobody may not read this checkout (a clone in a private directory)
        os.chmod((src if where == "source" else dst) / "d" / "secret", 0)
        def check():
            body, checks = compare_trees(str(src), str(dst))
            return body, checks[0].combined()

        body, rows = as_nobody(check)
    finally:
        shutil.rmtree(base)
    assert body["check_result"] == "inconsistent" and body["consistency_result"][0]["num_different_files"] == 1
    assert any("could not read d/secret" in n and "ermission denied" in n for n in body["notes"]), body
    assert rows == ["= d/open", "! d/secret"]
