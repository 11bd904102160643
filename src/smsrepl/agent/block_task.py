"""The block-level side of an agent's task (MIGRATE_BLOCK): disks planned, rounds built, disks checked.

:func:`plan_disks` maps the source disks the agent was given to the task's target
disks. A :class:`BlockTask` builds each round the agent's session runs (a
ServerRound: one Sender per disk, the cutover round with the disks quiesced),
keeps the disks' kernel change tracking and the replication lag from before the
first copy on when the task syncs, and counts the differing extents of every disk
for the consistency result (5.4.14).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from smsrepl.agent.link import TaskLink, TaskSide
from smsrepl.agent.server import DiskPlan, ServerResult, ServerRound
from smsrepl.control.state import SessionStateMachine
from smsrepl.errors import ConfigError

if TYPE_CHECKING:
    from smsrepl.blocks.tracker import TrackedDirtyMap
    from smsrepl.replication.lag import LagMeter

log = logging.getLogger("smsrepl.agent")


def target_name_for(disk: dict) -> str:
    """The receiver's target name for a 5.4.1 target disk: its relation_name, else its name,
    without a /dev/ prefix (``/dev/vdb`` -> ``vdb``)."""
    name = disk.get("relation_name") or disk.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"target disk {disk!r} has neither relation_name nor name")
    return name.rsplit("/", 1)[-1]


def plan_disks(task: dict, local: dict[str, str]) -> list[DiskPlan]:
    """Source disks (as registered, mapped to local paths) to the task's target disks: by equal
    name where the target lists one, else by position (the reference keeps the source's order)."""
    targets = (task.get("target_server") or {}).get("disks") or []
    if not isinstance(targets, list) or not targets:
        raise ConfigError("the task's target_server lists no disks")
    by_name = {d.get("name"): d for d in targets if isinstance(d, dict)}
    plans = []
    for i, (name, path) in enumerate(local.items()):
        t = by_name.get(name) or (targets[i] if i < len(targets) else None)
        if t is None:
            raise ConfigError(f"source disk {name} has no target disk in the task")
        plans.append(DiskPlan(name, path, target_name_for(t)))
    if len({p.target for p in plans}) != len(plans):
        raise ConfigError("two source disks map to the same target disk")
    return plans


class _AllDisks:
    """The dirty maps of a server's disks, seen as one backlog (lag.LagMeter's view)."""

    def __init__(self, maps: list[TrackedDirtyMap]) -> None:
        self.maps = maps

    def dirty_blocks(self) -> int:
        return sum(m.dirty_blocks() for m in self.maps)


class BlockTask:
    def __init__(self, plans: list[DiskPlan], link: TaskLink, *, tracking: str = "auto", freeze: bool = False,
                 freeze_timeout: float | None = None) -> None:
        self.plans = plans
        self.link = link
        #: changed-block tracking of each source disk (blocks.tracker), kept from the first copy on
        self.tracking = tracking
        self.trackers: dict[str, TrackedDirtyMap | None] = {}
        self.lag: LagMeter | None = None
        self.freeze = freeze
        self.freeze_timeout = freeze_timeout

    def track_changes(self) -> None:
        """Kernel change tracking of every source disk, from before the first copy on (where it
        cannot run: sync rounds that read each disk whole, and one notice)."""
        from smsrepl.blocks.tracker import open_tracking
        from smsrepl.replication.lag import LagMeter

        for plan in self.plans:
            if plan.path not in self.trackers:
                self.trackers[plan.path] = open_tracking(plan.path, self.tracking, notice=log.warning)
        maps = [m for m in self.trackers.values() if m is not None]
        kind = "kernel" if maps and len(maps) == len(self.trackers) else ("scan" if not maps else "kernel+scan")
        self.lag = LagMeter(_AllDisks(maps) if maps else None, tracking=kind)

    def make_round(self, states: SessionStateMachine, *, first_copy: bool, cutover: bool) -> ServerRound:
        from smsrepl.transport.sender import Sender

        link, lag = self.link, self.lag

        def make_sender(disk: DiskPlan, on_report):
            return Sender(disk.path, disk.target, link.address, link.context, link.state_dir,
                          speed_limit=link.speed_limit(), cpu_cap=link.cpu_cap, on_report=on_report,
                          host_sampler=link.sampler, dirty_map=self.trackers.get(disk.path),
                          trace=lag.trace if lag is not None else None, streams=link.streams)

        quiesce = None
        if cutover:
            from smsrepl.blocks.quiesce import FREEZE_TIMEOUT, Quiesce

            quiesce = Quiesce([p.path for p in self.plans], freeze=self.freeze, state_dir=link.state_dir,
                              timeout=self.freeze_timeout or FREEZE_TIMEOUT)
        if lag is not None:
            lag.round_started()
        return ServerRound(self.plans, make_sender, link.state_dir, states=states, first_copy=first_copy,
                           cutover=cutover, on_report=link.on_report, quiesce=quiesce)

    def round_done(self, result: ServerResult) -> None:
        if self.lag is not None:
            self.lag.round_done(result)

    def consistency(self) -> dict:
        """The 5.4.14 body: each disk's differing extents against its target."""
        from smsrepl.control.consistency import entry, for_upload
        from smsrepl.transport.sender import Sender

        items = []
        for disk in self.plans:
            sender = Sender(disk.path, disk.target, self.link.address, self.link.context, self.link.state_dir)
            differ, total = sender.check()
            items.append(entry(disk.name, total, different=differ))
        return for_upload(items)

    def adopt(self, old: TaskSide) -> None:
        """Take over the change tracking of the task prepared before this one (a START that
        failed is prepared again): the disks both name keep their trackers, so the next sync
        round still reads only what changed. What this task does not name stops."""
        if not isinstance(old, BlockTask):
            old.close()
            return
        paths = {plan.path for plan in self.plans}
        for path, m in old.trackers.items():
            if path in paths:
                self.trackers[path] = m
            elif m is not None:
                m.close()
        old.trackers = {}

    def close(self) -> None:
        """Stop change tracking (the next agent starts its own, and reads each disk whole once)."""
        for m in self.trackers.values():
            if m is not None:
                m.close()
        self.trackers = {}
