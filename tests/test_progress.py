"""5.4.8 progress reports: keys, types, units, ranges; smoothing and ETA."""
from __future__ import annotations

import datetime as dt
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smsrepl.control import progress as P
from smsrepl.control.hostsample import HostSample, HostSampler
from smsrepl.control.progress import (EMITTED_FIELDS, REMAIN_UNKNOWN, ProgressTracker, format_agent_time,
                                      report_problems, subtask_for, validate_report)
from smsrepl.errors import ReportError
from overspeed_judge import judge_over_speed

SPEC_KEYS = {
    "subtask_name", "progress", "replicatesize", "totalsize", "process_trace", "migrate_speed", "compress_rate",
    "remain_time", "total_cpu_usage", "agent_cpu_usage", "total_mem_usage", "agent_mem_usage", "total_disk_io",
    "agent_disk_io", "agent_time",
}
UTC8 = dt.timezone(dt.timedelta(hours=8))


class Clock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


class FixedSampler:
    def __init__(self, sample: HostSample) -> None:
        self._s = sample

    def sample(self) -> HostSample:
        return self._s


def tracker(total=1_000_000_000, name=P.MIGRATE_LINUX_BLOCK, sampler=None):
    c = Clock()
    t0_ms = int(dt.datetime(2024, 5, 1, 8, 0, tzinfo=UTC8).timestamp() * 1000)
    tr = ProgressTracker(name, total, c, lambda: t0_ms + int((c.t - 50.0) * 1000), sampler, tz=UTC8)
    return tr, c


def test_subtask_constants_and_helper():
    assert P.DATA_SUBTASKS == {
        "MIGRATE_LINUX_BLOCK", "SYNC_LINUX_BLOCK", "MIGRATE_WINDOWS_BLOCK", "SYNC_WINDOWS_BLOCK",
        "MIGRATE_LINUX_FILE", "SYNC_LINUX_FILE",
    }
    assert subtask_for("block", first_copy=True) == P.MIGRATE_LINUX_BLOCK
    assert subtask_for("block", first_copy=False, windows=True) == P.SYNC_WINDOWS_BLOCK
    assert subtask_for("file", first_copy=False) == P.SYNC_LINUX_FILE
    with pytest.raises(ValueError):
        subtask_for("file", first_copy=True, windows=True)
    with pytest.raises(ValueError):
        ProgressTracker("COPY_STUFF", 1)
    with pytest.raises(ValueError):
        ProgressTracker(P.SYNC_LINUX_FILE, -1)


def test_report_has_exactly_the_reference_keys_and_types():
    sampler = FixedSampler(HostSample(12.5, 3.25, 2048.0, 64.0, 1.5, 0.75))
    tr, c = tracker(sampler=sampler)
    c.t += 1
    tr.update(10_000_000, wire_bytes=5_000_000, raw_bytes=10_000_000)
    r = tr.report()
    assert set(r) == SPEC_KEYS == set(EMITTED_FIELDS)
    validate_report(r, require_all=True)
    json.dumps(r)
    assert isinstance(r["progress"], int) and r["progress"] == 1
    assert r["replicatesize"] == 10_000_000 and r["totalsize"] == 1_000_000_000
    assert r["migrate_speed"] == pytest.approx(40.0)  # 5 MB on the wire in 1 s = 40 Mbit/s
    assert r["compress_rate"] == pytest.approx(50.0)
    assert isinstance(r["remain_time"], int) and r["remain_time"] == 99
    assert (r["total_cpu_usage"], r["agent_cpu_usage"], r["total_mem_usage"], r["agent_mem_usage"]) == (12.5, 3.25, 2048.0, 64.0)
    assert (r["total_disk_io"], r["agent_disk_io"]) == (1.5, 0.75)
    for k in ("migrate_speed", "compress_rate", "total_cpu_usage", "agent_cpu_usage", "total_mem_usage",
              "agent_mem_usage", "total_disk_io", "agent_disk_io"):
        assert isinstance(r[k], float), k
    assert r["agent_time"] == "2024-05-01T08:00:01+08:00"
    assert len(r["agent_time"]) <= 30


