"""Progress reports in the shape of the API reference's 5.4.8.

``PUT /v3/tasks/{task_id}/progress`` body, field by field (reference table
5-184; required = the reference marks it 是):

================  ========  ========  =========================================
field             type      required  range / unit
================  ========  ========  =========================================
subtask_name      String    yes       enum, <= 255 chars
progress          Integer   yes       0-100 (%)
replicatesize     Long      yes       0 .. 2**63-1, bytes
totalsize         Long      yes       0 .. 2**63-1, bytes
process_trace     String    yes       <= 2048 chars
migrate_speed     Double    no        0-10000, Mbit/s
compress_rate     Double    no        0-10000 (unit not given; see below)
remain_time       Long      no        0 .. 2147483647, seconds
total_cpu_usage   Double    no        0-100, %
agent_cpu_usage   Double    no        0-100, %
total_mem_usage   Double    no        0-1048576, MB
agent_mem_usage   Double    no        0-1048576, MB
total_disk_io     Double    no        0-10000, MB/s
agent_disk_io     Double    no        0-10000, MB/s
need_migration_test Boolean no        (not emitted by smsrepl)
agent_time        String    no        <= 30 chars
================  ========  ========  =========================================

Choices where the reference is silent, documented here once:

* ``migrate_speed``: bytes on the wire (after compression), the same bytes the
  speed limit counts, in 10**6 bit/s, averaged over the last
  :data:`RATE_WINDOW_S` seconds (settles after that long).
* ``remain_time``: from the rate of *replicated* (logical) bytes over the same
  window; rounded to whole seconds, at least 1 while anything remains (rounding
  up would overstate every estimate by up to a second); 0 once nothing remains;
  :data:`REMAIN_UNKNOWN` (the field's maximum) while no rate is known yet.
* ``compress_rate``: compressed size as a percentage of the original
  (``100 * wire / raw``; 100 = no gain, 40 = shrunk to 40 %), the usual
  meaning of 压缩率; 100.0 until something was compressed.
* CPU: ``total_cpu_usage`` is the host's usage; ``agent_cpu_usage`` is this
  process's usage on the same scale (share of all cores), so both are 0-100
  and agent <= total.
* MB is 2**20 bytes; memory "used" is ``total - available``; the agent's is
  its resident set size.
* ``agent_time``: the agent's local time, ISO 8601 with its UTC offset, to the
  second (``2024-05-01T08:00:00+08:00``, 25 chars); the offset lets the
  control plane pick the speed window (it is there "for over-speed
  detection").
"""
from __future__ import annotations

import collections
import datetime as _dt
import math
import threading
import time
from typing import Any, Callable, Mapping

from smsrepl.control.hostsample import HostSample, HostSampler, NullHostSampler, Sampler, clamp
from smsrepl.errors import ReportError

__all__ = [
    "MIGRATE_LINUX_BLOCK",
    "SYNC_LINUX_BLOCK",
    "MIGRATE_WINDOWS_BLOCK",
    "SYNC_WINDOWS_BLOCK",
    "MIGRATE_LINUX_FILE",
    "SYNC_LINUX_FILE",
    "DATA_SUBTASKS",
    "SUBTASK_NAMES",
    "REPORT_FIELDS",
    "REQUIRED_FIELDS",
    "REMAIN_UNKNOWN",
    "RATE_WINDOW_S",
    "HostSample",  # with the host sampler in hostsample.py, and named here too as before
    "HostSampler",
    "NullHostSampler",
    "ProgressTracker",
    "ReportError",
    "report_problems",
    "validate_report",
    "subtask_for",
    "format_agent_time",
]

MIGRATE_LINUX_BLOCK = "MIGRATE_LINUX_BLOCK"
SYNC_LINUX_BLOCK = "SYNC_LINUX_BLOCK"
MIGRATE_WINDOWS_BLOCK = "MIGRATE_WINDOWS_BLOCK"
SYNC_WINDOWS_BLOCK = "SYNC_WINDOWS_BLOCK"
MIGRATE_LINUX_FILE = "MIGRATE_LINUX_FILE"
SYNC_LINUX_FILE = "SYNC_LINUX_FILE"

