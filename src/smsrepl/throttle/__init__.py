"""Speed schedules, a token bucket, the over-speed guard and the CPU cap.

Everything here is pure Python with the clock as a parameter: nothing opens a
socket, nothing sleeps unless it was handed a ``sleep`` function.

Speed schedule (API reference 5.4.9 / 5.4.10, SPEC "Speed-limit semantics")
--------------------------------------------------------------------------
The control plane's body is taken as-is::

    {"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 1000,
                      "over_speed_threshold": 50.0}]}

* ``start``, ``end`` (required, strings ``H:MM`` or ``HH:MM``, 0:00-23:59) are
  the agent's local wall-clock time. A window is the half-open interval
  ``[start, end)``; an ``end`` of ``23:59`` means midnight, so it covers the
  whole last minute and the reference's own example ``0:00-8:00``,
  ``8:00-15:00``, ``15:00-23:59`` tiles the day with no gap and no overlap.
  ``start`` later than ``end`` wraps past midnight. ``start == end`` is an
  empty window and is rejected (except ``23:59``-``23:59``, the last minute).
* ``speed`` (required, integer Mbit/s, 0-10000 as the reference's field
  table says; its prose says 0-1000): 10**6 bits per second of payload on the
  wire, i.e. ``speed * 125000`` bytes/s. ``0`` means no limit in that window.
* ``over_speed_threshold`` (optional, number 10-100, percent). The reference's
  own 5.4.10 example spells it ``threshold``; that spelling is accepted as an
  alias (giving both is an error). Any other key is rejected.
* Overlapping windows: the lowest speed wins (``0``, "no limit", never beats a
  real limit). Where several windows share that lowest speed, the strictest
  (lowest) threshold applies. Outside every window there is no limit.

The limit is piecewise constant per minute, so a schedule is compiled to a
1440-entry table at construction: ``limit_bps`` is O(1).
"""
from __future__ import annotations

import collections
import datetime as _dt
import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from smsrepl.errors import BYTES_PER_MBIT, ConfigError, OverSpeedError

__all__ = [
    "BYTES_PER_MBIT",
    "MAX_SPEED_MBIT",
    "SpeedRule",
    "SpeedSchedule",
    "TokenBucket",
    "default_burst",
    "ScheduledLimiter",
    "OverSpeedError",
    "OverSpeedGuard",
    "OverSpeedVerdict",
    "judge_over_speed",
    "parse_agent_time",
    "CpuCap",
    "parse_cpu_limit",
]

#: 1 Mbit/s = 10**6 bits/s = 125 000 bytes/s.
MIN_SPEED_MBIT = 0
MAX_SPEED_MBIT = 10_000
MIN_THRESHOLD = 10.0
MAX_THRESHOLD = 100.0
MINUTES_PER_DAY = 1440
#: Minimum burst of a token bucket (bytes).
MIN_BURST_BYTES = 64 * 1024
#: Burst as time at the current rate (seconds).
BURST_SECONDS = 0.05
#: Rounding slack: a debt this small (bytes / CPU-seconds) is no debt, so a
#: wait computed in floating point always ends.
_EPS_BYTES = 1e-3
_EPS_CPU_S = 1e-6

_TIME_RE = re.compile(r"^(\d{1,2}):(\d{2})$")
_RULE_KEYS = frozenset({"start", "end", "speed", "over_speed_threshold", "threshold"})


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parse_hhmm(value: Any, index: int, fld: str) -> int:
    """``H:MM`` / ``HH:MM`` -> minute of the day."""
    where = f"speed_limit[{index}].{fld}"
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string 'H:MM' or 'HH:MM', got {type(value).__name__} {value!r}")
    m = _TIME_RE.match(value)
    if not m:
        raise ConfigError(f"{where}: {value!r} is not a time 'H:MM' or 'HH:MM'")
    hh, mm = int(m.group(1)), int(m.group(2))
    if hh > 23 or mm > 59:
        raise ConfigError(f"{where}: {value!r} is out of range (00:00-23:59)")
    return hh * 60 + mm


def _fmt_hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


