"""smsrepl imports numpy without the BLAS thread pool it never uses (smsrepl/_lazy.py)."""
import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, os
from smsrepl._lazy import np
np.zeros(1)
print(json.dumps({"threads": len(os.listdir("/proc/self/task")), "env": os.environ.get("OPENBLAS_NUM_THREADS")}))
"""


def probe(**env_extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    env.update(env_extra)
    cp = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_numpy_starts_no_blas_threads_and_leaves_the_environment_as_it_was():
    got = probe()
    assert got["threads"] == 1  # the main thread: no BLAS workers (one per CPU otherwise)
    assert got["env"] is None  # processes started later get the environment unchanged


def test_a_thread_count_the_user_chose_stays():
    assert probe(OPENBLAS_NUM_THREADS="2")["env"] == "2"


def test_numpy_is_imported_through_lazy_only():
    """Elsewhere, an import of numpy would load it with its BLAS threads (typing-only imports aside)."""
    import ast
    import pathlib

    pkg = pathlib.Path(__file__).resolve().parents[1] / "src" / "smsrepl"
    found = []
    for path in sorted(pkg.rglob("*.py")):
        if path.name == "_lazy.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)
                       if n not in node.orelse}
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n.split(".")[0] == "numpy" for n in names) and id(node) not in typing_only:
                found.append(f"{path.relative_to(pkg)}:{node.lineno}")
    assert not found, f"import numpy through smsrepl._lazy: {found}"
