"""Pacing to a speed schedule: a token bucket on wire bytes (with debt, so a chunk larger than
the burst still goes), and the limiter a sender calls for every chunk, whose rate follows the
schedule's window at the wall-clock time and a schedule replaced mid-transfer. Pure Python
with the clocks as parameters: nothing sleeps unless handed a ``sleep`` function.
"""
from __future__ import annotations

import datetime as _dt
import math
import threading
import time
from typing import Callable

from smsrepl.throttle.schedule import SpeedSchedule, is_number

#: Minimum burst of a token bucket (bytes).
MIN_BURST_BYTES = 64 * 1024
#: Burst as time at the current rate (seconds).
BURST_SECONDS = 0.05
#: Rounding slack: a debt this small (bytes) is no debt, so a wait computed in floating point
#: always ends.
_EPS_BYTES = 1e-3


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
            if not is_number(rate) or rate < 0 or not math.isfinite(rate):
                raise ValueError(f"rate must be a finite number >= 0 bytes/s or None, got {rate!r}")
            rate = float(rate) or None
        self._rate = rate
        if burst is None:
            burst = default_burst(rate)
        elif not is_number(burst) or burst <= 0:
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