#: The data-transfer subtasks smsrepl reports (MIGRATE_* first copy, SYNC_* later rounds).
DATA_SUBTASKS = frozenset(
    {MIGRATE_LINUX_BLOCK, SYNC_LINUX_BLOCK, MIGRATE_WINDOWS_BLOCK, SYNC_WINDOWS_BLOCK, MIGRATE_LINUX_FILE, SYNC_LINUX_FILE}
)

#: Every subtask_name the reference's enum lists (5.4.8). ``DETACH_AGENT_IMAGE``
#: is in the prose, ``DETTACH_AGENT_IMAGE`` in the enum list; both accepted.
SUBTASK_NAMES = frozenset(
    {
        "CREATE_CLOUD_SERVER", "SSL_CONFIG", "ATTACH_AGENT_IMAGE", "DETACH_AGENT_IMAGE", "DETTACH_AGENT_IMAGE",
        "FORMAT_DISK_LINUX", "FORMAT_DISK_LINUX_FILE", "FORMAT_DISK_LINUX_BLOCK", "FORMAT_DISK_WINDOWS",
        "CLONE_VM", "CONFIGURE_LINUX", "CONFIGURE_LINUX_BLOCK", "CONFIGURE_LINUX_FILE", "CONFIGURE_WINDOWS",
    }
    | DATA_SUBTASKS
)

LONG_MAX = 2**63 - 1
INT_MAX = 2**31 - 1
REMAIN_UNKNOWN = INT_MAX
RATE_WINDOW_S = 3.0
MIN_SPAN_S = 0.5
TRACE_MAX = 2048

# field -> (kind, min, max, required); kind: "str", "int", "float", "bool"
REPORT_FIELDS: dict[str, tuple[str, float | None, float | None, bool]] = {
    "subtask_name": ("str", 0, 255, True),
    "progress": ("int", 0, 100, True),
    "replicatesize": ("int", 0, LONG_MAX, True),
    "totalsize": ("int", 0, LONG_MAX, True),
    "process_trace": ("str", 0, TRACE_MAX, True),
    "migrate_speed": ("float", 0, 10000, False),
    "compress_rate": ("float", 0, 10000, False),
    "remain_time": ("int", 0, INT_MAX, False),
    "total_cpu_usage": ("float", 0, 100, False),
    "agent_cpu_usage": ("float", 0, 100, False),
    "total_mem_usage": ("float", 0, 1048576.0, False),
    "agent_mem_usage": ("float", 0, 1048576.0, False),
    "total_disk_io": ("float", 0, 10000.0, False),
    "agent_disk_io": ("float", 0, 10000.0, False),
    "need_migration_test": ("bool", None, None, False),
    "agent_time": ("str", 0, 30, False),
}
REQUIRED_FIELDS = tuple(k for k, v in REPORT_FIELDS.items() if v[3])
#: The keys every smsrepl report carries (SPEC's list; need_migration_test is not ours).
EMITTED_FIELDS = tuple(k for k in REPORT_FIELDS if k != "need_migration_test")


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


def report_problems(report: Any, *, require_all: bool = False) -> list[str]:
    """Everything wrong with ``report`` as a 5.4.8 body (empty list = valid).

    ``require_all``: every field smsrepl emits must be present (not only the
    reference's required ones).
    """
    if not isinstance(report, Mapping):
        return [f"report must be an object, got {type(report).__name__}"]
    problems: list[str] = []
    for k in report:
        if k not in REPORT_FIELDS:
            problems.append(f"unknown field {k!r}")
    for k in EMITTED_FIELDS if require_all else REQUIRED_FIELDS:
        if k not in report:
            problems.append(f"{k}: missing")
    for k, v in report.items():
        if k not in REPORT_FIELDS:
            continue
        kind, lo, hi, _ = REPORT_FIELDS[k]
        if kind == "bool":
            if not isinstance(v, bool):
                problems.append(f"{k}: expected a boolean, got {type(v).__name__}")
            continue
        if lo is None or hi is None:  # only booleans have no range
            continue
        if kind == "str":
            if not isinstance(v, str):
                problems.append(f"{k}: expected a string, got {type(v).__name__}")
            elif len(v) > hi:
                problems.append(f"{k}: {len(v)} chars, at most {_num(hi)}")
            elif k == "subtask_name" and v not in SUBTASK_NAMES:
                problems.append(f"subtask_name: {v!r} is not a 5.4.8 subtask name")
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            problems.append(f"{k}: expected a number, got {type(v).__name__}")
            continue
        if kind == "int" and not isinstance(v, int):
            problems.append(f"{k}: expected an integer, got {v!r}")
            continue
        if isinstance(v, float) and not math.isfinite(v):
            problems.append(f"{k}: {v!r} is not finite")
        elif not lo <= v <= hi:
            problems.append(f"{k}: {v!r} is out of range {_num(lo)}-{_num(hi)}")
    return problems


