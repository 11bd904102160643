"""Continuous sync (SYNCING): after the copy, a sync round every interval; then the cutover.

    sync = ContinuousSync(make_sender, interval=30, dirty_map=dm)
    agent:          sync.request_round()     # the SYNC command: a round now, not at the next interval
    signal handler: sync.request_cutover()   # first SIGTERM: the agent quiesced the source
                    sync.abort()             # second SIGTERM or SIGINT
    results = sync.run()   # the latest rounds' results (sync.rounds counts them all)

``run`` returns after the cutover round: a round that began after the
cutover was requested, so the target equals the source as of that request
(a round that resumed a copy begun before it is not one: another follows).
Before it, ``quiesce`` (blocks/quiesce.py) syncs or freezes the source's
file systems, and thaws them after it; a freeze its guard had to thaw at its
timeout before the round ended makes the cutover round run again.
Each round is a session of its own (``make_sender()`` builds its Sender), so
a lost connection costs one round, which the next one resumes. Replication
lag (lag.py: backlog, rates, the cutover's estimated length, convergence) is
available as :meth:`lag` and goes into every report's ``process_trace``.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from smsrepl import faults
from smsrepl.errors import ReplicationError, TransportError
from smsrepl.replication.lag import LagMeter
from smsrepl.transport.memory import release_free_memory

log = logging.getLogger("smsrepl.continuous")  # the name logs have always carried
#: round results kept: a sync that runs for weeks must not grow by one result a round
KEEP_RESULTS = 100


class ContinuousSync:
    def __init__(self, make_sender: Callable[[], Any], *, interval: float = 30.0, dirty_map=None,
                 on_round: Callable[[Any], Any] | None = None, retry_delay: float = 2.0,
                 max_failures: int = 5, quiesce=None, tracking: str | None = None) -> None:
        if interval < 0:
            raise ValueError("interval must be >= 0")
        self._make_sender = make_sender
        self.interval = interval
        self.dirty_map = dirty_map
        self.on_round = on_round
        self.retry_delay = retry_delay
        self.max_failures = max_failures
        self.quiesce = quiesce
        self.meter = LagMeter(dirty_map, tracking=tracking or ("map" if dirty_map is not None else "scan"))
        #: what the cutover's quiesce did to each file system (blocks.quiesce.Quiesce.begin)
        self.quiesced: dict[str, str] = {}
        #: what the quiesce of the completed cutover round did (for its summary)
        self.cutover_quiesce: dict[str, str] | None = None
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

    @property
    def cutover_requested(self) -> bool:
        return self._cutover.is_set()

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
        """The backlog (``dirty_bytes``), seconds since a round completed, and lag.py's figures."""
        since = None if self.last_round_end is None else round(time.monotonic() - self.last_round_end, 1)
        return {"seconds_since_round": since, **self.meter.figures()}

    def trace(self) -> str:
        return self.meter.trace(seconds_since_round=self.lag()["seconds_since_round"])

    def run(self) -> list:
        try:
            return self._run()
        finally:
            self._unquiesce()

    def _unquiesce(self) -> bool:
        """Thaw what the cutover froze; False when its guard had thawed it before the round ended."""
        if not self.quiesced or self.quiesce is None:
            return True
        self.quiesced = {}
        return self.quiesce.end()

    def _run(self) -> list:
        failures = 0
        while True:
            final = self._cutover.is_set()  # decided before the round starts: it covers every earlier write
            if self._aborted.is_set():
                raise TransportError("continuous sync aborted; rerun to resume")
            if final and self.quiesce is not None and not self.quiesced:
                # what the file systems hold in memory reaches the disk before the round's boundary
                self.quiesced = self.quiesce.begin() or {"(none mounted)": "nothing to sync"}
                faults.point("cutover.quiesced")
            sender = self._make_sender()
            self._sender = sender
            self.meter.round_started()
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
            self.meter.round_done(result)
            resumed_from: int = getattr(result, "resumed_from", None) or 0  # a file round resumes nothing
            if final and resumed_from:
                # it resumed a copy begun before the cutover: what lies below where it resumed
                # was read then and may have changed since; one more round, still quiesced
                log.info("the cutover round resumed an earlier copy at %d: running one more round",
                         resumed_from)
                final = False
            if final:
                self.cutover_quiesce = dict(self.quiesced)
                faults.point("cutover.before_thaw")  # the target now holds the source as it is frozen
            if final and not self._unquiesce():
                log.warning("the freeze did not hold for the whole cutover round: running it again")
                continue
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
