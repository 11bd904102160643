"""Speed limits, CPU cap configuration, 5.4.8 progress reports and replication states on a real session."""
import json
import os
import time

import pytest

from smsrepl.control.progress import validate_report
from smsrepl.throttle import SpeedSchedule
from smsrepl.control.state import is_allowed
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.sender import Sender
from smsrepl.transport.tls import client_context, server_context

from .procs import send, sha256


@pytest.fixture
def rx(tmp_path, bundle):
    receiver = Receiver({"disk0": str(tmp_path / "target.img")}, server_context(bundle), str(tmp_path / "rx"), create=True)
    host, port = receiver.start()
    yield receiver, (host, port)
    receiver.stop()


def _random_image(path, size):
    with open(path, "wb") as fh:
        fh.write(os.urandom(size))


@pytest.mark.parametrize("streams", ["1", "4"])
def test_speed_limit_paces_the_wire_and_reports_validate(tmp_path, rx, certkey_file, streams):
    """Over several connections (--streams 4) the limit holds for all of them together."""
    _, (host, port) = rx
    src = str(tmp_path / "src.img")
    _random_image(src, 12_000_000)
    limit = tmp_path / "limit.json"
    limit.write_text(json.dumps({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 40,
                                                    "over_speed_threshold": 50}]}))
    t0 = time.monotonic()
    cp = send(src, f"{host}:{port}", certkey_file, str(tmp_path / "tx"), "disk0",
              "--speed-limit", str(limit), "--progress", "json", "--streams", streams, "-v")
    wall = time.monotonic() - t0
    assert cp.returncode == 0, cp.stderr
    reports = [json.loads(line) for line in cp.stdout.splitlines() if line.strip()]
    assert reports and reports[-1]["progress"] == 100
    for rep in reports:
        validate_report(rep, require_all=True)
        assert rep["subtask_name"] == "MIGRATE_LINUX_BLOCK"
    progress = [r["progress"] for r in reports]
    assert progress == sorted(progress)
    # 12 MB at 40 Mbit/s is 2.4 s of wire time: the round's own seconds (a loaded machine's
    # process start-up, seconds of its own, is not the limiter's doing)
    summary = json.loads(cp.stderr.strip().splitlines()[-1])
    assert streams == "1" or f"runs over {streams} connections" in cp.stderr
    wire, seconds = summary["wire_bytes"], summary["seconds"]
    assert wire * 8 / 40e6 * 0.95 <= seconds <= min(wall, wire * 8 / 40e6 + 3.0), (seconds, wall)
    assert sha256(src) == sha256(str(tmp_path / "target.img"))


def test_schedule_change_on_a_running_session_changes_the_rate(tmp_path, rx, bundle):
    _, addr = rx
    src = str(tmp_path / "src.img")
    _random_image(src, 24_000_000)
    fast = SpeedSchedule.from_json({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 200}]})
    slow = SpeedSchedule.from_json({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 40}]})
    samples = []

    def on_report(rep):
        samples.append((time.monotonic(), rep["replicatesize"]))

    sender = Sender(src, "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0,
                    speed_limit=fast, on_report=on_report)
    sender.on_report = on_report
    import threading

    switched = []

    def switch_at_half() -> None:
        """The slow schedule once half the source is on the wire (by bytes, not by a timer: a
        loaded machine moves less in a given time)."""
        while not done:
            chan = sender._chan
            if chan is not None and chan.wire_sent >= 12_000_000:
                sender.replace_schedule(slow)
                switched.extend((time.monotonic(), chan.wire_sent, chan))
                return
            time.sleep(0.005)

    done = []
    switch = threading.Thread(target=switch_at_half, daemon=True)
    t0 = time.monotonic()
    switch.start()
    try:
        sender.run()
    finally:
        done.append(True)
    end = time.monotonic()
    assert switched, "the sender finished before half its source was sent"
    at, sent, chan = switched
    before, after = at - t0, end - at
    rate_before, rate_after = sent * 8 / before, (chan.wire_sent - sent) * 8 / after
    # rates, not times: a busy machine can slow the fast part, but not speed up the slow one.
    # Data frames are up to 8 MiB, each let through whole: what had passed the limiter at the
    # switch went at 200 Mbit/s, the rest at 40 (its bucket allows 0.05 s of burst)
    assert rate_after < 40e6 * 1.2, (rate_before, rate_after)
    assert rate_after > 40e6 / 3, (rate_before, rate_after)  # slowed, not stalled
    assert rate_before > 40e6 * 1.5, (rate_before, rate_after)  # the first schedule held until then


def test_reported_states_are_allowed_pairs(tmp_path, rx, bundle):
    _, addr = rx
    src = str(tmp_path / "src.img")
    _random_image(src, 4_000_000)
    pairs = []
    for _ in range(2):  # a full copy, then a sync round
        Sender(src, "disk0", addr, client_context(bundle), str(tmp_path / "tx"),
               on_state=lambda p: pairs.append(p)).run()
    names = [(p.copystate.value, p.migrationcycle.value) for p in pairs]
    assert names, "no state reported"
    for copystate, cycle in names:
        assert is_allowed(copystate, cycle), (copystate, cycle)
    assert any(cycle == "replicating" for _, cycle in names)
    assert any(cycle == "syncing" for _, cycle in names)


@pytest.mark.parametrize("body, message", [
    ('{"configurations":[{"config_key":"EXCLUDE_MIGRATE_PATH","config_value":"/tmp"}]}', "file-level transfer only"),
    ('{"configurations":[{"config_key":"NO_SUCH_KEY","config_value":"1"}]}', "unknown config_key"),
    ('{"configurations":[{"config_key":"LINUX_CPU_LIMIT","config_value":"500"}]}', "LINUX_CPU_LIMIT"),
    ('not json', "not valid JSON"),
])
def test_bad_configuration_is_a_usage_error(tmp_path, certkey_file, body, message):
    src = str(tmp_path / "src.img")
    _random_image(src, 4096)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(body)
    cp = send(src, "127.0.0.1:9", certkey_file, str(tmp_path / "tx"), "disk0", "--config", str(cfg))
    assert cp.returncode == 2, cp.stderr
    assert message in cp.stderr


@pytest.mark.parametrize("body", ['{"speed_limit":[{"start":"25:00","end":"23:59","speed":10}]}',
                                  '{"speed_limit":[{"start":"00:00","end":"23:59","speed":10,"over_speed_threshold":5}]}',
                                  '{"speed_limit":[{"start":"00:00","end":"23:59","speed":10,"colour":"red"}]}'])
def test_bad_speed_limit_is_a_usage_error(tmp_path, certkey_file, body):
    src = str(tmp_path / "src.img")
    _random_image(src, 4096)
    f = tmp_path / "sl.json"
    f.write_text(body)
    cp = send(src, "127.0.0.1:9", certkey_file, str(tmp_path / "tx"), "disk0", "--speed-limit", str(f))
    assert cp.returncode == 2, cp.stderr
    assert "speed_limit[0]" in cp.stderr
