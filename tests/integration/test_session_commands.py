"""Session commands (5.5.1/5.5.2) on a real session: start, pause, resume, sync, skip, delete, error."""
import os
import time

import pytest

from smsrepl.throttle import SpeedSchedule
from smsrepl.replication.session import BlockSession
from smsrepl.control.state import SessionState, is_allowed
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.sender import Sender
from smsrepl.transport.tls import client_context, server_context

from .procs import sha256

SIZE = 32_000_000  # 3.2 s at SLOW: a STOP at the first checkpoint (8 MiB) is far from the end
#: 80 Mbit/s: the 16 MB copy takes about 1.6 s, long enough to pause it in the middle
SLOW = SpeedSchedule.from_json({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 80}]})


@pytest.fixture
def rx(tmp_path, bundle):
    receiver = Receiver({"disk0": str(tmp_path / "target.img")}, server_context(bundle), str(tmp_path / "rx"), create=True)
    addr = receiver.start()
    yield addr
    receiver.stop()


def _session(tmp_path, bundle, addr, pairs, src, **kw):
    def make(states):
        return Sender(src, "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0,
                      speed_limit=SLOW, states=states, **kw)

    return BlockSession(make, on_state=pairs.append)


def _wait_for_checkpoint(session, timeout=30.0):
    """Until the receiver has made some of the round durable (a busy machine may take seconds to
    start the session, so a fixed sleep could STOP it before its first checkpoint)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sender = session._sender
        if sender is not None and sender.replies.acked > 0:
            return
        time.sleep(0.02)
    pytest.fail(f"no checkpoint from the receiver within {timeout} s")


def test_start_stop_resume_sync_skip_delete(tmp_path, bundle, rx):
    src = str(tmp_path / "src.img")
    with open(src, "wb") as fh:
        fh.write(os.urandom(SIZE))
    pairs = []
    s = _session(tmp_path, bundle, rx, pairs, src)
    assert s.command("SYNC").ok is False  # nothing copied yet
    assert s.command("START").ok
    assert s.command("START").ok is False  # already running
    _wait_for_checkpoint(s)
    res = s.command("STOP")
    assert res.ok and res.to_json()["result"] == "success", res
    assert s.states.state is SessionState.REPL_STOPPED and not s.running
    assert s.last_error is None and s.last_result is None  # paused, not failed, not finished
    assert sha256(src) != sha256(str(tmp_path / "target.img"))
    assert s.command("START").ok  # resume from the receiver's checkpoint
    assert s.wait(30)
    assert s.last_result is not None and s.last_result.resumed_from > 0
    assert sha256(src) == sha256(str(tmp_path / "target.img"))
    assert s.states.state is SessionState.SYNCED
    with open(src, "r+b") as fh:
        fh.seek(4096 * 100)
        fh.write(os.urandom(8192))
    assert s.command("SYNC").ok
    assert s.wait(30) and s.last_result.kind == "sync"
    assert sha256(src) == sha256(str(tmp_path / "target.img"))
    res = s.command("SKIP")
    assert res.ok and s.skip_consistency_check
    res = s.command("DELETE")
    assert res.ok and s.states.state is SessionState.DELETED
    assert not os.path.exists(tmp_path / "tx" / "disk0")
    assert s.command("START").ok is False and s.command("UPLOAD_LOG").ok is False
    names = [(p.copystate.value, p.migrationcycle.value) for p in pairs]
    assert all(is_allowed(c, m) for c, m in names), names
    want = [("INIT", "replicating"), ("REPLICATE", "replicating"), ("STOPPING", "replicating"),
            ("STOPPED", "replicating"), ("REPLICATE", "replicating"), ("SYNCING", "syncing"),
            ("DELETING", "syncing")]
    assert names == want, names


def test_error_then_resume_reports_allowed_pairs(tmp_path, bundle):
    src = str(tmp_path / "src.img")
    with open(src, "wb") as fh:
        fh.write(os.urandom(2_000_000))
    pairs = []
    receiver = Receiver({"disk0": str(tmp_path / "target.img")}, server_context(bundle), str(tmp_path / "rx"), create=True)
    addr = receiver.start()
    receiver.stop()  # nothing listens there now: the round fails with SMS.1807
    s = _session(tmp_path, bundle, addr, pairs, src)
    assert s.command("START").ok
    assert s.wait(30)
    assert s.last_error is not None and s.last_error.code == "SMS.1807"
    names = [(p.copystate.value, p.migrationcycle.value) for p in pairs]
    assert names[-1] == ("ERROR", "replicating") and all(is_allowed(c, m) for c, m in names)
    res = s.command("STOP")  # nothing running after an error: stopping is immediate
    assert res.ok and s.states.state is SessionState.REPL_STOPPED
    res = s.command("DELETE")
    assert res.ok and s.states.state is SessionState.DELETED


def test_unknown_command_is_a_clear_error(tmp_path, bundle, rx):
    from smsrepl.errors import ConfigError

    s = _session(tmp_path, bundle, rx, [], str(tmp_path / "src.img"))
    with pytest.raises(ConfigError, match="not a 5.5.1 command"):
        s.command("REBOOT")
    assert s.states.state is SessionState.IDLE and not s.running
