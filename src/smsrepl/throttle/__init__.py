"""How fast a transfer may go: the speed schedule, the pacing to it, the over-speed guard and
the CPU cap.

Everything here is pure Python with the clock as a parameter: nothing opens a socket, nothing
sleeps unless it was handed a ``sleep`` function. ``schedule`` reads the control plane's
5.4.10 speed_limit body; ``limiter`` paces wire bytes to it (a token bucket whose rate follows
the schedule); ``guard`` stops a transfer that goes faster than its limit and threshold allow;
``cpucap`` keeps the process under the 5.10.1 ``LINUX_CPU_LIMIT``.
"""
from __future__ import annotations

from smsrepl.errors import BYTES_PER_MBIT, OverSpeedError
from smsrepl.throttle.cpucap import CpuCap, parse_cpu_limit
from smsrepl.throttle.guard import OverSpeedGuard
from smsrepl.throttle.limiter import ScheduledLimiter, TokenBucket, default_burst
from smsrepl.throttle.schedule import MAX_SPEED_MBIT, SpeedRule, SpeedSchedule

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
    "CpuCap",
    "parse_cpu_limit",
]
