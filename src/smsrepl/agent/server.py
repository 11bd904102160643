"""Whole-server sessions: one round replicates every disk of a source server.

A :class:`ServerRound` runs one Sender per disk, one disk after the other,
so the disks share the bandwidth schedule and the CPU cap by construction
(never two streams at once), and turns the per-disk reports into one 5.4.8
progress stream for the server: sizes add up, ``progress`` never goes back,
and 100 is reported only when the last disk is done. The server's session
state (SMS.7728 pairs) is fired here, once per round, not per disk.

It has the Sender's face (``run``, ``stop``, ``stop_requested``, ``dir``), so
session.BlockSession and continuous.ContinuousSync drive it unchanged.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from smsrepl.blocks.source import BlockSource
from smsrepl.errors import ConfigError, TransportError
from smsrepl.control.progress import TRACE_MAX
from smsrepl.control.state import Event, SessionStateMachine

log = logging.getLogger("smsrepl.agent")


@dataclass(frozen=True)
class DiskPlan:
    """A source disk (its registered name, e.g. ``/dev/vda``, and the local device or image
    read for it) and the receiver's target name it goes to."""

    name: str
    path: str
    target: str


@dataclass
class ServerResult:
    kind: str
    disks: list
    source_size: int
    data_bytes: int
    wire_bytes: int
    seconds: float

    @property
    def dirty_blocks(self) -> int | None:
        """Blocks the disks' dirty maps named, or None when some disk was read whole."""
        counts = [getattr(r, "dirty_blocks", None) for r in self.disks]
        known = [c for c in counts if c is not None]
        return sum(known) if len(known) == len(counts) else None


def disk_sizes(disks: list[DiskPlan]) -> list[int]:
    sizes = []
    for d in disks:
        with BlockSource(d.path) as src:
            sizes.append(src.size)
    return sizes


_BEGIN = {"full": Event.START, "sync": Event.SYNC_START, "cutover": Event.CUTOVER}
_END = {"full": Event.COPY_DONE, "sync": Event.SYNC_DONE, "cutover": Event.CUTOVER_DONE}


class _Round:
    """What ServerRound and TreeRound share: the round's kind and the session state it fires,
    and the running sender, which stop() breaks and replace_schedule() reaches."""

    def __init__(self, state_dir: str, states: SessionStateMachine | None, first_copy: bool, cutover: bool) -> None:
        self.dir = state_dir
        self.states = states
        self.kind = "cutover" if cutover else ("full" if first_copy else "sync")
        self.stop_requested = False
        self._sender = None

    def stop(self) -> None:
        self.stop_requested = True
        sender = self._sender
        if sender is not None:
            sender.stop()

    def replace_schedule(self, schedule) -> None:
        """A new speed schedule for the running transfer (the next senders are built with it)."""
        sender = self._sender
        if sender is not None:
            sender.replace_schedule(schedule)

    def _fire(self, event: Event) -> None:
        if self.states is not None and self.states.can(event):
            self.states.fire(event)

    def _start(self, sender):
        self._sender = sender
        if self.stop_requested:  # stop() came before the sender existed
            sender.stop()
        return sender


