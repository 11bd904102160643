"""Continuous sync (SYNCING): after the copy, a sync round every interval; then the cutover.

    sync = ContinuousSync(make_sender, interval=30, dirty_map=dm)
    agent:          sync.request_round()     # the SYNC command: a round now, not at the next interval
    signal handler: sync.request_cutover()   # first SIGTERM: the agent quiesced the source
                    sync.abort()             # second SIGTERM or SIGINT
    results = sync.run()   # the latest rounds' results (sync.rounds counts them all)

``run`` returns after the cutover round: a round that began after the
cutover was requested, so the target equals the source as of that request.
Each round is a session of its own (``make_sender()`` builds its Sender), so
a lost connection costs one round, which the next one resumes. Replication
lag (bytes marked dirty and seconds since the last completed round) is
available as :meth:`lag` and goes into every report's ``process_trace``.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .errors import ReplicationError, TransportError
from .memory import release_free_memory

FINE_BLOCK = 4096
#: round results kept: a sync that runs for weeks must not grow by one result a round
KEEP_RESULTS = 100


class ContinuousSync:
    def __init__(self, make_sender: Callable[[], Any], *, interval: float = 30.0, dirty_map=None,
                 on_round: Callable[[Any], Any] | None = None, retry_delay: float = 2.0,
                 max_failures: int = 5) -> None:
        if interval < 0:
            raise ValueError("interval must be >= 0")
        self._make_sender = make_sender
        self.interval = interval
        self.dirty_map = dirty_map
        self.on_round = on_round
        self.retry_delay = retry_delay
        self.max_failures = max_failures
        self._cutover = threading.Event()
        self._aborted = threading.Event()
        self._wake = threading.Event()  # a round is wanted now (SYNC, cutover or abort)
        self._sender = None
        self.last_round_end: float | None = None
        self.results: deque = deque(maxlen=KEEP_RESULTS)
        self.rounds = 0

    def request_round(self) -> None:
        """Run the next round now (the SYNC command) instead of at the end of the interval."""
        self._wake.set()

    def request_cutover(self) -> None:
        self._cutover.set()
        self._wake.set()

    def abort(self) -> None:
        self._aborted.set()
        self._wake.set()
        sender = self._sender
        if sender is not None:
            sender.stop()

    def lag(self) -> dict:
        """``dirty_bytes`` marked since the last round froze the map, and seconds since a round completed."""
        dirty = self.dirty_map.dirty_blocks() * FINE_BLOCK if self.dirty_map is not None else None
        since = None if self.last_round_end is None else round(time.monotonic() - self.last_round_end, 1)
        return {"dirty_bytes": dirty, "seconds_since_round": since}

    def trace(self) -> str:
        return "lag " + json.dumps(self.lag(), separators=(",", ":"))

    def run(self) -> list:
        failures = 0
        while True:
            final = self._cutover.is_set()  # decided before the round starts: it covers every earlier write
            if self._aborted.is_set():
                raise TransportError("continuous sync aborted; rerun to resume")
            sender = self._make_sender()
            self._sender = sender
            try:
                result = sender.run()
            except ReplicationError as exc:
                if self._aborted.is_set():
                    raise TransportError("continuous sync aborted; rerun to resume") from None
                failures += 1
                if not exc.resumable or failures >= self.max_failures:
                    raise
                self._aborted.wait(self.retry_delay)
                continue  # the next round resumes from the receiver's checkpoint
            finally:
                self._sender = None
                del sender
                # each round's buffers come and go: hand what the allocator kept back to the
                # system, so memory between rounds is what is live, not the largest round's high-water
                release_free_memory()
            failures = 0
            self.last_round_end = time.monotonic()
            self.results.append(result)
            self.rounds += 1
            if self.on_round is not None:
                self.on_round(result)
            if final:
                return list(self.results)
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._cutover.is_set():
                self._wake.set()  # keep the cutover's wake for a wait that might still come
