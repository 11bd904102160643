"""The CPU cap (5.10.1 ``LINUX_CPU_LIMIT``): the process's CPU time kept at or under a share of
one core, by workers that pause between chunks while the process is over its share."""
from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable, Mapping

from smsrepl.errors import ConfigError

MIN_CPU_LIMIT = 1.0
MAX_CPU_LIMIT = 100.0
#: a CPU debt this small (CPU-seconds) is no debt, so a wait computed in floating point always ends
_EPS_CPU_S = 1e-6


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
