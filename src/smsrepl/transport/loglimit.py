"""Warnings a flood cannot multiply: one line per kind of event every few seconds, with a count.

A receiver on an open port meets scanners, plaintext probes and floods of
half-open connections; a line for each would bury the lines that matter
(2,000 plaintext probes wrote 2,000 WARNING lines in 3.6 s) and fill disks.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

#: seconds between two lines of the same kind
EVERY = 10.0


class LimitedWarnings:
    def __init__(self, logger: logging.Logger, every: float = EVERY, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.every = every
        self._clock = clock
        self._lock = threading.Lock()
        self._kinds: dict[str, list] = {}  # kind -> [time of the last line, events not shown since]

    def warning(self, kind: str, fmt: str, *args) -> bool:
        """Log ``fmt % args`` unless a line of ``kind`` went out less than ``every`` seconds ago
        (then count it, for the next line of that kind to say). True when it was logged."""
        now = self._clock()
        with self._lock:
            state = self._kinds.get(kind)
            if state is not None and now - state[0] < self.every:
                state[1] += 1
                return False
            held = state[1] if state is not None else 0
            since = now - state[0] if state is not None else 0.0
            self._kinds[kind] = [now, 0]
        if held:
            fmt += " (and %d more like it in the last %.0f s)"
            args = (*args, held, since)
        self.logger.warning(fmt, *args)
        return True
