"""verify files --progress: 5.4.8 reports of the bytes compared, stdout kept for them."""
import json
import os
import shutil
import subprocess
import sys

from smsrepl.control.progress import validate_report

CLI = [sys.executable, "-m", "smsrepl"]


def test_json_progress_reports_the_bytes_compared_and_the_result_goes_to_stderr(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    sizes = [0, 1000, 70 << 20, 3 << 20]  # one large file: read in steps, each reported
    for i, size in enumerate(sizes):
        (src / "d" / f"f{i}").write_bytes(os.urandom(size))
    shutil.copytree(src, dst)
    cp = subprocess.run(CLI + ["verify", "files", str(src), str(dst), "--progress", "json"],
                        capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    reports = [json.loads(line) for line in cp.stdout.splitlines()]
    assert reports, cp.stdout
    for rep in reports:
        validate_report(rep, require_all=False)
        assert rep["totalsize"] == 2 * sum(sizes) and "consistency check" in rep["process_trace"]
    assert reports[-1]["progress"] == 100 and reports[-1]["replicatesize"] == 2 * sum(sizes)
    assert [r["replicatesize"] for r in reports] == sorted(r["replicatesize"] for r in reports)
    assert json.loads(cp.stderr.strip().splitlines()[-1])["check_result"] == "consistent"
    bar = subprocess.run(CLI + ["verify", "files", str(src), str(dst), "--progress", "bar"],
                         capture_output=True, text=True)
    assert bar.returncode == 0 and json.loads(bar.stdout)["check_result"] == "consistent"
    assert "B/s" in bar.stderr or "B " in bar.stderr, bar.stderr