class ServerRound(_Round):
    def __init__(self, disks: list[DiskPlan], make_sender: Callable[..., Any], state_dir: str, *,
                 states: SessionStateMachine | None = None, first_copy: bool = True, cutover: bool = False,
                 on_report: Callable[[dict], None] | None = None, quiesce=None) -> None:
        """``make_sender(disk, on_report)`` builds the Sender of one disk (with no state
        machine of its own: the server's is ``states``). ``quiesce`` (blocks.quiesce.Quiesce)
        syncs or freezes the disks' file systems before a cutover round and thaws them after."""
        if not disks:
            raise ConfigError("a server session needs at least one disk")
        super().__init__(state_dir, states, first_copy, cutover)
        self.disks = disks
        self.sizes = disk_sizes(disks)
        self.make_sender = make_sender
        self.on_report = on_report
        self.quiesce = quiesce
        self._best = 0

    def run(self) -> ServerResult:
        self._fire(_BEGIN[self.kind])
        self._fire(Event.COPY_RUNNING)
        results = []
        if self.quiesce is not None:
            self.quiesce.begin()  # before the first disk's boundary: every disk's round covers it
        held = True
        try:
            for i, disk in enumerate(self.disks):
                if self.stop_requested:
                    raise TransportError("the server round was stopped")
                result = self._start(self.make_sender(disk, lambda rep, i=i: self._report(i, rep))).run()
                resumed_from: int = result.resumed_from
                if self.kind == "cutover" and resumed_from:
                    # it resumed a copy begun before the cutover: what lies below where it
                    # resumed was read then and may have changed since; the disk again, quiesced
                    if self.stop_requested:
                        raise TransportError("the server round was stopped")
                    result = self._start(self.make_sender(disk, lambda rep, i=i: self._report(i, rep))).run()
                results.append(result)
        finally:
            if self.quiesce is not None:
                held = self.quiesce.end()
        if not held:
            raise TransportError("the file systems were thawed by the freeze's timeout before the cutover round "
                                 "ended: the cutover runs again")
        self._sender = None
        self._fire(_END[self.kind])
        return ServerResult(self.kind, results, sum(self.sizes), sum(r.data_bytes for r in results),
                            sum(r.wire_bytes for r in results), sum(r.seconds for r in results))

    def _report(self, i: int, rep: dict) -> None:
        total = sum(self.sizes)
        # a resumed disk reports only what is left of it: the rest was done before
        done = sum(self.sizes[:i]) + self.sizes[i] - rep["totalsize"] + rep["replicatesize"]
        done = max(0, min(total, done))
        last = i == len(self.disks) - 1
        progress = 100 if last and rep["progress"] >= 100 else min(99, done * 100 // max(1, total))
        self._best = max(self._best, progress)
        out = dict(rep)
        out["totalsize"] = total
        out["replicatesize"] = done
        out["progress"] = self._best
        if not last and rep.get("remain_time") is not None and rep["replicatesize"]:
            # the disks still to come, at the rate this one goes
            per_byte = rep["remain_time"] / max(1, rep["totalsize"] - rep["replicatesize"])
            out["remain_time"] = min(2**31 - 1, int(rep["remain_time"] + per_byte * sum(self.sizes[i + 1:])))
        head = f"disk {i + 1}/{len(self.disks)} {self.disks[i].name}: "
        out["process_trace"] = (head + rep.get("process_trace", ""))[:TRACE_MAX]
        if self.on_report is not None:
            self.on_report(out)


@dataclass
class TreeResult:
    kind: str
    data_bytes: int
    wire_bytes: int
    seconds: float
    files_sent: int
    scope: str = "whole"  # or "journal": only the directories the change journal named
    source_moved: bool = False  # the source changed under the round (vanished, changed while read)


class TreeRound(_Round):
    """One round of a file-level task (MIGRATE_FILE): the source tree to the receiver's
    directory target, with the Sender's face for session.BlockSession like ServerRound."""

    def __init__(self, make_sender: Callable[[], Any], state_dir: str, *, states: SessionStateMachine | None = None,
                 first_copy: bool = True, cutover: bool = False) -> None:
        super().__init__(state_dir, states, first_copy, cutover)
        self.make_sender = make_sender

    def run(self) -> TreeResult:
        self._fire(_BEGIN[self.kind])
        self._fire(Event.COPY_RUNNING)
        sender = self.make_sender()
        r = self._start(sender).run()
        self._fire(_END[self.kind])
        if r.stats.unmatched_rules:
            from smsrepl.files.rules import unmatched_note

            for key, rule in r.stats.unmatched_rules:
                log.warning("%s", unmatched_note(key, rule, sender.source))
        return TreeResult(self.kind, r.stats.bytes_sent, r.wire_bytes, r.seconds, r.stats.files_sent, r.scope,
                          r.stats.source_moved)
