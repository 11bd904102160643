"""What every sender of a task's rounds shares, block or file task alike.

The agent reads it from the control plane once, when a task starts (agent.loop):
the receiver's data address, the TLS context made of the task's certificates, the
CPU cap of its configuration, the host sampler that fills every progress report,
where those reports go, and the speed schedule in force, read when each sender is
built so that a speed limit changed during a round reaches the next disk's sender.
"""
from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from smsrepl.control.hostsample import HostSampler
    from smsrepl.throttle import CpuCap, SpeedSchedule


@dataclass(frozen=True)
class TaskLink:
    task_id: str
    address: tuple[str, int]
    context: ssl.SSLContext
    state_dir: str
    cpu_cap: CpuCap | None
    sampler: HostSampler
    on_report: Callable[[dict], None]
    speed_limit: Callable[[], SpeedSchedule | None]
    #: connections each session runs over (a count, or "auto": transport/streams_auto.py)
    streams: int | str = "auto"


class TaskSide(Protocol):
    """A task's block or file side, as the next one prepared for the task sees it."""

    def close(self) -> None: ...
