"""The file-tree kernels used from plain C, without Python's headers or interpreter
(c/tree_cache_check.c): a scan kernel with a cache of its own, the cache's init, stats,
clear and destroy, and records byte-identical to the extension's scan_dir."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest

try:
    from smsrepl._native import _core as native
except ImportError:  # pragma: no cover
    native = None

NATIVE = Path(__file__).resolve().parents[2] / "src" / "smsrepl" / "_native"
CHECK = Path(__file__).resolve().parent / "c" / "tree_cache_check.c"
KERNELS = ["fstree_record.c", "fstree_cache.c", "fstree_scan.c"]


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    if not shutil.which(cc[0]):
        cc = ["cc"]
    if not shutil.which(cc[0]):
        pytest.skip("no C compiler")
    exe = tmp_path_factory.mktemp("c") / "tree_cache_check"
    r = subprocess.run([*cc, "-O1", "-std=c11", "-pthread", "-Wall", "-Wextra", "-Werror", f"-I{NATIVE}", str(CHECK),
                        *(str(NATIVE / k) for k in KERNELS), "-o", str(exe), "-pthread"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return exe


def test_scan_and_cache_from_plain_c(program, tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    for i in range(12):
        (root / f"f{i:02}").write_bytes(b"x" * i)
    (root / "sub").mkdir()
    os.symlink("f01", root / "link")
    time.sleep(0.05)  # past the ctime clock's tick: a min_age of 0 keeps them all
    out = tmp_path / "records"
    r = subprocess.run([str(program), str(root), str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = dict((line.split()[0], tuple(int(v) for v in line.split()[1:])) for line in r.stdout.splitlines())
    assert got == {"first": (14, 0), "second": (14, 14), "same": (1,), "cleared": (0, 0), "uncached": (0, 0),
                   "process": (0, 0)}
    if native is not None:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert native.scan_dir(fd, b"p", os.fsencode(root))[0] == out.read_bytes()
        finally:
            os.close(fd)
