"""``--speed-limit FILE``: the schedule read before a send starts (a bad one is refused then), and
read again whenever the file changes, for the running sender."""
from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

from smsrepl.errors import ConfigError, ReplicationError
from smsrepl.cli.configfile import read_flag_file

TYPE_CHECKING = False  # typing itself would cost every command 3 ms of imports

if TYPE_CHECKING:
    from smsrepl.throttle import SpeedSchedule
    from smsrepl.transport.file_sender import FileSender
    from smsrepl.transport.sender import Sender


class ScheduleWatcher:
    """Re-reads the --speed-limit file when it changes, for the running session (a thread
    checks four times a second, so a new schedule applies within about 0.25 s)."""

    INTERVAL = 0.25

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.mtime: int | None = None
        if path:
            try:
                self.mtime = os.stat(path).st_mtime_ns
            except OSError as exc:
                raise ConfigError(f"--speed-limit {path!r} cannot be read: {exc.strerror}") from None
            self.load()  # a bad schedule is refused before anything starts
        self._stop = threading.Event()
        #: the running round's sender (continuous sync makes one per round)
        self.sender: Sender | FileSender | None = None
        #: where a line for the operator goes (above a progress bar, when there is one)
        self.note: Callable[[str], None] = lambda line: print(line, file=sys.stderr)

    def load(self) -> SpeedSchedule | None:
        """The schedule the file holds now; None without --speed-limit."""
        return self._read(self.path) if self.path else None

    @staticmethod
    def _read(path: str) -> SpeedSchedule:
        from smsrepl.throttle import SpeedSchedule

        data = read_flag_file("--speed-limit", path)
        try:
            return SpeedSchedule.from_json(data)
        except ConfigError as exc:
            raise ConfigError(f"--speed-limit {path!r}: {exc.message}") from None

    def watch(self) -> None:
        if self.path:
            threading.Thread(target=self._loop, name="speed-limit-watch", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            if self.sender is not None:
                self.poll()

    def poll(self) -> None:
        path, sender = self.path, self.sender
        if path is None or sender is None:
            return
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            return
        if mtime != self.mtime:
            self.mtime = mtime
            try:
                sender.replace_schedule(self._read(path))
                import logging

                logging.getLogger("smsrepl").info("speed limit reloaded from %s", path)
            except ReplicationError as exc:  # keep the old schedule, say why
                self.note(f"ignoring changed speed limit: {exc}")
