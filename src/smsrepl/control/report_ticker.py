"""A thread that reports a round's progress every so often: reports keep coming while data
leaves slowly (a speed limit, a slow link, frames queued on several connections) and until
the receiver confirms the round."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

TYPE_CHECKING = False  # typing itself would cost a short command 3 ms of imports
if TYPE_CHECKING:  # a file sender loads the round's machinery only once its round begins
    from smsrepl.control.progress import ProgressTracker

log = logging.getLogger("smsrepl.progress")

#: seconds between progress reports while a round runs
REPORT_EVERY = 1.0


class Ticker:
    """Calls ``tick()`` at once and then every ``every`` seconds until the ``with`` block ends;
    the thread is joined there, so nothing is reported after the round's last report."""

    def __init__(self, tick: Callable[[], None], every: float = REPORT_EVERY / 4) -> None:
        self._tick = tick
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="progress")

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            try:
                self._tick()
            except Exception as exc:  # what watches a copy is not part of it: the copy goes on
                log.warning("progress reports stopped: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
                return
            if self._stop.wait(self._every):
                return


class RoundReports:
    """A round's 5.4.8 reports: ``figures()`` (bytes replicated, on the wire, raw) fed to the
    tracker at every update(), a report emitted at most every REPORT_EVERY seconds (the first
    at once); ``trace()`` says what each report's process_trace carries."""

    def __init__(self, tracker: ProgressTracker, on_report: Callable[[dict], None],
                 figures: Callable[[], tuple[int, int, int]], trace: Callable[[], str] | None = None) -> None:
        self.tracker = tracker
        self.on_report = on_report
        self._figures = figures
        self._trace = trace
        self._lock = threading.Lock()
        self._last = 0.0

    def update(self) -> None:
        with self._lock:
            self.tracker.update(*self._figures())
            now = time.monotonic()
            if now - self._last >= REPORT_EVERY:
                self._last = now
                if self._trace is not None:
                    self.tracker.set_trace(self._trace())
                self.on_report(self.tracker.report())
