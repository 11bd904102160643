"""A file round's progress counted as its data reaches the socket, not as it is read.

The round counts file bytes done an entry (or a directory's batch of entries) at a time, as
their operations go into the op stream; the stream holds up to a few 4 MiB batches before
they leave, and a paced batch leaves over seconds (4 MiB at 1 Mbit/s: 34 s). Each count is
marked at the stream position it was made at; what is reported is the count at the position
the socket has reached, moving linearly between two marks, and byte for byte through an entry
whose operations are still being added (a large file read while it is sent).
"""
from __future__ import annotations

from smsrepl.control.sent_marks import SentMarks
from smsrepl.files.opstream import OpStream


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