def validate_report(report: Any, *, require_all: bool = False) -> None:
    """Raise :class:`ReportError` listing every problem of ``report``."""
    problems = report_problems(report, require_all=require_all)
    if problems:
        raise ReportError("invalid 5.4.8 progress report: " + "; ".join(problems))


def subtask_for(kind: str, *, first_copy: bool, windows: bool = False) -> str:
    """The subtask name for a ``block``/``file`` transfer; MIGRATE_* for the first copy."""
    phase = "MIGRATE" if first_copy else "SYNC"
    if kind == "block":
        return f"{phase}_{'WINDOWS' if windows else 'LINUX'}_BLOCK"
    if kind == "file":
        if windows:
            raise ValueError("the reference has no Windows file-level subtask")
        return f"{phase}_LINUX_FILE"
    raise ValueError(f"kind must be 'block' or 'file', got {kind!r}")


def format_agent_time(epoch_ms: int, tz: _dt.tzinfo | None = None) -> str:
    """``agent_time``: local ISO 8601 with offset, to the second (<= 30 chars)."""
    t = _dt.datetime.fromtimestamp(epoch_ms / 1000, tz=tz) if tz else _dt.datetime.fromtimestamp(epoch_ms / 1000).astimezone()
    return t.replace(microsecond=0).isoformat()


# ---------------------------------------------------------------------------
# Tracker
# ---------------------------------------------------------------------------

