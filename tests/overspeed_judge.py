"""The control plane's over-speed judgement of a 5.4.8 progress report against the 5.4.10 rules,
as the tests' oracle: the reports smsrepl emits (migrate_speed, agent_time) must be judgeable
by it, and the speed schedule must give it the window's limit and threshold."""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Any, Mapping

from smsrepl.errors import ConfigError
from smsrepl.throttle.schedule import SpeedSchedule, is_number


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
    if not is_number(speed) or speed < 0:
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
