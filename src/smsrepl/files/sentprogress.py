"""A file round's progress counted as its data reaches the socket, not as it is read.

The round counts file bytes done an entry (or a directory's batch of entries) at a time, as
their operations go into the op stream; the stream holds up to a few 4 MiB batches before
they leave, and a paced batch leaves over seconds (4 MiB at 1 Mbit/s: 34 s). Each count is
marked at the stream position it was made at; what is reported is the count at the position
the socket has reached, moving linearly between two marks, and byte for byte through an entry
whose operations are still being added (a large file read while it is sent).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from smsrepl.control.progress import ProgressTracker
from smsrepl.files.opstream import OpStream
from smsrepl.control.report_ticker import REPORT_EVERY


class SentProgress:
    def __init__(self, ops: OpStream) -> None:
        self.ops = ops
        self._lock = threading.Lock()
        #: (op stream position, file bytes done there), oldest first; the first at or before the socket
        self._marks: deque[tuple[int, int]] = deque([(0, 0)])
        #: file bytes of the entries done, sent or not
        self.done = 0

    def entry_done(self, file_bytes: int) -> None:
        """Entries of ``file_bytes`` are in the op stream (call on the thread that adds to it)."""
        with self._lock:
            self.done += file_bytes
            self._marks.append((self.ops.added, self.done))

    def sent(self) -> int:
        """File bytes whose operations have reached the socket (any thread)."""
        at = self.ops.on_socket()
        with self._lock:
            marks = self._marks
            while len(marks) > 1 and marks[1][0] <= at:
                marks.popleft()
            pos0, done0 = marks[0]
            if len(marks) == 1:  # past the last mark: the entry being added now
                return done0 + (at - pos0)
            pos1, done1 = marks[1]
            return done0 + (done1 - done0) * (at - pos0) // (pos1 - pos0)


class RoundReports:
    """A file round's 5.4.8 reports: the tracker fed with what reached the socket, a report
    emitted at most every REPORT_EVERY seconds, from the round's thread as entries are done
    and from a ticker (control.report_ticker) while a batch leaves slowly."""

    def __init__(self, tracker: ProgressTracker, on_report: Callable[[dict], None], sent: SentProgress,
                 wire: Callable[[], int]) -> None:
        self.tracker = tracker
        self.on_report = on_report
        self._sent = sent
        self._wire = wire  # the round's bytes on the wire so far
        self._lock = threading.Lock()
        self._last = 0.0

    def update(self) -> None:
        with self._lock:
            sent = self._sent
            self.tracker.update(min(sent.sent(), self.tracker.totalsize), self._wire(), sent.ops.on_socket())
            if time.monotonic() - self._last >= REPORT_EVERY:
                self._last = time.monotonic()
                self.on_report(self.tracker.report())
