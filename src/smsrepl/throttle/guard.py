"""The over-speed guard: wire bytes measured over a sliding window, and the transfer stopped
(OverSpeedError) when they exceed the schedule's limit by more than its over_speed_threshold."""
from __future__ import annotations

import collections
import threading

from smsrepl.errors import OverSpeedError


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