def test_progress_monotonic_and_100_only_at_finish():
    tr, c = tracker(total=1000)
    seen = []
    for done in (0, 100, 500, 400, 999, 1000, 1000):
        c.t += 0.5
        tr.update(done)
        seen.append(tr.report()["progress"])
    assert seen == sorted(seen)
    assert max(seen) == 99  # everything sent, but the round is not complete yet
    final = tr.finish()
    assert final["progress"] == 100 and final["remain_time"] == 0 and final["replicatesize"] == 1000
    validate_report(final, require_all=True)
    tr.update(10)  # ignored after finish
    assert tr.report()["progress"] == 100


def test_finish_with_unsent_bytes_and_empty_round():
    tr, c = tracker(total=1000, name=P.SYNC_LINUX_BLOCK)
    tr.update(200)
    r = tr.finish()  # unchanged blocks were never reported: the round is complete anyway
    assert r["progress"] == 100 and r["replicatesize"] == 1000
    empty, _ = tracker(total=0, name=P.SYNC_LINUX_FILE)
    r0 = empty.report()
    assert r0["progress"] == 0 and r0["remain_time"] == 0
    assert empty.finish()["progress"] == 100


def test_rate_settles_and_eta_within_25pct_after_20pct():
    total = 1_000_000_000
    tr, c = tracker(total=total)
    rate = 12_500_000  # 100 Mbit/s, steady, in 10 ms chunks
    done = 0
    reports = []
    while done < total:
        c.t += 0.01
        done = min(total, done + rate // 100)
        tr.update(done)
        if int(c.t * 100) % 100 == 0:
            reports.append((c.t - 50.0, done, tr.report()))
    for elapsed, d, r in reports:
        validate_report(r, require_all=True)
        if elapsed >= 3.0:
            assert r["migrate_speed"] == pytest.approx(100.0, rel=0.02)
        if d >= 0.2 * total:
            actual = (total - d) / rate
            assert abs(r["remain_time"] - actual) <= 0.25 * actual + 1
    assert tr.report()["remain_time"] == 0


def test_rate_follows_a_change_within_a_few_seconds():
    tr, c = tracker(total=10**12)
    done = 0
    for step in range(1000):  # 10 s at 200 Mbit/s, then 10 s at 40
        c.t += 0.02
        done += (25_000_000 if step < 500 else 5_000_000) // 50
        tr.update(done)
        if step == 499:
            assert tr.report()["migrate_speed"] == pytest.approx(200, rel=0.02)
        if step == 500 + 175:  # 3.5 s after the change
            assert tr.report()["migrate_speed"] == pytest.approx(40, rel=0.02)


def test_stall_drops_the_rate_and_eta_unknown():
    tr, c = tracker(total=1000)
    r = tr.report()
    assert r["migrate_speed"] == 0.0 and r["remain_time"] == REMAIN_UNKNOWN
    c.t += 1
    tr.update(100)
    c.t += 10  # nothing for 10 s
    r = tr.report()
    assert r["migrate_speed"] == 0.0 and r["remain_time"] == REMAIN_UNKNOWN
    validate_report(r, require_all=True)


def test_first_instant_is_not_absurd():
    tr, c = tracker()
    c.t += 1e-6
    tr.update(4 * 1024 * 1024)
    assert tr.report()["migrate_speed"] <= 4 * 1024 * 1024 * 8 / 1e6 / 0.5 + 0.001


def test_process_trace_truncated():
    tr, _ = tracker()
    tr.set_trace("x" * 5000)
    r = tr.report()
    assert len(r["process_trace"]) == 2048
    validate_report(r)


def test_report_judged_by_over_speed():
    tr, c = tracker(total=10**12)
    done = 0
    for _ in range(500):
        c.t += 0.01
        done += 125_000  # 100 Mbit/s
        tr.update(done)
    rules = {"speed_limit": [{"start": "7:00", "end": "9:00", "speed": 50, "over_speed_threshold": 50}]}
    assert judge_over_speed(tr.report(), rules)
    rules["speed_limit"][0]["speed"] = 80
    assert not judge_over_speed(tr.report(), rules)


def test_agent_time_format():
    ms = int(dt.datetime(2024, 12, 31, 23, 59, 59, 999000, tzinfo=dt.timezone.utc).timestamp() * 1000)
    assert format_agent_time(ms, dt.timezone.utc) == "2024-12-31T23:59:59+00:00"
    assert len(format_agent_time(ms)) <= 30  # local zone


def test_host_sampler_real_psutil():
    s = HostSampler()
    sum(range(200_000))
    first, second = s.sample(), s.sample()
    for h in (first, second):
        assert 0 <= h.total_cpu_usage <= 100 and 0 <= h.agent_cpu_usage <= 100
        assert 0 < h.total_mem_usage <= 1048576 and 0 < h.agent_mem_usage <= 1048576
        assert 0 <= h.total_disk_io <= 10000 and 0 <= h.agent_disk_io <= 10000
    tr = ProgressTracker(P.MIGRATE_LINUX_FILE, 10, host_sampler=s)
    validate_report(tr.report(), require_all=True)


# ---------------------------------------------------------------------------
# validate_report
# ---------------------------------------------------------------------------

GOOD = {"subtask_name": "SYNC_LINUX_BLOCK", "progress": 50, "replicatesize": 5, "totalsize": 10, "process_trace": ""}


def test_validate_minimal_and_reference_example():
    validate_report(GOOD)
    validate_report({"subtask_name": "ATTACH_AGENT_IMAGE", "progress": 100, "replicatesize": 1000,
                     "totalsize": 100000, "process_trace": ""})
    validate_report(dict(GOOD, need_migration_test=False, migrate_speed=3))  # a JSON Double may be an int
    with pytest.raises(ReportError, match="compress_rate: missing"):
        validate_report(GOOD, require_all=True)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("subtask_name", "MIGRATE", "not a 5.4.8 subtask name"),
        ("subtask_name", 3, "subtask_name: expected a string"),
        ("progress", 101, "progress: 101 is out of range 0-100"),
        ("progress", -1, "progress: -1 is out of range"),
        ("progress", 50.0, "progress: expected an integer"),
        ("progress", True, "progress: expected a number"),
        ("replicatesize", -1, "replicatesize: -1 is out of range"),
        ("replicatesize", 2**63, "replicatesize: .* is out of range"),
        ("totalsize", "10", "totalsize: expected a number"),
        ("process_trace", "x" * 2049, "process_trace: 2049 chars, at most 2048"),
        ("process_trace", None, "process_trace: expected a string"),
        ("migrate_speed", 10000.5, "migrate_speed: 10000.5 is out of range 0-10000"),
        ("migrate_speed", -0.1, "migrate_speed: -0.1 is out of range"),
        ("migrate_speed", float("inf"), "migrate_speed: inf is not finite"),
        ("compress_rate", 10001.0, "compress_rate: .* out of range"),
        ("remain_time", 2**31, "remain_time: .* out of range 0-2147483647"),
        ("remain_time", 1.5, "remain_time: expected an integer"),
        ("total_cpu_usage", 100.1, "total_cpu_usage: 100.1 is out of range 0-100"),
        ("agent_cpu_usage", -1.0, "agent_cpu_usage: -1.0 is out of range"),
        ("total_mem_usage", 1048577.0, "total_mem_usage: .* out of range 0-1048576"),
        ("agent_mem_usage", "64", "agent_mem_usage: expected a number"),
        ("total_disk_io", 10001.0, "total_disk_io: .* out of range 0-10000"),
        ("agent_disk_io", -2.0, "agent_disk_io: -2.0 is out of range"),
        ("agent_time", "2024-05-01T08:00:00.000000+08:00:00", "agent_time: 35 chars, at most 30"),
        ("agent_time", 1714521600000, "agent_time: expected a string"),
        ("need_migration_test", "yes", "need_migration_test: expected a boolean"),
        ("speed", 3.0, "unknown field 'speed'"),
    ],
)
def test_validate_rejects_each_field(field, value, message):
    bad = dict(GOOD, **{field: value})
    with pytest.raises(ReportError, match=message):
        validate_report(bad)


def test_validate_missing_required_and_not_an_object():
    for k in ("subtask_name", "progress", "replicatesize", "totalsize", "process_trace"):
        bad = dict(GOOD)
        del bad[k]
        assert report_problems(bad) == [f"{k}: missing"]
    assert report_problems([]) == ["report must be an object, got list"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0.001, 2.0), st.integers(0, 50_000_000)), min_size=1, max_size=40),
       st.integers(0, 10**9))
def test_reports_always_valid_and_progress_monotone(steps, total):
    tr, c = tracker(total=total)
    done, wire, last = 0, 0, 0
    for dt_s, n in steps:
        c.t += dt_s
        done += n
        wire += n // 3
        tr.update(done, wire_bytes=wire, raw_bytes=wire * 2 + 1)
        r = tr.report()
        validate_report(r, require_all=True)
        assert last <= r["progress"] <= 99
        last = r["progress"]
    assert tr.finish()["progress"] == 100
