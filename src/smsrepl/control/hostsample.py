"""Host and process figures of a 5.4.8 report (CPU, memory, disk I/O of the host and of this
process), from psutil; the null sampler reports zeros where none is wanted."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol

MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class HostSample:
    total_cpu_usage: float = 0.0
    agent_cpu_usage: float = 0.0
    total_mem_usage: float = 0.0
    agent_mem_usage: float = 0.0
    total_disk_io: float = 0.0
    agent_disk_io: float = 0.0


class Sampler(Protocol):
    def sample(self) -> HostSample: ...


class NullHostSampler:
    """All zeros; for tests and where psutil is unavailable."""

    def sample(self) -> HostSample:
        return HostSample()


def clamp(v: float, lo: float, hi: float) -> float:
    """``v`` within [lo, hi]; ``lo`` for a NaN or an infinity."""
    if not math.isfinite(v):
        return lo
    return float(min(hi, max(lo, v)))


class HostSampler:
    """Host and process usage from psutil.

    CPU percentages and disk rates are measured between consecutive calls to
    :meth:`sample` (the first call primes the counters and reports 0 for
    them). Disk I/O counts bytes read plus written; the host figure sums all
    disks. Figures psutil cannot give on this platform read 0.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, pid: int | None = None) -> None:
        import psutil  # imported here so the module imports without it

        self._psutil = psutil
        self._clock = clock
        self._proc = psutil.Process(pid)
        self._ncpu = psutil.cpu_count() or 1
        self._last_t = clock()
        self._last_disk = self._disk_bytes()
        self._last_pdisk = self._proc_disk_bytes()
        psutil.cpu_percent(None)
        self._proc.cpu_percent(None)

    def _disk_bytes(self) -> int | None:
        try:
            c = self._psutil.disk_io_counters()
        except Exception:  # noqa: BLE001 - containers without /proc/diskstats
            return None
        return None if c is None else c.read_bytes + c.write_bytes

    def _proc_disk_bytes(self) -> int | None:
        try:
            c = self._proc.io_counters()
        except Exception:  # noqa: BLE001 - not permitted / not supported
            return None
        return c.read_bytes + c.write_bytes

    def sample(self) -> HostSample:
        ps = self._psutil
        t = self._clock()
        dt = t - self._last_t
        self._last_t = t
        total_cpu = ps.cpu_percent(None)
        agent_cpu = self._proc.cpu_percent(None) / self._ncpu
        vm = ps.virtual_memory()
        total_mem = (vm.total - vm.available) / MB
        try:
            agent_mem = self._proc.memory_info().rss / MB
        except Exception:  # noqa: BLE001
            agent_mem = 0.0
        disk, pdisk = self._disk_bytes(), self._proc_disk_bytes()
        total_io = agent_io = 0.0
        if dt > 0:
            if disk is not None and self._last_disk is not None:
                total_io = max(0, disk - self._last_disk) / MB / dt
            if pdisk is not None and self._last_pdisk is not None:
                agent_io = max(0, pdisk - self._last_pdisk) / MB / dt
        self._last_disk, self._last_pdisk = disk, pdisk
        return HostSample(
            total_cpu_usage=clamp(total_cpu, 0, 100),
            agent_cpu_usage=clamp(min(agent_cpu, total_cpu if total_cpu > 0 else agent_cpu), 0, 100),
            total_mem_usage=clamp(total_mem, 0, 1048576.0),
            agent_mem_usage=clamp(agent_mem, 0, 1048576.0),
            total_disk_io=clamp(total_io, 0, 10000.0),
            agent_disk_io=clamp(agent_io, 0, 10000.0),
        )
