"""mypy reports no error on src/ (configuration in pyproject.toml; numpy is typed through the
lazy import in smsrepl/_lazy.py)."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_mypy_is_clean_on_src(tmp_path):
    pytest.importorskip("mypy")
    cp = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"),
                         "--config-file", str(ROOT / "pyproject.toml"), str(ROOT / "src" / "smsrepl")],
                        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert cp.returncode == 0, cp.stdout[-6000:] + cp.stderr[-2000:]
