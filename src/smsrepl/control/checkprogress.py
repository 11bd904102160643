"""Progress of a consistency check, as 5.4.8 reports (``verify ... --progress``).

The reference has no subtask for a check; it is reported under the data subtask it closes
(``SYNC_LINUX_BLOCK`` for a block check: it runs after the last sync round).
``replicatesize``/``totalsize`` are bytes compared / bytes to compare; nothing crosses the wire
locally, so ``migrate_speed`` is 0 and ``remain_time`` comes from the compare rate.
``process_trace`` says what is compared and what was found different so far.
"""
from __future__ import annotations

from collections.abc import Callable

from smsrepl.control.progress import ProgressTracker


class CheckProgress:
    """``on_progress(done, total, different)`` for a compare: each call hands one report to
    ``report``; ``finish`` hands the last one (progress 100)."""

    def __init__(self, report: Callable[[dict], None], subtask: str, what: str, unit: str,
                 host_sampler=None) -> None:
        self.report = report
        self.subtask = subtask
        self.what = what
        self.unit = unit
        self.host_sampler = host_sampler
        self.tracker: ProgressTracker | None = None

    def __call__(self, done: int, total: int, different: int | None = None) -> None:
        """``different``: found so far, None where the compare knows only at its end."""
        if self.tracker is None:
            self.tracker = ProgressTracker(self.subtask, total, host_sampler=self.host_sampler)
        self.tracker.update(done, wire_bytes=0, raw_bytes=0)
        so_far = "" if different is None else f": {different} {self.unit} different so far"
        self.tracker.set_trace(f"consistency check of {self.what}{so_far}")
        self.report(self.tracker.report())

    def finish(self, different: int) -> None:
        if self.tracker is None:
            return
        self.tracker.set_trace(f"consistency check of {self.what}: {different} {self.unit} different")
        self.report(self.tracker.finish())
