"""The speed schedule of a transfer (API reference 5.4.9 / 5.4.10, SPEC "Speed-limit semantics"):
which limit, in bytes per second, and which over-speed threshold hold at a local time.

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

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from smsrepl.errors import BYTES_PER_MBIT, ConfigError

MIN_SPEED_MBIT = 0
MAX_SPEED_MBIT = 10_000
MIN_THRESHOLD = 10.0
MAX_THRESHOLD = 100.0
MINUTES_PER_DAY = 1440

_TIME_RE = re.compile(r"^(\d{1,2}):(\d{2})$")
_RULE_KEYS = frozenset({"start", "end", "speed", "over_speed_threshold", "threshold"})


def is_number(v: Any) -> bool:
    """An int or float, not a bool."""
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
        if t is not None and (not is_number(t) or not MIN_THRESHOLD <= t <= MAX_THRESHOLD):
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
            if not is_number(thr):
                raise ConfigError(f"{where}.{key}: expected a number (percent), got {type(thr).__name__} {thr!r}")
            if isinstance(thr, float) and not math.isfinite(thr):
                raise ConfigError(f"{where}.{key}: {thr!r} is not a finite number")
            if not MIN_THRESHOLD <= thr <= MAX_THRESHOLD:
                raise ConfigError(f"{where}.{key}: {thr:g} is out of range {MIN_THRESHOLD:g}-{MAX_THRESHOLD:g} %")
            thr = float(thr)
        return cls(start, end, speed, thr)

    def minutes(self) -> range | list[int]:
        """Minutes of the day this window covers (half-open, 23:59 = midnight)."""
        end = MINUTES_PER_DAY if self.end == MINUTES_PER_DAY - 1 else self.end
        if self.start < end:
            return range(self.start, end)
        return list(range(self.start, MINUTES_PER_DAY)) + list(range(0, end))

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
                    old = thr[m]
                    thr[m] = r.over_speed_threshold if old is None else min(old, r.over_speed_threshold)
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
    def unlimited(cls) -> "SpeedSchedule":
        return cls(())

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

    def __bool__(self) -> bool:
        return any(s is not None for s, _ in self._table)