def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class ProgressTracker:
    """Tracks one round (first copy or one sync round) and emits 5.4.8 reports.

    ``update`` takes *cumulative* counts for this round:

    * ``replicated_bytes``: bytes of ``totalsize`` dealt with so far (sent,
      skipped as unchanged or as holes all count; it drives ``progress``,
      ``replicatesize`` and the ETA);
    * ``wire_bytes``: bytes put on the wire so far (drives ``migrate_speed``);
      defaults to ``replicated_bytes``;
    * ``raw_bytes``: the uncompressed size of what ``wire_bytes`` carried
      (drives ``compress_rate``); defaults to ``wire_bytes``.

    Thread-safe. ``progress`` never decreases within the round, stays <= 99
    until :meth:`finish`, and is 100 exactly in the report ``finish`` returns.
    """

    def __init__(
        self,
        subtask_name: str,
        totalsize: int,
        clock: Callable[[], float] = time.monotonic,
        wallclock_ms: Callable[[], int] = _now_ms,
        host_sampler: Sampler | None = None,
        *,
        rate_window_s: float = RATE_WINDOW_S,
        tz: _dt.tzinfo | None = None,
    ) -> None:
        if subtask_name not in SUBTASK_NAMES:
            raise ValueError(f"{subtask_name!r} is not a 5.4.8 subtask name")
        if not isinstance(totalsize, int) or isinstance(totalsize, bool) or not 0 <= totalsize <= LONG_MAX:
            raise ValueError(f"totalsize must be an integer 0..2**63-1 bytes, got {totalsize!r}")
        self.subtask_name = subtask_name
        self.totalsize = totalsize
        self._clock = clock
        self._wallclock_ms = wallclock_ms
        self._sampler = host_sampler if host_sampler is not None else NullHostSampler()
        self._window = float(rate_window_s)
        self._tz = tz
        self._lock = threading.Lock()
        t0 = clock()
        # (t, replicated, wire) cumulative samples, thinned to >= 50 ms apart
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque([(t0, 0, 0)])
        self._replicated = 0
        self._wire = 0
        self._raw = 0
        self._progress = 0
        self._trace = ""
        self._finished = False

    # -- input ------------------------------------------------------------
    def update(self, replicated_bytes: int, wire_bytes: int | None = None, raw_bytes: int | None = None) -> None:
        if self._finished:
            return
        with self._lock:
            t = self._clock()
            self._replicated = max(self._replicated, int(replicated_bytes))
            if wire_bytes is None:
                wire_bytes = self._replicated
            self._wire = max(self._wire, int(wire_bytes))
            self._raw = max(self._raw, int(raw_bytes if raw_bytes is not None else self._wire))
            s = self._samples
            if len(s) > 1 and t - s[-2][0] < 0.05:
                s[-1] = (t, self._replicated, self._wire)
            else:
                s.append((t, self._replicated, self._wire))
            self._trim(t)
            if self.totalsize > 0:
                self._progress = max(self._progress, min(99, self._replicated * 100 // self.totalsize))

    def set_trace(self, text: str) -> None:
        """``process_trace``: free text (truncated to 2048 chars)."""
        if len(text) > TRACE_MAX:
            text = text[: TRACE_MAX - 1] + "\u2026"
        with self._lock:
            self._trace = text

    def _trim(self, t: float) -> None:
        s = self._samples
        while len(s) > 1 and s[1][0] <= t - self._window:
            s.popleft()

    # -- figures ----------------------------------------------------------
    def _rates(self, t: float) -> tuple[float, float]:
        """(replicated bytes/s, wire bytes/s) over the last window."""
        self._trim(t)
        base = self._samples[0]
        if t - base[0] <= 0:
            return 0.0, 0.0
        # A floor on the span keeps the first instants from reading absurd
        # rates (a chunk over microseconds); exact from MIN_SPAN_S on.
        span = max(t - base[0], MIN_SPAN_S)
        return (self._replicated - base[1]) / span, (self._wire - base[2]) / span

    def report(self) -> dict:
        """A 5.4.8 body with every field smsrepl emits."""
        with self._lock:
            t = self._clock()
            repl_rate, wire_rate = self._rates(t)
            remaining = max(0, self.totalsize - self._replicated)
            if self._finished or remaining == 0:
                remain = 0
            elif repl_rate > 0:
                remain = min(INT_MAX, max(1, round(remaining / repl_rate)))
            else:
                remain = REMAIN_UNKNOWN
            progress = 100 if self._finished else self._progress
            replicated = self._replicated
            if self._finished:
                replicated = max(replicated, self.totalsize)
                wire_rate = 0.0
            compress = 100.0 * self._wire / self._raw if self._raw > 0 else 100.0
            trace = self._trace
        host = self._sampler.sample()
        return {
            "subtask_name": self.subtask_name,
            "progress": int(progress),
            "replicatesize": int(min(replicated, LONG_MAX)),
            "totalsize": int(self.totalsize),
            "process_trace": trace,
            "migrate_speed": round(clamp(wire_rate * 8 / 1e6, 0, 10000), 3),
            "compress_rate": round(clamp(compress, 0, 10000), 2),
            "remain_time": int(remain),
            "total_cpu_usage": round(host.total_cpu_usage, 2),
            "agent_cpu_usage": round(host.agent_cpu_usage, 2),
            "total_mem_usage": round(host.total_mem_usage, 2),
            "agent_mem_usage": round(host.agent_mem_usage, 2),
            "total_disk_io": round(host.total_disk_io, 3),
            "agent_disk_io": round(host.agent_disk_io, 3),
            "agent_time": format_agent_time(self._wallclock_ms(), self._tz),
        }

    def finish(self) -> dict:
        """Mark the round complete; the returned report has ``progress`` 100."""
        with self._lock:
            self._finished = True
        return self.report()
