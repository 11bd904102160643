"""Replication lag of a continuous sync: how far the target trails, and whether it catches up.

Measured per round, from what the change tracking knows before the round
starts (the backlog: blocks written since the last round froze its map,
each counted once however often it was rewritten) and how long the round
took to send them:

* ``lag_s``: seconds since the start of the last round that completed; the
  target holds the source as of that moment.
* ``dirty_bytes``: the backlog, what the next round has to send now.
* ``dirty_rate_bps``: bytes of new backlog per second between round starts.
* ``drain_rate_bps``: backlog bytes a round sends per second it runs.
* ``cutover_estimate_s``: the backlog at the drain rate (a round that reads the
  whole source: as long as the last one took).
* ``converging``: false once, over ``WINDOW`` rounds in a row, the source
  dirtied faster than rounds drain and the backlog did not shrink: more
  rounds will not bring the cutover closer (AWS's replication states call
  this lag "growing"); a WARNING says so once, and every report carries it.
"""
from __future__ import annotations

import logging
import time
import json
from collections import deque
from dataclasses import dataclass

from smsrepl.kernels import FINE_BLOCK

log = logging.getLogger("smsrepl.lag")  # the name logs have always carried

#: rounds looked at for the convergence verdict and the rates
WINDOW = 3


@dataclass(frozen=True, slots=True)
class RoundFigures:
    started: float  # monotonic
    seconds: float
    backlog: int  # bytes the round had to send (None-free: data bytes where no map knew)
    whole_source: bool  # the round read the whole source


class LagMeter:
    def __init__(self, dirty_map=None, *, clock=time.monotonic, tracking: str = "scan") -> None:
        self.dirty_map = dirty_map
        self.tracking = tracking
        self._clock = clock
        self._rounds: deque[RoundFigures] = deque(maxlen=WINDOW + 1)
        self._started: float | None = None
        self._backlog_at_start: int | None = None
        self.last_done: float | None = None
        self.converging = True

    def backlog(self) -> int | None:
        return self.dirty_map.dirty_blocks() * FINE_BLOCK if self.dirty_map is not None else None

    def round_started(self) -> None:
        self._started = self._clock()
        self._backlog_at_start = self.backlog()

    def round_done(self, result) -> None:
        """After a completed round (a sender's RoundResult, or anything with its fields)."""
        if self._started is None:
            return
        dirty = getattr(result, "dirty_blocks", None)
        whole = dirty is None
        backlog = dirty * FINE_BLOCK if dirty is not None else (
            self._backlog_at_start if self._backlog_at_start is not None else getattr(result, "data_bytes", 0))
        self._rounds.append(RoundFigures(self._started, max(1e-3, self._clock() - self._started), backlog, whole))
        self.last_done = self._started
        self._started = None
        self._judge()

    def _rates(self) -> tuple[float | None, float | None]:
        r = list(self._rounds)
        if len(r) < 2:
            return None, None
        span = r[-1].started - r[0].started
        dirty = sum(x.backlog for x in r[1:]) / span if span > 0 else None
        drain_rounds = [x for x in r[1:] if not x.whole_source] or r[1:]
        drain = sum(x.backlog for x in drain_rounds) / sum(x.seconds for x in drain_rounds)
        return dirty, drain

    def _judge(self) -> None:
        r = list(self._rounds)
        if len(r) <= WINDOW:
            return
        tail = r[-WINDOW:]
        faster = all(b.backlog / max(1e-3, b.started - a.started) >= b.backlog / b.seconds
                     for a, b in zip(r[-WINDOW - 1:-1], tail))
        growing = all(b.backlog >= a.backlog > 0 for a, b in zip(r[-WINDOW - 1:-1], tail))
        converging = not (faster and growing)
        if self.converging and not converging:
            log.warning("replication is not converging: over the last %d rounds the source changed faster "
                        "than rounds sent its changes (backlog %d -> %d bytes); the cutover will not get shorter",
                        WINDOW, r[-WINDOW - 1].backlog, r[-1].backlog)
        self.converging = converging

    def figures(self) -> dict:
        now = self._clock()
        backlog = self.backlog()
        dirty, drain = self._rates()
        if backlog is not None and drain:
            estimate = backlog / drain
        elif self._rounds:
            estimate = self._rounds[-1].seconds
        else:
            estimate = None
        return {
            "tracking": self.tracking,
            "lag_s": None if self.last_done is None else round(now - self.last_done, 1),
            "dirty_bytes": backlog,
            "dirty_rate_bps": None if dirty is None else int(dirty),
            "drain_rate_bps": None if drain is None else int(drain),
            "cutover_estimate_s": None if estimate is None else round(estimate, 1),
            "converging": self.converging,
        }

    def trace(self, **extra) -> str:
        """The figures as a report's process_trace says them (``NOT CONVERGING:`` first when so)."""
        head = "" if self.converging else "NOT CONVERGING: "
        return head + "lag " + json.dumps({**extra, **self.figures()}, separators=(",", ":"))
