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
from collections.abc import Callable

from smsrepl.control.progress import ProgressTracker
from smsrepl.control.sent_marks import SentMarks
from smsrepl.files.opstream import OpStream
from smsrepl.control.report_ticker import REPORT_EVERY


class SentProgress:
    def __init__(self, ops: OpStream) -> None:
        self.ops = ops
        #: file bytes done by op stream position; past the last mark, the entry being added now
        self._marks = SentMarks(ops.on_socket, (0,), beyond=True)
        #: file bytes of the entries done, sent or not
        self.done = 0

    def entry_done(self, file_bytes: int) -> None:
        """Entries of ``file_bytes`` are in the op stream (call on the thread that adds to it)."""
        self.done += file_bytes
        self._marks.add(self.ops.added, (self.done,))

    def sent(self) -> int:
        """File bytes whose operations have reached the socket (any thread)."""
        return self._marks.value()[0]


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
