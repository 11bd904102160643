"""`smsrepl verify block` from the command line: exit 0 for a copy, 1 with the differing ranges or
the part a truncated target lacks, 2 for a target it cannot read; --progress json puts only
5.4.8 reports on stdout (the result on stderr), --progress bar draws on stderr; the images are
never written."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from smsrepl import cli
from smsrepl.blocks import imagecompare
from smsrepl.control.progress import validate_report
from smsrepl.lab.testdata import write_image

from .procs import CLI, ReceiverProc, send, sha256, summary

MiB = 1 << 20
SIZE = 6 * MiB + 5000  # not a whole number of blocks


def verify(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["verify", "block", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def pair(tmp_path):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_image(str(src), SIZE, seed=4)
    dst.write_bytes(src.read_bytes())
    return src, dst


def untouched(*paths):
    """(content digest, mtime) of each path: what a check must leave as it found it."""
    return [(sha256(str(p)), os.stat(p).st_mtime_ns) for p in paths]


def flip(path, offset: int, n: int = 1) -> None:
    """Invert ``n`` bytes at ``offset``: they differ from what was there, whatever it was."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = fh.read(n)
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in data))


def entry(result: dict) -> dict:
    [e] = result["consistency_result"]
    return e


def test_a_copy_is_consistent(pair):
    before = untouched(*pair)
    cp = verify(*pair)
    assert cp.returncode == 0, cp.stderr
    assert cp.stderr == ""
    result = json.loads(cp.stdout)
    assert result["check_result"] == "consistent" and result["different_ranges"] == []
    assert entry(result) == {"dir_check": str(pair[1]), "num_total_files": -(-SIZE // 4096),
                             "num_different_files": 0, "num_target_miss_files": 0, "num_target_more_files": 0}
    assert untouched(*pair) == before


def test_one_differing_block_exits_1_with_its_range(pair):
    src, dst = pair
    flip(dst, 3 * MiB + 4096 + 17)
    before = untouched(src, dst)
    cp = verify(src, dst)
    assert cp.returncode == 1, cp.stderr
    result = json.loads(cp.stdout)
    assert result["check_result"] == "inconsistent"
    assert entry(result)["num_different_files"] == 1 and entry(result)["num_target_miss_files"] == 0
    assert result["different_ranges"] == [[3 * MiB + 4096, 4096]]
    assert untouched(src, dst) == before


def test_a_truncated_target_misses_what_it_lacks(pair):
    src, dst = pair
    os.truncate(dst, 4 * MiB + 100)  # 100 bytes into a block: that block is not there either
    cp = verify(src, dst)
    assert cp.returncode == 1, cp.stderr
    result = json.loads(cp.stdout)
    assert entry(result)["num_different_files"] == 0
    assert entry(result)["num_target_miss_files"] == -(-SIZE // 4096) - 4 * MiB // 4096
    assert result["different_ranges"] == [[4 * MiB, SIZE - 4 * MiB]]
    assert os.path.getsize(dst) == 4 * MiB + 100


def test_progress_json_is_reports_alone_on_stdout_and_the_result_on_stderr(pair):
    src, dst = pair
    flip(dst, MiB + 4095, 2)  # the last byte of one block, the first of the next
    cp = verify(src, dst, "--progress", "json")
    assert cp.returncode == 1, cp.stderr
    reports = [json.loads(line) for line in cp.stdout.splitlines()]
    assert len(reports) >= 2
    for rep in reports:
        validate_report(rep, require_all=False)
        assert rep["subtask_name"] == "SYNC_LINUX_BLOCK" and rep["totalsize"] == SIZE
    assert reports[0]["progress"] == 0 and reports[0]["replicatesize"] == 0
    assert reports[-1]["progress"] == 100 and reports[-1]["replicatesize"] == SIZE
    assert "2 4 KiB blocks different" in reports[-1]["process_trace"]
    result = json.loads(cp.stderr.splitlines()[-1])
    assert entry(result)["num_different_files"] == 2 and result["different_ranges"] == [[MiB, 8192]]


def test_progress_bar_draws_on_stderr_and_leaves_stdout_the_result(pair):
    cp = verify(*pair, "--progress", "bar")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["check_result"] == "consistent"
    assert "100%" in cp.stderr and "SYNC_LINUX_BLOCK" in cp.stderr
    assert "on the wire" not in cp.stderr  # a local check sends nothing


def test_progress_json_reports_about_every_second_of_a_long_check(pair, monkeypatch, capsys):
    """A check slowed to ~3 s (each read sleeps): reports come while it runs, not only at its ends."""
    monkeypatch.setattr(imagecompare, "CHUNK", 256 << 10)
    original = imagecompare.BlockSource.readinto

    def slow(self, buf, offset):
        time.sleep(0.12)
        return original(self, buf, offset)

    monkeypatch.setattr(imagecompare.BlockSource, "readinto", slow)
    t0 = time.monotonic()
    assert cli.main(["verify", "block", str(pair[0]), str(pair[1]), "--progress", "json"]) == 0
    took = time.monotonic() - t0
    out, err = capsys.readouterr()
    reports = [json.loads(line) for line in out.splitlines()]
    for rep in reports:
        validate_report(rep)
    middle = [r for r in reports[1:-1] if 0 < r["replicatesize"] < SIZE]
    assert len(middle) >= int(took) - 1 >= 1, (took, [r["replicatesize"] for r in reports])
    sizes = [r["replicatesize"] for r in reports]
    assert sizes == sorted(sizes)
    assert json.loads(err.splitlines()[-1])["check_result"] == "consistent"


def test_an_unreadable_target_is_one_line_exit_2_and_no_reports(pair, tmp_path):
    (tmp_path / "adir").mkdir()
    cp = verify(pair[0], tmp_path / "adir", "--progress", "json")
    assert cp.returncode == 2
    assert cp.stdout == ""
    [line] = cp.stderr.splitlines()
    assert str(tmp_path / "adir") in line and "target" in line, line


def test_remote_check_reports_progress_and_builds_the_same_result(tmp_path, certkey_file):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_image(str(src), SIZE, seed=6)
    rx = ReceiverProc(certkey_file, {"disk0": str(dst)}, str(tmp_path / "rx-state"))
    remote = ("--to", rx.address, "--target", "disk0", "--certkey", certkey_file, "--progress", "json")
    try:
        before = verify(src, *remote)  # nothing copied yet: every block counts as different
        summary(send(str(src), rx.address, certkey_file, str(tmp_path / "tx-state"), "disk0"))
        cp = verify(src, *remote)
    finally:
        rx.stop()
    assert before.returncode == 1, before.stderr
    reports = [json.loads(line) for line in before.stdout.splitlines()]
    blocks = -(-SIZE // 4096)
    assert reports[-1]["progress"] == 100 and f"{blocks} 4 KiB blocks different" in reports[-1]["process_trace"]
    assert entry(json.loads(before.stderr.splitlines()[-1]))["num_different_files"] == blocks
    assert cp.returncode == 0, cp.stderr
    reports = [json.loads(line) for line in cp.stdout.splitlines()]
    for rep in reports:
        validate_report(rep)
    assert reports[-1]["progress"] == 100 and reports[-1]["totalsize"] == SIZE
    result = json.loads(cp.stderr.splitlines()[-1])
    assert set(result) == {"finished_time", "check_result", "consistency_result"}
    assert entry(result) == {"dir_check": "disk0", "num_total_files": -(-SIZE // 4096), "num_different_files": 0,
                             "num_target_miss_files": 0, "num_target_more_files": 0}
