"""`smsrepl demo` as a user runs it: a separate process, nothing prepared."""
import subprocess
import sys


def test_demo_runs_the_whole_loop_through_the_agent():
    cp = subprocess.run([sys.executable, "-m", "smsrepl", "demo", "--size-mib", "16"], capture_output=True,
                        text=True, timeout=300)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    out = cp.stdout
    assert "demo finished: targets are identical to the sources" in out
    assert "INIT/replicating -> REPLICATE/replicating -> SYNCING/syncing -> CUTOVERING/cutovering -> " \
           "FINISHED/cutovered" in out
    assert '"num_different_files": 0' in out and "bodies rejected by the field tables: 0" in out
    assert '"progress": 100' in out