@dataclass(frozen=True, slots=True)
class SpeedRule:
    """One 5.4.10 ``SpeedLimitJson`` entry, validated.

    ``start``/``end`` are minutes of the day (0-1439); ``speed`` is Mbit/s
    (0 = no limit); ``over_speed_threshold`` is percent or None.
    """

    start: int
    end: int
    speed: int
    over_speed_threshold: float | None = None

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < MINUTES_PER_DAY:
                raise ConfigError(f"speed rule {name}: minute of day 0-1439 expected, got {v!r}")
        if not isinstance(self.speed, int) or isinstance(self.speed, bool) or not (
            MIN_SPEED_MBIT <= self.speed <= MAX_SPEED_MBIT
        ):
            raise ConfigError(f"speed rule speed: integer {MIN_SPEED_MBIT}-{MAX_SPEED_MBIT} Mbit/s expected, got {self.speed!r}")
        t = self.over_speed_threshold
        if t is not None and (not _is_number(t) or not MIN_THRESHOLD <= t <= MAX_THRESHOLD):
            raise ConfigError(f"speed rule over_speed_threshold: {MIN_THRESHOLD:g}-{MAX_THRESHOLD:g} % expected, got {t!r}")
        if self.start == self.end and self.end != MINUTES_PER_DAY - 1:
            raise ConfigError(f"speed rule: start equals end ({_fmt_hhmm(self.start)}), an empty window")

    @classmethod
    def from_json(cls, obj: Any, index: int = 0) -> "SpeedRule":
        where = f"speed_limit[{index}]"
        if not isinstance(obj, Mapping):
            raise ConfigError(f"{where}: expected an object, got {type(obj).__name__}")
        unknown = sorted(str(k) for k in obj if k not in _RULE_KEYS)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)}; "
                "allowed: start, end, speed, over_speed_threshold"
            )
        for req in ("start", "end", "speed"):
            if req not in obj:
                raise ConfigError(f"{where}.{req}: missing (required)")
        start = _parse_hhmm(obj["start"], index, "start")
        end = _parse_hhmm(obj["end"], index, "end")
        if start == end and end != MINUTES_PER_DAY - 1:
            raise ConfigError(f"{where}.end: equals start ({obj['end']!r}), an empty window")
        speed = obj["speed"]
        if not isinstance(speed, int) or isinstance(speed, bool):
            raise ConfigError(f"{where}.speed: expected an integer (Mbit/s), got {type(speed).__name__} {speed!r}")
        if not MIN_SPEED_MBIT <= speed <= MAX_SPEED_MBIT:
            raise ConfigError(f"{where}.speed: {speed} is out of range {MIN_SPEED_MBIT}-{MAX_SPEED_MBIT} Mbit/s")
        if "over_speed_threshold" in obj and "threshold" in obj:
            raise ConfigError(f"{where}.threshold: give over_speed_threshold or its alias threshold, not both")
        key = "over_speed_threshold" if "over_speed_threshold" in obj else "threshold"
        thr = obj.get(key)
        if thr is not None:
            if not _is_number(thr):
                raise ConfigError(f"{where}.{key}: expected a number (percent), got {type(thr).__name__} {thr!r}")
            if isinstance(thr, float) and not math.isfinite(thr):
                raise ConfigError(f"{where}.{key}: {thr!r} is not a finite number")
            if not MIN_THRESHOLD <= thr <= MAX_THRESHOLD:
                raise ConfigError(f"{where}.{key}: {thr:g} is out of range {MIN_THRESHOLD:g}-{MAX_THRESHOLD:g} %")
            thr = float(thr)
        return cls(start, end, speed, thr)

    def to_json(self) -> dict:
        d: dict[str, Any] = {"start": _fmt_hhmm(self.start), "end": _fmt_hhmm(self.end), "speed": self.speed}
        if self.over_speed_threshold is not None:
            d["over_speed_threshold"] = self.over_speed_threshold
        return d

    def minutes(self) -> range | list[int]:
        """Minutes of the day this window covers (half-open, 23:59 = midnight)."""
        end = MINUTES_PER_DAY if self.end == MINUTES_PER_DAY - 1 else self.end
        if self.start < end:
            return range(self.start, end)
        return list(range(self.start, MINUTES_PER_DAY)) + list(range(0, end))

    def covers(self, minute: int) -> bool:
        end = MINUTES_PER_DAY if self.end == MINUTES_PER_DAY - 1 else self.end
        if self.start < end:
            return self.start <= minute < end
        return minute >= self.start or minute < end


