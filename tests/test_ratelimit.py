"""Speed schedules, token bucket, scheduled limiter, over-speed guard, CPU cap.

No test sleeps: clocks, wall clocks, CPU time and sleep are all injected.
"""
from __future__ import annotations

import datetime as dt
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smsrepl.errors import ConfigError, ReplicationError
from smsrepl.throttle import (CpuCap, OverSpeedGuard, ScheduledLimiter, SpeedRule, SpeedSchedule,
                              TokenBucket, default_burst, parse_cpu_limit)
from smsrepl.errors import BYTES_PER_MBIT, OverSpeedError
from overspeed_judge import judge_over_speed, parse_agent_time

REFERENCE_BODY = {"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 1000, "over_speed_threshold": 50.0}]}


class FakeTime:
    """A monotonic clock, a wall clock and a sleep that only advance numbers."""

    def __init__(self, wall: dt.datetime = dt.datetime(2024, 5, 1, 7, 59, 0)) -> None:
        self.t = 1000.0
        self.wall0 = wall
        self.t0 = self.t
        self.cpu = 0.0

    def clock(self) -> float:
        return self.t

    def wallclock(self) -> dt.datetime:
        return self.wall0 + dt.timedelta(seconds=self.t - self.t0)

    def sleep(self, s: float) -> None:
        assert s >= 0
        self.t += s

    def cpu_time(self) -> float:
        return self.cpu


def sched(*rules: dict) -> SpeedSchedule:
    return SpeedSchedule.from_json({"speed_limit": list(rules)})


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------

def test_reference_body_parses_as_is():
    s = SpeedSchedule.from_json(json.dumps(REFERENCE_BODY))
    assert s.rules == (SpeedRule(0, 23 * 60 + 59, 1000, 50.0),)
    assert s.limit_bps(dt.time(0, 0)) == 1000 * BYTES_PER_MBIT == 125_000_000
    assert s.limit_bps(dt.time(23, 59, 59, 999999)) == 125_000_000  # 23:59 covers the whole last minute
    assert s.threshold_at(dt.time(12, 0)) == 50.0


def test_reference_example_tiles_the_day():
    # 5.4.10's second example: 0:00-8:00 20, 8:00-15:00 50, 15:00-23:59 25 (H:MM accepted)
    s = sched(
        {"start": "0:00", "end": "8:00", "speed": 20},
        {"start": "8:00", "end": "15:00", "speed": 50},
        {"start": "15:00", "end": "23:59", "speed": 25},
    )
    assert s.speed_mbit(dt.time(7, 59, 59)) == 20
    assert s.speed_mbit(dt.time(8, 0)) == 50  # half-open windows: no overlap at the edge
    assert s.speed_mbit(dt.time(14, 59)) == 50
    assert s.speed_mbit(dt.time(15, 0)) == 25
    assert s.speed_mbit(dt.time(23, 59, 30)) == 25
    assert s.threshold_at(dt.time(9)) is None


def test_reference_threshold_alias():
    # 5.4.10's first example spells the threshold "threshold"
    s = sched({"start": "00:00", "end": "23:59", "speed": 1000, "threshold": 20}, {"start": "08:00", "end": "15:00", "speed": 50})
    assert s.threshold_at(dt.time(7)) == 20.0
    assert s.speed_mbit(dt.time(9)) == 50
    with pytest.raises(ConfigError, match=r"speed_limit\[0\]\.threshold: .*not both"):
        sched({"start": "00:00", "end": "23:59", "speed": 1, "threshold": 20, "over_speed_threshold": 20})


def test_lowest_wins_zero_is_no_limit_and_outside_windows_unlimited():
    s = sched(
        {"start": "08:00", "end": "18:00", "speed": 100, "over_speed_threshold": 30},
        {"start": "12:00", "end": "13:00", "speed": 40, "over_speed_threshold": 80},
        {"start": "00:00", "end": "23:59", "speed": 0},
    )
    assert s.limit_bps(dt.time(7, 59)) is None
    assert s.threshold_at(dt.time(7, 59)) is None
    assert s.speed_mbit(dt.time(8, 0)) == 100
    assert s.speed_mbit(dt.time(12, 30)) == 40
    assert s.threshold_at(dt.time(12, 30)) == 80.0  # the threshold of the rule that sets the limit
    assert s.threshold_at(dt.time(13, 0)) == 30.0
    assert s.limit_bps(dt.time(18, 0)) is None


def test_wraps_past_midnight():
    s = sched({"start": "22:00", "end": "6:00", "speed": 10})
    assert s.speed_mbit(dt.time(23, 0)) == 10
    assert s.speed_mbit(dt.time(0, 0)) == 10
    assert s.speed_mbit(dt.time(5, 59, 59)) == 10
    assert s.limit_bps(dt.time(6, 0)) is None
    assert s.limit_bps(dt.time(21, 59)) is None


def test_empty_schedule_and_unlimited():
    for s in (sched(), SpeedSchedule.unlimited(), sched({"start": "0:00", "end": "23:59", "speed": 0})):
        assert s.limit_bps(dt.datetime(2024, 1, 1, 3)) is None
        assert not s


def test_frozen_and_hashable():
    s = SpeedSchedule.from_json(REFERENCE_BODY)
    with pytest.raises(AttributeError):
        s.rules = ()  # type: ignore[misc]
    assert hash(s) == hash(SpeedSchedule.from_json(REFERENCE_BODY))


BAD_RULES = [
    ({"start": "24:00", "end": "23:59", "speed": 1}, r"speed_limit\[0\]\.start: '24:00' is out of range"),
    ({"start": "8:60", "end": "23:59", "speed": 1}, r"speed_limit\[0\]\.start: '8:60' is out of range"),
    ({"start": "800", "end": "23:59", "speed": 1}, r"speed_limit\[0\]\.start: '800' is not a time"),
    ({"start": "08:00:00", "end": "23:59", "speed": 1}, r"speed_limit\[0\]\.start: .* is not a time"),
    ({"start": "8:0", "end": "23:59", "speed": 1}, r"speed_limit\[0\]\.start: '8:0' is not a time"),
    ({"start": 800, "end": "23:59", "speed": 1}, r"speed_limit\[0\]\.start: expected a string"),
    ({"start": "00:00", "end": "7:5", "speed": 1}, r"speed_limit\[0\]\.end: '7:5' is not a time"),
    ({"start": "00:00", "end": None, "speed": 1}, r"speed_limit\[0\]\.end: expected a string"),
    ({"start": "08:00", "end": "8:00", "speed": 1}, r"speed_limit\[0\]\.end: equals start"),
    ({"start": "00:00", "end": "23:59", "speed": -1}, r"speed_limit\[0\]\.speed: -1 is out of range 0-10000"),
    ({"start": "00:00", "end": "23:59", "speed": 10001}, r"speed_limit\[0\]\.speed: 10001 is out of range"),
    ({"start": "00:00", "end": "23:59", "speed": 50.5}, r"speed_limit\[0\]\.speed: expected an integer"),
    ({"start": "00:00", "end": "23:59", "speed": "50"}, r"speed_limit\[0\]\.speed: expected an integer"),
    ({"start": "00:00", "end": "23:59", "speed": True}, r"speed_limit\[0\]\.speed: expected an integer"),
    ({"start": "00:00", "end": "23:59", "speed": 5, "over_speed_threshold": 9.99}, r"speed_limit\[0\]\.over_speed_threshold: 9.99 is out of range 10-100"),
    ({"start": "00:00", "end": "23:59", "speed": 5, "over_speed_threshold": 100.5}, r"over_speed_threshold: 100.5 is out of range"),
    ({"start": "00:00", "end": "23:59", "speed": 5, "over_speed_threshold": "50"}, r"speed_limit\[0\]\.over_speed_threshold: expected a number"),
    ({"start": "00:00", "end": "23:59", "speed": 5, "over_speed_threshold": False}, r"over_speed_threshold: expected a number"),
    ({"start": "00:00", "end": "23:59", "speed": 5, "over_speed_threshold": float("nan")}, r"over_speed_threshold: nan is not a finite"),
    ({"start": "00:00", "end": "23:59", "speed": 5, "limit": 3}, r"speed_limit\[0\]: unknown key\(s\) 'limit'"),
    ({"end": "23:59", "speed": 5}, r"speed_limit\[0\]\.start: missing"),
    ({"start": "00:00", "speed": 5}, r"speed_limit\[0\]\.end: missing"),
    ({"start": "00:00", "end": "23:59"}, r"speed_limit\[0\]\.speed: missing"),
    ("00:00-23:59", r"speed_limit\[0\]: expected an object"),
]


@pytest.mark.parametrize("rule,message", BAD_RULES)
def test_bad_rule_names_index_and_field(rule, message):
    good = {"start": "00:00", "end": "23:59", "speed": 5}
    with pytest.raises(ConfigError, match=message.replace(r"\[0\]", r"\[1\]")) as ei:
        sched(good, rule)
    assert ei.value.exit_code == 2


@pytest.mark.parametrize(
    "body,message",
    [
        ("{not json", r"invalid JSON"),
        ("[]", r"expected an object with 'speed_limit'"),
        ({}, r"'speed_limit' is missing"),
        ({"speed_limit": [], "extra": 1}, r"unknown key\(s\) 'extra'"),
        ({"speed_limit": {"start": "00:00"}}, r"speed_limit: expected an array"),
    ],
)
def test_bad_body(body, message):
    with pytest.raises(ConfigError, match=message):
        SpeedSchedule.from_json(body)


# ---------------------------------------------------------------------------
# Property: the compiled schedule against a minute-by-minute oracle
# ---------------------------------------------------------------------------

def oracle_minutes(start: int, end: int) -> set[int]:
    """Walk minute by minute from start to end (end 23:59 = midnight)."""
    stop = 0 if end == 1439 else end
    out, m = set(), start
    while True:
        out.add(m)
        m = (m + 1) % 1440
        if m == stop:
            return out


def oracle(rules: list[dict]) -> list[tuple[int | None, float | None]]:
    covered = []
    for r in rules:
        h1, m1 = map(int, r["start"].split(":"))
        h2, m2 = map(int, r["end"].split(":"))
        covered.append(oracle_minutes(h1 * 60 + m1, h2 * 60 + m2))
    table: list[tuple[int | None, float | None]] = []
    for minute in range(1440):
        best: int | None = None
        thr: float | None = None
        for r, cov in zip(rules, covered):
            if r["speed"] == 0 or minute not in cov:
                continue
            t = r.get("over_speed_threshold")
            if best is None or r["speed"] < best:
                best, thr = r["speed"], t
            elif r["speed"] == best and t is not None:
                thr = t if thr is None else min(thr, t)
        table.append((best, thr))
    return table


@st.composite
def rule_dicts(draw):
    start = draw(st.integers(0, 1439))
    end = draw(st.integers(0, 1439).filter(lambda e: e != start or e == 1439))
    fmt = draw(st.sampled_from(["{h}:{m:02d}", "{h:02d}:{m:02d}"]))
    d = {
        "start": fmt.format(h=start // 60, m=start % 60),
        "end": fmt.format(h=end // 60, m=end % 60),
        "speed": draw(st.sampled_from([0, 1, 5, 40, 200, 10000]) | st.integers(0, 10000)),
    }
    if draw(st.booleans()):
        d["over_speed_threshold"] = draw(st.sampled_from([10.0, 50.0, 100.0]) | st.floats(10, 100))
    return d


@settings(max_examples=60, deadline=None)
@given(st.lists(rule_dicts(), max_size=4), st.data())
def test_schedule_matches_bruteforce_oracle(rules, data):
    s = sched(*rules)
    table = oracle(rules)
    for minute in range(1440):
        t = dt.time(minute // 60, minute % 60, data.draw(st.integers(0, 59), label="sec") if minute % 97 == 0 else 0)
        speed, thr = table[minute]
        assert s.speed_mbit(t) == speed
        assert s.limit_bps(t) == (None if speed is None else speed * 125_000.0)
        assert s.threshold_at(t) == thr


# ---------------------------------------------------------------------------
# Token bucket
# ---------------------------------------------------------------------------

def test_default_burst():
    assert default_burst(None) == 65536
    assert default_burst(100_000) == 65536
    assert default_burst(10_000_000) == 500_000  # 50 ms at 80 Mbit/s


def test_bucket_reserve_never_sleeps_and_paces():
    ft = FakeTime()
    b = TokenBucket(1_000_000, 65536, ft.clock)
    assert b.reserve(65536) == 0.0  # the burst
    assert b.reserve(100_000) == pytest.approx(0.1)
    ft.sleep(0.1)
    assert b.delay() == 0.0
    assert b.reserve(1_000_000) == pytest.approx(1.0)  # bigger than the burst: debt
    with pytest.raises(ValueError):
        b.reserve(-1)


def test_bucket_unlimited_and_set_rate_mid_debt():
    ft = FakeTime()
    b = TokenBucket(None, None, ft.clock)
    assert b.reserve(10**12) == 0.0
    b.set_rate(1_000_000)
    assert b.burst == 65536
    b.reserve(65536)
    assert b.reserve(1_000_000) == pytest.approx(1.0)
    b.set_rate(500_000)  # debt now repaid at the new rate
    assert b.delay() == pytest.approx(2.0)
    b.set_rate(None)
    assert b.delay() == 0.0
    b.set_rate(0)  # 0 = unlimited too
    assert b.rate is None


def simulate(limiter: ScheduledLimiter, ft: FakeTime, total: int, chunk: int) -> list[tuple[float, int]]:
    """Send ``total`` bytes in chunks; return (time sent, bytes) events."""
    events, sent = [], 0
    while sent < total:
        n = min(chunk, total - sent)
        limiter.throttle(n)
        events.append((ft.t - ft.t0, n))
        sent += n
        ft.t += 0.0001  # the write itself
    return events


def max_window(events, width=1.0, step=0.05):
    end = events[-1][0]
    best, lo = 0, 0.0
    while lo <= end:
        best = max(best, sum(n for t, n in events if lo <= t < lo + width))
        lo += step
    return best


def test_80mbit_100mb_takes_10s_and_no_second_over_1_1x():
    ft = FakeTime()
    lim = ScheduledLimiter(sched({"start": "0:00", "end": "23:59", "speed": 80}), ft.clock, ft.wallclock, ft.sleep)
    events = simulate(lim, ft, 100_000_000, 256 * 1024)
    duration = events[-1][0]
    assert duration == pytest.approx(10.0, rel=0.05)
    assert max_window(events) <= 1.1 * 80 * BYTES_PER_MBIT


def test_window_edge_200_to_40_changes_rate_within_2s():
    # the wall clock crosses 08:00 five seconds in; 200 Mbit/s before, 40 after
    ft = FakeTime(dt.datetime(2024, 5, 1, 7, 59, 55))
    s = sched({"start": "0:00", "end": "8:00", "speed": 200}, {"start": "8:00", "end": "23:59", "speed": 40})
    lim = ScheduledLimiter(s, ft.clock, ft.wallclock, ft.sleep)
    events = simulate(lim, ft, 200_000_000, 256 * 1024)
    before = sum(n for t, n in events if 1 <= t < 5) / 4
    assert before == pytest.approx(200 * BYTES_PER_MBIT, rel=0.05)
    for lo in (7.0, 8.0, 10.0):  # from 2 s after the edge on
        window = sum(n for t, n in events if lo <= t < lo + 1)
        assert window <= 1.1 * 40 * BYTES_PER_MBIT
        assert window >= 0.9 * 40 * BYTES_PER_MBIT


def test_replace_schedule_mid_transfer():
    ft = FakeTime()
    lim = ScheduledLimiter(sched({"start": "0:00", "end": "23:59", "speed": 8}), ft.clock, ft.wallclock, ft.sleep)
    simulate(lim, ft, 2_000_000, 64 * 1024)
    assert lim.current() == (1_000_000.0, None)
    lim.replace_schedule(SpeedSchedule.unlimited())
    t0 = ft.t
    lim.throttle(10**9)
    assert ft.t == t0  # unlimited now
    assert lim.current() == (None, None)
    with pytest.raises(TypeError):
        lim.replace_schedule(REFERENCE_BODY)  # type: ignore[arg-type]


def test_unlimited_window_opening_cuts_a_long_wait():
    # 1 Mbit/s until 08:00, unlimited after: a huge chunk at 07:59:59 does not wait out its debt
    ft = FakeTime(dt.datetime(2024, 5, 1, 7, 59, 59))
    lim = ScheduledLimiter(sched({"start": "0:00", "end": "8:00", "speed": 1}), ft.clock, ft.wallclock, ft.sleep)
    slept = lim.throttle(10 * BYTES_PER_MBIT)  # 10 s of debt at 1 Mbit/s
    assert slept <= 1.25


# ---------------------------------------------------------------------------
# Over-speed
# ---------------------------------------------------------------------------

def test_guard_trips_with_clear_message():
    g = OverSpeedGuard(window_s=10)
    limit = 10 * BYTES_PER_MBIT  # 10 Mbit/s
    t = 0.0
    with pytest.raises(OverSpeedError) as ei:
        while t < 30:
            g.record(t, int(16 * BYTES_PER_MBIT * 0.1))  # 16 Mbit/s
            g.check(t, limit, 50.0)
            t += 0.1
    err = ei.value
    assert isinstance(err, ReplicationError) and err.exit_code == 3 and err.code is None
    assert t >= 10  # only judged on a full window
    msg = str(err)
    assert re.search(r"measured 16\.\d\d Mbit/s over the last 10 s", msg) and "limit 10.00 Mbit/s" in msg and "over_speed_threshold 50 %" in msg


def test_guard_within_threshold_and_no_limit():
    g = OverSpeedGuard(window_s=10)
    for i in range(300):
        t = i * 0.1
        g.record(t, int(14 * BYTES_PER_MBIT * 0.1))  # 14 Mbit/s vs 10 + 50 %
        assert g.check(t, 10 * BYTES_PER_MBIT, 50.0) <= 15 * BYTES_PER_MBIT
        g.check(t, None, None)
        g.check(t, 10 * BYTES_PER_MBIT, 50.0)


def test_guard_does_not_trip_on_a_limit_drop():
    g = OverSpeedGuard(window_s=10)
    t = 0.0
    while t < 20:  # 200 Mbit/s under a 200 limit
        g.record(t, int(200 * BYTES_PER_MBIT * 0.1))
        g.check(t, 200 * BYTES_PER_MBIT, 10.0)
        t += 0.1
    while t < 40:  # the limit drops to 40 and the sender follows
        g.record(t, int(40 * BYTES_PER_MBIT * 0.1))
        g.check(t, 40 * BYTES_PER_MBIT, 10.0)
        t += 0.1


def _report(speed, when="2024-05-01T12:30:00+08:00"):
    return {"subtask_name": "MIGRATE_LINUX_BLOCK", "progress": 5, "replicatesize": 1, "totalsize": 10,
            "process_trace": "", "migrate_speed": speed, "agent_time": when}


def test_judge_over_speed():
    rules = {"speed_limit": [
        {"start": "00:00", "end": "23:59", "speed": 1000, "over_speed_threshold": 50.0},
        {"start": "12:00", "end": "13:00", "speed": 100, "over_speed_threshold": 20},
    ]}
    v = judge_over_speed(_report(121.0), rules)
    assert v and v.limit_mbit == 100 and v.threshold_pct == 20.0 and "exceeds" in v.reason
    assert not judge_over_speed(_report(119.0), rules)
    assert not judge_over_speed(_report(1400.0, "2024-05-01 14:00:00"), SpeedSchedule.from_json(rules))
    assert judge_over_speed(_report(1501.0, "23:59:59"), json.dumps(rules))
    # no threshold: not judged unless a default is given
    plain = {"speed_limit": [{"start": "0:00", "end": "23:59", "speed": 10}]}
    assert not judge_over_speed(_report(100.0), plain)
    assert judge_over_speed(_report(100.0), plain, default_threshold=50)
    # outside every window
    assert judge_over_speed(_report(9999.0), {"speed_limit": []}).limit_mbit is None


def test_judge_over_speed_bad_reports():
    with pytest.raises(ConfigError, match="agent_time is missing"):
        judge_over_speed({"migrate_speed": 1.0}, REFERENCE_BODY)
    with pytest.raises(ConfigError, match="migrate_speed must be a number"):
        judge_over_speed(_report("fast"), REFERENCE_BODY)
    with pytest.raises(ConfigError, match="agent_time: 'yesterday' is not a recognised time"):
        judge_over_speed(_report(1.0, "yesterday"), REFERENCE_BODY)


def test_parse_agent_time_forms():
    assert parse_agent_time("2024-05-01T08:00:00+08:00") == dt.datetime(2024, 5, 1, 8, 0)
    assert parse_agent_time("2024-05-01 08:00:00") == dt.datetime(2024, 5, 1, 8, 0)
    assert parse_agent_time("8:05").time() == dt.time(8, 5)
    ms = int(dt.datetime(2024, 5, 1, 8, 0).timestamp() * 1000)
    assert parse_agent_time(str(ms)) == dt.datetime(2024, 5, 1, 8, 0)


# ---------------------------------------------------------------------------
# CPU cap
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("value,expect", [(50, 50.0), ("50", 50.0), (" 30 ", 30.0), (1, 1.0), ("100", 100.0), (12.5, 12.5)])
def test_cpu_limit_values(value, expect):
    assert parse_cpu_limit(value) == expect


@pytest.mark.parametrize(
    "value,message",
    [(0, "out of range 1-100"), ("101", "out of range"), (-5, "out of range"), ("fifty", "'fifty' is not a number"),
     (True, "expected a percent"), (None, "expected a percent"), ("nan", "out of range"), ([50], "expected a percent")],
)
def test_cpu_limit_bad_values(value, message):
    with pytest.raises(ConfigError, match=f"LINUX_CPU_LIMIT: .*{message}"):
        parse_cpu_limit(value)


def test_cpu_cap_from_configurations():
    body = {"configurations": [{"config_key": "EXCLUDE_MIGRATE_PATH", "config_value": "/tmp"},
                               {"config_key": "LINUX_CPU_LIMIT", "config_value": 50}]}
    assert CpuCap.from_configurations(body).percent == 50.0
    assert CpuCap.from_configurations({"configurations": []}) is None


@pytest.mark.parametrize("percent", [30, 10, 75])
def test_cpu_cap_holds_over_every_5s_window(percent):
    ft = FakeTime()
    cap = CpuCap(percent, ft.clock, ft.cpu_time, ft.sleep)
    samples = [(ft.t, ft.cpu)]
    while ft.t - ft.t0 < 40:
        # a chunk of pure CPU work (15 ms), then pace
        ft.t += 0.015
        ft.cpu += 0.015
        cap.pace()
        samples.append((ft.t, ft.cpu))
    # like sampling /proc every second: cpu% over any 5 s window after the first 5 s
    def cpu_at(x):
        best = samples[0]
        for s in samples:
            if s[0] <= x:
                best = s
        return best[1]
    for k in range(5, 35):
        lo = ft.t0 + k
        used = cpu_at(lo + 5) - cpu_at(lo)
        assert used / 5 * 100 <= percent + 0.5
    total = (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0]) * 100
    assert total >= percent * 0.9  # not needlessly slow


def test_cpu_cap_idle_credit_is_small():
    ft = FakeTime()
    cap = CpuCap(20, ft.clock, ft.cpu_time, ft.sleep)
    ft.t += 100  # idle for a long time
    cap.pace()
    ft.t += 1.0
    ft.cpu += 1.0  # then a one-second burst of CPU
    slept = cap.pace()
    assert slept == pytest.approx((1.0 - 0.05) / (0.2 * 0.93) - 1.0, rel=1e-6)


def test_release_and_cancel_end_a_paced_wait_at_once():
    """A stopping sender (interrupt.OneShotStop) must not sit out its limiter's or CPU cap's sleeps."""
    import threading
    import time

    lim = ScheduledLimiter(SpeedSchedule.from_json({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 1}]}))
    cap = CpuCap(10, cpu_time=lambda: time.monotonic() * 100)  # far over its share: pace() would sleep on
    cancel = threading.Event()
    took: dict = {}

    def wait(name, fn) -> None:
        t0 = time.monotonic()
        fn()
        took[name] = time.monotonic() - t0

    threads = [threading.Thread(target=wait, args=("limiter", lambda: lim.throttle(10 << 20)), daemon=True),  # 84 s
               threading.Thread(target=wait, args=("cap", lambda: cap.pace(cancel)), daemon=True)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    lim.release()
    cancel.set()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)
    assert took["limiter"] < 2 and took["cap"] < 2, took
    assert lim.throttle(10 << 20) == 0  # and from now on
