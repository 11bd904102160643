"""A thread that reports a round's progress every so often: reports keep coming while data
leaves slowly (a speed limit, a slow link, frames queued on several connections) and until
the receiver confirms the round."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

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