def _minute_of(t: Any) -> tuple[int, float]:
    """(minute of day, seconds into that minute) of a datetime or time."""
    if isinstance(t, (_dt.datetime, _dt.time)):
        return t.hour * 60 + t.minute, t.second + t.microsecond / 1e6
    raise TypeError(f"expected datetime.datetime or datetime.time, got {type(t).__name__}")


@dataclass(frozen=True, slots=True)
class SpeedSchedule:
    """An immutable, validated 5.4.10 speed schedule."""

    rules: tuple[SpeedRule, ...] = ()
    # Per minute of the day: (speed Mbit/s or None, threshold % or None).
    _table: tuple[tuple[int | None, float | None], ...] = field(
        default=(), init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        for r in rules:
            if not isinstance(r, SpeedRule):
                raise ConfigError(f"SpeedSchedule rules must be SpeedRule, got {type(r).__name__}")
        object.__setattr__(self, "rules", rules)
        speed: list[int | None] = [None] * MINUTES_PER_DAY
        thr: list[float | None] = [None] * MINUTES_PER_DAY
        for r in rules:
            if r.speed == 0:
                continue  # no limit in this window: never beats a real limit
            for m in r.minutes():
                cur = speed[m]
                if cur is None or r.speed < cur:
                    speed[m], thr[m] = r.speed, r.over_speed_threshold
                elif r.speed == cur and r.over_speed_threshold is not None:
                    thr[m] = r.over_speed_threshold if thr[m] is None else min(thr[m], r.over_speed_threshold)
        object.__setattr__(self, "_table", tuple(zip(speed, thr)))

    # -- construction -----------------------------------------------------
    @classmethod
    def from_json(cls, text_or_dict: "str | bytes | Mapping[str, Any]") -> "SpeedSchedule":
        if isinstance(text_or_dict, (str, bytes, bytearray)):
            try:
                obj = json.loads(text_or_dict)
            except ValueError as e:
                raise ConfigError(f"speed limit: invalid JSON: {e}") from None
            except RecursionError:
                raise ConfigError("speed limit: invalid JSON (nested too deeply)") from None
        else:
            obj = text_or_dict
        if not isinstance(obj, Mapping):
            raise ConfigError(f"speed limit: expected an object with 'speed_limit', got {type(obj).__name__}")
        unknown = sorted(str(k) for k in obj if k != "speed_limit")
        if unknown:
            raise ConfigError(f"speed limit: unknown key(s) {', '.join(repr(k) for k in unknown)}; allowed: speed_limit")
        if "speed_limit" not in obj:
            raise ConfigError("speed limit: 'speed_limit' is missing (required)")
        items = obj["speed_limit"]
        if not isinstance(items, list):
            raise ConfigError(f"speed_limit: expected an array, got {type(items).__name__}")
        if len(items) > 65535:
            raise ConfigError(f"speed_limit: {len(items)} rules, at most 65535 allowed")
        return cls(tuple(SpeedRule.from_json(item, i) for i, item in enumerate(items)))

    @classmethod
    def from_file(cls, path: str) -> "SpeedSchedule":
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConfigError(f"speed limit file {path}: {e.strerror or e}") from None
        return cls.from_json(data)

    @classmethod
    def unlimited(cls) -> "SpeedSchedule":
        return cls(())

    def to_json(self) -> dict:
        return {"speed_limit": [r.to_json() for r in self.rules]}

    # -- queries ----------------------------------------------------------
    def speed_mbit(self, t: Any) -> int | None:
        """The limit at ``t`` in Mbit/s, None for no limit."""
        return self._table[_minute_of(t)[0]][0]

    def limit_bps(self, t: Any) -> float | None:
        """The limit at local time ``t`` in bytes per second; None = unlimited."""
        s = self._table[_minute_of(t)[0]][0]
        return None if s is None else float(s * BYTES_PER_MBIT)

    def threshold_at(self, t: Any) -> float | None:
        """``over_speed_threshold`` (%) of the rule that sets the limit at ``t``.

        None where there is no limit or the governing rule has no threshold.
        """
        return self._table[_minute_of(t)[0]][1]

    def next_change(self, t: Any) -> Any:
        """The first instant after ``t`` where the limit or threshold changes.

        Same type as ``t`` (a datetime gets the right date; a time wraps past
        midnight), or None if the schedule never changes.
        """
        minute, _ = _minute_of(t)
        cur = self._table[minute]
        for step in range(1, MINUTES_PER_DAY + 1):
            m = (minute + step) % MINUTES_PER_DAY
            if self._table[m] != cur:
                break
        else:
            return None
        if isinstance(t, _dt.datetime):
            base = t.replace(second=0, microsecond=0)
            return base + _dt.timedelta(minutes=step)
        return _dt.time(m // 60, m % 60, tzinfo=t.tzinfo)

    def seconds_until_change(self, t: Any) -> float | None:
        """Seconds from ``t`` to :meth:`next_change`, None if never."""
        minute, sec = _minute_of(t)
        cur = self._table[minute]
        for step in range(1, MINUTES_PER_DAY + 1):
            if self._table[(minute + step) % MINUTES_PER_DAY] != cur:
                return step * 60.0 - sec
        return None

    def __bool__(self) -> bool:
        return any(s is not None for s, _ in self._table)


# ---------------------------------------------------------------------------
# Token bucket
# ---------------------------------------------------------------------------

def default_burst(rate_bytes_per_s: float | None) -> float:
    """Burst of a bucket at this rate: 64 KiB or 50 ms of rate, whichever larger."""
    if not rate_bytes_per_s:
        return float(MIN_BURST_BYTES)
    return max(float(MIN_BURST_BYTES), rate_bytes_per_s * BURST_SECONDS)


class TokenBucket:
    """A token bucket on bytes with debt, so chunks larger than the burst work.

    ``reserve(n)`` takes ``n`` tokens now (the balance may go negative) and
    returns how long the caller must wait before sending them; it never
    sleeps. ``rate_bytes_per_s`` None (or 0) means unlimited. ``burst_bytes``
    None means :func:`default_burst` of the rate, re-derived on ``set_rate``.
    Not thread-safe by itself (:class:`ScheduledLimiter` holds a lock).
    """

    def __init__(
        self,
        rate_bytes_per_s: float | None,
        burst_bytes: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._auto_burst = burst_bytes is None
        self._rate: float | None = None
        self._burst = float(MIN_BURST_BYTES)
        self._set(rate_bytes_per_s, burst_bytes)
        self._tokens = self._burst
        self._last = clock()

    def _set(self, rate: float | None, burst: float | None) -> None:
        if rate is not None:
            if not _is_number(rate) or rate < 0 or not math.isfinite(rate):
                raise ValueError(f"rate must be a finite number >= 0 bytes/s or None, got {rate!r}")
            rate = float(rate) or None
        self._rate = rate
        if burst is None:
            burst = default_burst(rate)
        elif not _is_number(burst) or burst <= 0:
            raise ValueError(f"burst must be > 0 bytes, got {burst!r}")
        self._burst = float(burst)

    @property
    def rate(self) -> float | None:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    def _refill(self) -> float:
        now = self._clock()
        dt = max(0.0, now - self._last)
        self._last = now
        if self._rate is None:
            self._tokens = self._burst
        else:
            self._tokens = min(self._burst, self._tokens + dt * self._rate)
        return now

    def set_rate(self, rate_bytes_per_s: float | None, burst_bytes: float | None = None) -> None:
        """Change the rate now; tokens earned so far count at the old rate.

        Outstanding debt is repaid at the new rate.
        """
        self._refill()
        self._set(rate_bytes_per_s, None if self._auto_burst and burst_bytes is None else (burst_bytes or self._burst))
        if self._rate is None:
            self._tokens = self._burst
        else:
            self._tokens = min(self._tokens, self._burst)

    def reserve(self, n: float) -> float:
        """Take ``n`` bytes' worth of tokens; return seconds to wait (>= 0)."""
        if n < 0:
            raise ValueError("cannot reserve a negative amount")
        self._refill()
        if self._rate is None:
            return 0.0
        self._tokens -= n
        return 0.0 if self._tokens >= -_EPS_BYTES else -self._tokens / self._rate

    def delay(self) -> float:
        """Seconds until the current debt is repaid (0 if none)."""
        self._refill()
        if self._rate is None or self._tokens >= -_EPS_BYTES:
            return 0.0
        return -self._tokens / self._rate


# ---------------------------------------------------------------------------
# Scheduled limiter
# ---------------------------------------------------------------------------

class ScheduledLimiter:
    """A token bucket whose rate follows a :class:`SpeedSchedule`.

    ``throttle(nbytes)`` is called by the sender for every chunk of bytes it
    puts on the wire (before or after writing it; both work). It blocks as
    needed. The schedule is re-read from the wall clock on every call and
    while waiting (in slices of at most ``max_sleep`` seconds), so a window
    edge or :meth:`replace_schedule` takes effect within one slice, without
    restarting the transfer. Thread-safe: several sender threads may share one
    limiter; they share the budget.
    """

    def __init__(
        self,
        schedule: SpeedSchedule | None = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], _dt.datetime] = _dt.datetime.now,
        sleep: Callable[[float], None] | None = None,
        *,
        max_sleep: float = 0.25,
    ) -> None:
        self._schedule = schedule if schedule is not None else SpeedSchedule.unlimited()
        self._clock = clock
        self._wallclock = wallclock
        #: set by release(): every wait ends at once (the transfer is being stopped)
        self._released = threading.Event()
        self._sleep = sleep if sleep is not None else self._released.wait
        self._max_sleep = max_sleep
        self._lock = threading.Lock()
        self._bucket = TokenBucket(None, None, clock)
        self._threshold: float | None = None
        with self._lock:
            self._refresh_locked()

    @property
    def schedule(self) -> SpeedSchedule:
        return self._schedule

    def _refresh_locked(self) -> None:
        now = self._wallclock()
        rate = self._schedule.limit_bps(now)
        self._threshold = self._schedule.threshold_at(now)
        if rate != self._bucket.rate:
            self._bucket.set_rate(rate)

    def replace_schedule(self, schedule: SpeedSchedule) -> None:
        """Swap the schedule of a running transfer; effective immediately."""
        if not isinstance(schedule, SpeedSchedule):
            raise TypeError("replace_schedule needs a SpeedSchedule")
        with self._lock:
            self._schedule = schedule
            self._refresh_locked()

    def current(self) -> tuple[float | None, float | None]:
        """(limit bytes/s or None, over_speed_threshold % or None) right now."""
        with self._lock:
            self._refresh_locked()
            return self._bucket.rate, self._threshold

    def throttle(self, nbytes: int) -> float:
        """Account ``nbytes`` on the wire; block until allowed. Returns seconds slept."""
        with self._lock:
            self._refresh_locked()
            wait = self._bucket.reserve(nbytes)
        slept = 0.0
        while wait > 0 and not self._released.is_set():
            step = min(wait, self._max_sleep)
            self._sleep(step)
            slept += step
            with self._lock:
                self._refresh_locked()
                wait = self._bucket.delay()
        return slept

    def release(self) -> None:
        """End every wait now and from now on: the transfer is stopping, and what it still
        writes fails on its broken connection rather than after a paced sleep."""
        self._released.set()


# ---------------------------------------------------------------------------
# Over-speed
# ---------------------------------------------------------------------------

class OverSpeedGuard:
    """Measures wire bytes over a sliding window and stops on over-speed.

    ``record(t, nbytes)`` for every chunk on the wire (``t`` monotonic
    seconds); ``check(t, limit_bps, threshold_pct)`` raises
    :class:`OverSpeedError` when the rate over the last ``window_s`` seconds
    exceeds ``limit * (1 + threshold/100)``.

    A window is only judged against a limit that held for all of it: when the
    limit changes (e.g. at a window edge from 200 to 40 Mbit/s) the guard
    waits one full window under the new limit before judging, so bytes sent
    legitimately under the old limit never trip it. No limit or no threshold
    means nothing to judge.
    """

    def __init__(self, window_s: float = 10.0) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = float(window_s)
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._total = 0
        self._limit: float | None = None
        self._limit_since: float | None = None
        self._lock = threading.Lock()

    def record(self, t: float, nbytes: int) -> None:
        with self._lock:
            self._samples.append((t, nbytes))
            self._total += nbytes
            self._trim(t)

    def _trim(self, t: float) -> None:
        lo = t - self.window_s
        s = self._samples
        while s and s[0][0] <= lo:
            self._total -= s.popleft()[1]

    def rate(self, t: float) -> float:
        """Bytes/s over ``(t - window_s, t]``."""
        with self._lock:
            self._trim(t)
            return self._total / self.window_s

    def check(self, t: float, limit_bps: float | None, threshold_pct: float | None) -> float:
        """Raise :class:`OverSpeedError` on over-speed; return the measured rate."""
        with self._lock:
            self._trim(t)
            measured = self._total / self.window_s
            if limit_bps != self._limit or self._limit_since is None:
                self._limit, self._limit_since = limit_bps, t
            if limit_bps is None or threshold_pct is None:
                return measured
            if t - self._limit_since < self.window_s:
                return measured
        if measured > limit_bps * (1 + threshold_pct / 100):
            raise OverSpeedError(measured, limit_bps, threshold_pct, self.window_s)
        return measured


def parse_agent_time(value: Any) -> _dt.datetime:
    """The agent's local wall-clock time from a 5.4.8 ``agent_time``.

    The reference only says it is a string of at most 30 characters. Accepted:
    ISO 8601 (``2024-05-01T08:00:00+08:00``, what :mod:`smsrepl.control.progress`
    emits; the space-separated form too), ``HH:MM[:SS]``, and epoch
    milliseconds as digits (converted to this machine's local time). A UTC
    offset is ignored: the time as written is the agent's local time, which
    is what the schedule is in.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _dt.datetime.fromtimestamp(value / 1000)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"agent_time: expected a time string, got {value!r}")
    s = value.strip()
    if s.isdigit():
        return _dt.datetime.fromtimestamp(int(s) / 1000)
    try:
        return _dt.datetime.fromisoformat(s.replace("Z", "+00:00")).replace(tzinfo=None)
    except ValueError:
        pass
    try:
        t = _dt.time.fromisoformat(s if len(s.split(":")[0]) == 2 else "0" + s)
        return _dt.datetime.combine(_dt.date(2000, 1, 1), t)
    except ValueError:
        raise ConfigError(f"agent_time: {value!r} is not a recognised time") from None


@dataclass(frozen=True, slots=True)
class OverSpeedVerdict:
    """Answer of :func:`judge_over_speed`; truthy when over speed."""

    over: bool
    measured_mbit: float
    limit_mbit: int | None
    threshold_pct: float | None
    agent_time: _dt.datetime
    reason: str

    def __bool__(self) -> bool:
        return self.over


def judge_over_speed(
    report: Mapping[str, Any],
    rules: "SpeedSchedule | Mapping[str, Any] | str",
    *,
    default_threshold: float | None = None,
) -> OverSpeedVerdict:
    """Judge a 5.4.8 progress report against the 5.4.10 rules.

    Uses the report's ``migrate_speed`` (Mbit/s) and ``agent_time`` (the
    agent's local time picks the window). Over speed when the window has a
    limit and a threshold (the rule's, else ``default_threshold``) and
    ``migrate_speed > speed * (1 + threshold/100)``.
    """
    schedule = rules if isinstance(rules, SpeedSchedule) else SpeedSchedule.from_json(rules)
    if "agent_time" not in report:
        raise ConfigError("progress report: agent_time is missing; it is needed to pick the speed window")
    at = parse_agent_time(report["agent_time"])
    speed = report.get("migrate_speed")
    if not _is_number(speed) or speed < 0:
        raise ConfigError(f"progress report: migrate_speed must be a number >= 0 (Mbit/s), got {speed!r}")
    limit = schedule.speed_mbit(at)
    thr = schedule.threshold_at(at)
    if thr is None:
        thr = default_threshold
    if limit is None:
        return OverSpeedVerdict(False, float(speed), None, thr, at, "no limit at this time")
    if thr is None:
        return OverSpeedVerdict(False, float(speed), limit, None, at, "no over_speed_threshold for this window")
    allowed = limit * (1 + thr / 100)
    over = speed > allowed
    reason = (
        f"migrate_speed {speed:g} Mbit/s {'exceeds' if over else 'within'} limit {limit} Mbit/s "
        f"+ {thr:g} % ({allowed:g} Mbit/s) at {at.strftime('%H:%M:%S')}"
    )
    return OverSpeedVerdict(over, float(speed), limit, thr, at, reason)


# ---------------------------------------------------------------------------
# CPU cap (5.10.1 LINUX_CPU_LIMIT)
# ---------------------------------------------------------------------------

MIN_CPU_LIMIT = 1.0
MAX_CPU_LIMIT = 100.0


def parse_cpu_limit(value: Any) -> float:
    """Validate a ``LINUX_CPU_LIMIT`` ``config_value`` (percent of one core).

    The reference types ``config_value`` as a string but its own example sends
    the number ``50``; both are accepted. It gives no range: smsrepl accepts
    1-100 (SPEC: "P % of one core").
    """
    if isinstance(value, bool):
        raise ConfigError(f"LINUX_CPU_LIMIT: expected a percent 1-100, got {value!r}")
    if isinstance(value, str):
        try:
            num = float(value.strip())
        except ValueError:
            raise ConfigError(f"LINUX_CPU_LIMIT: {value!r} is not a number (percent of one core, 1-100)") from None
    elif isinstance(value, (int, float)):
        num = float(value)
    else:
        raise ConfigError(f"LINUX_CPU_LIMIT: expected a percent 1-100, got {type(value).__name__} {value!r}")
    if not math.isfinite(num) or not MIN_CPU_LIMIT <= num <= MAX_CPU_LIMIT:
        raise ConfigError(f"LINUX_CPU_LIMIT: {value!r} is out of range {MIN_CPU_LIMIT:g}-{MAX_CPU_LIMIT:g} (% of one core)")
    return num


class CpuCap:
    """Keeps the process's CPU time at or under ``percent`` of one core.

    Workers call :meth:`pace` between chunks. The cap keeps a CPU debt:
    ``debt += cpu_used - share * wall_elapsed``; earned credit is capped at
    ``credit_s`` CPU-seconds so an idle spell cannot pay for a later burst. While
    the debt is positive every thread that calls ``pace`` sleeps until it is
    repaid, so the whole process (``cpu_time`` defaults to
    :func:`time.process_time`, all threads) averages at most ``percent`` over
    any few seconds, give or take one chunk's CPU. ``margin`` (default 0.93)
    aims slightly under the cap to absorb that granularity and the threads that
    never call ``pace`` (TLS writer, reader): at 0.97 a capped 2 GiB copy peaked at
    30.2% over 5 s windows in one of three runs; 0.93 keeps it under.
    """

    def __init__(
        self,
        percent: Any,
        clock: Callable[[], float] = time.monotonic,
        cpu_time: Callable[[], float] = time.process_time,
        sleep: Callable[[float], None] = time.sleep,
        *,
        margin: float = 0.93,
        credit_s: float = 0.05,
        max_sleep: float = 1.0,
    ) -> None:
        self.percent = parse_cpu_limit(percent)
        self._share = self.percent / 100.0 * margin
        self._clock = clock
        self._cpu_time = cpu_time
        self._sleep = sleep
        self._credit = credit_s
        self._max_sleep = max_sleep
        self._lock = threading.Lock()
        self._last_t = clock()
        self._last_c = cpu_time()
        self._debt = 0.0

    @classmethod
    def from_configurations(cls, body: Mapping[str, Any], **kw: Any) -> "CpuCap | None":
        """The cap from a 5.10.1 body's ``LINUX_CPU_LIMIT`` entry, None if absent."""
        for item in body.get("configurations") or ():
            if isinstance(item, Mapping) and item.get("config_key") == "LINUX_CPU_LIMIT":
                return cls(item.get("config_value"), **kw)
        return None

    def _update_locked(self) -> float:
        t, c = self._clock(), self._cpu_time()
        dt, dc = max(0.0, t - self._last_t), max(0.0, c - self._last_c)
        self._last_t, self._last_c = t, c
        self._debt = max(-self._credit, self._debt + dc - self._share * dt)
        return t

    def debt(self) -> float:
        """CPU-seconds used beyond the cap so far (negative = small credit)."""
        with self._lock:
            self._update_locked()
            return self._debt

    def pace(self, cancel: threading.Event | None = None) -> float:
        """Sleep as long as the process is over its CPU share, or until ``cancel`` is set (the
        caller's transfer is stopping; the cap itself may be shared with later transfers).
        Returns seconds slept."""
        slept = 0.0
        while True:
            with self._lock:
                self._update_locked()
                wait = self._debt / self._share if self._debt > _EPS_CPU_S else 0.0
            if wait <= 0 or (cancel is not None and cancel.is_set()):
                return slept
            step = min(wait, self._max_sleep)
            if cancel is not None:
                cancel.wait(step)
            else:
                self._sleep(step)
            slept += step
