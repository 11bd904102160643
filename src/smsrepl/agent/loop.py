"""The reference agent loop: commands from the control plane in, a whole-server session out.

    agent = Agent(ControlPlane(url, token, verify=ca), source_id, {"/dev/vda": "/dev/vda"}, state_dir)
    agent.run()          # until the task is finished (cutover) or deleted, or stop() is called

What it does (API v3 sections in brackets):
- polls ``GET /v3/sources/{id}/command`` [5.5.1] and answers every command with
  ``POST .../command_result`` [5.5.2]: START (full copy of every disk; then
  SYNCING with a sync round every ``sync_interval`` seconds when the task says
  ``syncing``), STOP (pause, resumable), SYNC (a round now), DELETE (stop, drop
  state), SKIP (no consistency check);
- reads the task [5.4.5], its certificates [5.7.1] and passphrase [5.4.11],
  speed limit [5.4.9] (polled while running; a change applies to the running
  transfer) and configuration [5.10.2] (LINUX_CPU_LIMIT);
- reports states [5.3.6], progress [5.4.8] and, after the cutover round (or
  after the copy when the task does not sync), the consistency result [5.4.14].

The data transfer never waits for the control plane: reports go through an
:class:`Outbox` that keeps them while the control plane is unreachable
(states in order, only the latest progress) and delivers them once it is back.
``request_cutover()`` (SIGTERM in ``smsrepl agent``) runs the last round once
the source is quiesced: the target then equals the source as of that call.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from typing import Any

from smsrepl.blocks.replica import private_makedirs
from smsrepl.errors import ConfigError, ReplicationError
from smsrepl.replication.session import BlockSession
from smsrepl.control.state import CommandResult, ServerCommand, SessionState
from smsrepl.agent.client import ControlPlane
from smsrepl.errors import ControlPlaneError
from smsrepl.agent.server import DiskPlan, ServerRound, TreeRound

log = logging.getLogger("smsrepl.agent")

DATA_PORT = 8900
_ERRORS = {SessionState.REPL_ERROR, SessionState.SYNC_ERROR, SessionState.CUT_ERROR}


class Outbox:
    """Reports on their way to the control plane, delivered in order by a thread of their own.

    While the control plane does not answer, reports wait (progress: only the latest per
    task and subtask is kept, so a subtask's last report is never replaced by the next
    subtask's first; everything else in order) and the thread retries every ``retry`` s."""

    def __init__(self, cp: ControlPlane, *, retry: float = 1.0) -> None:
        self.cp = cp
        self.retry = retry
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.delivered = 0
        self.failed_attempts = 0
        self._thread = threading.Thread(target=self._loop, name="agent-outbox", daemon=True)
        self._thread.start()

    def put(self, kind: str, ident: str, body: dict) -> None:
        with self._cond:
            if kind == "progress":
                subtask = body.get("subtask_name")
                for i, (k, ident2, old) in enumerate(self._items):
                    if k == "progress" and ident2 == ident and old.get("subtask_name") == subtask:
                        del self._items[i]  # a newer report replaces one not yet delivered
                        break
            self._items.append((kind, ident, body))
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._items)

    def flush(self, timeout: float) -> bool:
        """Wait until everything was delivered (True) or ``timeout`` passed."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._items and time.monotonic() < end:
                self._cond.wait(min(0.1, max(0.0, end - time.monotonic())))
            return not self._items

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _send(self, kind: str, ident: str, body: dict) -> None:
        {"progress": self.cp.put_progress, "state": self.cp.put_state,
         "command_result": self.cp.post_command_result, "consistency": self.cp.post_consistency_result,
         "network_check": self.cp.post_network_check}[kind](ident, body)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                kind, ident, body = self._items[0]
            try:
                self._send(kind, ident, body)
            except ControlPlaneError as exc:
                if exc.resumable:  # unreachable or 5xx/429 after the client's retries: keep it
                    self.failed_attempts += 1
                    log.warning("control plane unavailable (%s); %d report(s) kept", exc, self.pending())
                    with self._cond:
                        self._cond.wait(self.retry)
                        if self._closed:
                            return
                    continue
                log.error("control plane refused a %s report: %s", kind, exc)  # never accepted: dropped
            with self._cond:
                if self._items and self._items[0][2] is body:
                    self._items.popleft()
                    self.delivered += 1
                self._cond.notify_all()


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

    def __init__(self, maps: list) -> None:
        self.maps = maps

    def dirty_blocks(self) -> int:
        return sum(m.dirty_blocks() for m in self.maps)


class Agent:
    def __init__(self, cp: ControlPlane, source_id: str, disks: dict[str, str], state_dir: str, *,
                 task_id: str | None = None, data_port: int = DATA_PORT, poll_interval: float = 2.0,
                 sync_interval: float = 30.0, speed_poll: float = 5.0, host: str | None = None,
                 outbox_retry: float = 1.0, retry_delay: float = 2.0, netcheck_seconds: float = 2.0,
                 tree: str | None = None, tree_target: str = "root", tracking: str = "auto",
                 freeze: bool = False, freeze_timeout: float | None = None) -> None:
        if not disks and not tree:
            raise ConfigError("the agent needs --disk NAME=PATH (block tasks) or --tree DIR (file tasks)")
        self.cp = cp
        self.source_id = source_id
        self.disks = dict(disks or {})
        #: the source tree of file-level tasks (MIGRATE_FILE) and the receiver's directory target for it
        self.tree = tree
        self.tree_target = tree_target
        self._rules = None
        self.state_dir = os.path.abspath(state_dir)
        private_makedirs(self.state_dir)
        self.task_id = task_id
        self.data_port = data_port
        self.poll_interval = poll_interval
        self.sync_interval = sync_interval
        self.speed_poll = speed_poll
        self.retry_delay = retry_delay
        self.netcheck_seconds = netcheck_seconds
        self.host = host  # overrides the task's migration_ip (a lab on loopback)
        self.outbox = Outbox(cp, retry=outbox_retry)
        self.task: dict | None = None
        self.session: BlockSession | None = None
        self.finished = False
        self.deleted = False
        self.consistency: dict | None = None
        self._stop = threading.Event()
        self._cutover = threading.Event()
        self._wake = threading.Event()
        self._schedule = None
        self._schedule_raw: Any = None
        self._ctx = None
        self._cpu_cap = None
        self._plans: list[DiskPlan] = []
        self._round: ServerRound | None = None
        self._cutover_running = False
        #: a SYNC came while a round ran: one more round once it ends (several SYNCs make one)
        self._sync_queued = False
        self._last_round_end = 0.0
        self._rounds: list = []
        self._sampler = None
        self._file_task = False
        #: changed-block tracking of each source disk (blocks.tracker), kept from the first copy on
        self.tracking = tracking
        self._trackers: dict[str, Any] = {}
        self._journal = None  # the source tree's change journal (files.journal), file tasks that sync
        self._lag = None
        self.freeze = freeze
        self.freeze_timeout = freeze_timeout

    # --- control ----------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request_cutover(self) -> None:
        """The source is quiesced: run the last round, check, report, and finish."""
        self._cutover.set()
        self._wake.set()

    @property
    def copied(self) -> bool:
        return os.path.exists(os.path.join(self.state_dir, "copied"))

    # --- the loop ---------------------------------------------------------------
    def _task_file(self) -> str:
        return os.path.join(self.state_dir, "task.json")

    def _resume_task(self) -> None:
        """An agent restarted in the middle of a task carries on with it (the control plane
        will not send START again): the copy resumes from the receiver's checkpoints."""
        try:
            with open(self._task_file()) as fh:
                rec = json.load(fh)
        except (OSError, ValueError):
            return
        if rec.get("finished") or not rec.get("task_id"):
            self.finished = bool(rec.get("finished"))
            return
        log.info("resuming task %s after a restart", rec["task_id"])
        try:
            self._prepare(rec["task_id"])
            result = self.session.command("START")
            if not result.ok:
                log.error("could not resume task %s: %s", rec["task_id"], result.result_detail)
        except ReplicationError as exc:  # e.g. the control plane is down: START from it will come
            log.error("could not resume task %s: %s", rec["task_id"], exc)
            self.session = None

    def _save_task(self, **extra) -> None:
        from smsrepl.blocks.replica import write_json_atomic

        write_json_atomic(self._task_file(), {"task_id": self.task_id, **extra})

    def run(self) -> int:
        """Poll and act until finished, deleted or stopped; 0 when the task finished or was deleted."""
        last_speed = 0.0
        self._resume_task()
        try:
            while not self._stop.is_set() and not self.finished:
                self._poll_command()
                now = time.monotonic()
                if self.session is not None and now - last_speed >= self.speed_poll:
                    last_speed = now
                    self._refresh_speed_limit()
                self._maybe_round()
                if self.finished or self.deleted:
                    break
                self._wake.wait(self.poll_interval)
                self._wake.clear()
        finally:
            if self.session is not None and self.session.running and not (self.finished or self.deleted):
                self.session.command("STOP")
            if self.session is not None:
                self.session.wait(30)
            self.close()
            self.outbox.close()
        return 0 if (self.finished or self.deleted) else 3

    def _poll_command(self) -> None:
        try:
            body = self.cp.get_command(self.source_id)
        except ControlPlaneError as exc:
            if exc.resumable:
                log.warning("no command from the control plane (%s); the transfer goes on", exc)
                return
            raise
        if not body or not body.get("command_name"):
            return
        try:
            cmd = ServerCommand.from_json(body)
        except ConfigError as exc:
            log.error("ignoring a malformed command: %s", exc)
            return
        result = self._handle(cmd)
        self.outbox.put("command_result", self.source_id, result.to_json())

    def _handle(self, cmd: ServerCommand) -> CommandResult:
        name = cmd.command_name
        try:
            if name.value == "START":
                if self.session is None:
                    self._prepare(cmd.task_id or self.task_id)
                return self.session.command("START")
            if self.session is None:
                return CommandResult.fail(name, "no task has been started")
            if name.value == "SYNC" and self.session.running:
                return self._queue_sync(name)
            if name.value in ("STOP", "DELETE"):
                self._sync_queued = False  # a pause or the end: no round after it
            result = self.session.command(name)
            if name.value == "DELETE" and result.ok:
                self.deleted = True
            return result
        except ReplicationError as exc:
            return CommandResult.fail(name, exc)

    def _queue_sync(self, name) -> CommandResult:
        """SYNC while a round runs: one more round after it, as soon as the session is synced
        again (_maybe_round); SYNCs until then add nothing to it."""
        coalesced = self._sync_queued
        self._sync_queued = True
        log.info("SYNC during a running round: %s", "already queued" if coalesced else "one more round after it")
        return CommandResult.success(name, state=self.session.states.state.value, queued=True,
                                     coalesced=coalesced)

    # --- set-up from the task -------------------------------------------------------
    def _prepare(self, task_id: str | None) -> None:
        from smsrepl.throttle import CpuCap
        from smsrepl.transport.certkey import CertKey
        from smsrepl.transport.tls import client_context

        if not task_id:
            raise ConfigError("START carries no task_id and the agent was given none")
        self.task_id = task_id
        task = self.cp.get_task(task_id)
        kind = task.get("type", "MIGRATE_BLOCK")
        if kind not in ("MIGRATE_BLOCK", "MIGRATE_FILE"):
            raise ConfigError(f"task type {kind!r} is neither MIGRATE_BLOCK nor MIGRATE_FILE")
        if kind == "MIGRATE_FILE" and not self.tree:
            raise ConfigError("a MIGRATE_FILE task needs the agent's --tree DIR")
        if kind == "MIGRATE_BLOCK" and not self.disks:
            raise ConfigError("a MIGRATE_BLOCK task needs the agent's --disk NAME=PATH")
        host = self.host or task.get("migration_ip")
        if not host:
            raise ConfigError("the task has no migration_ip")
        self._file_task = kind == "MIGRATE_FILE"
        self._plans = [] if self._file_task else plan_disks(task, self.disks)
        certkey = CertKey.from_json(json.dumps(self.cp.get_certkey(task_id)), source="control plane certkey")
        phrase = (self.cp.get_passphrase(task_id) or {}).get("passphrase") or None
        self._ctx = client_context(certkey, phrase.encode() if phrase else None)
        self._refresh_speed_limit()
        config = self.cp.get_configuration(task_id) or {}
        if self._file_task:
            from smsrepl.files.rules import PathRules

            self._rules = PathRules.from_configurations(config, source="the task's configuration (5.10.2)").anchored(
                self.tree)
        items = [c for c in config.get("configurations", []) if c.get("config_key") == "LINUX_CPU_LIMIT"]
        self._cpu_cap = CpuCap.from_configurations({"configurations": [
            {"config_key": c["config_key"], "config_value": c["config_value"]} for c in items]}) if items else None
        from smsrepl.control.progress import HostSampler

        self._sampler = HostSampler()  # host and agent CPU, memory and disk I/O in every report
        self.task = task
        self._address = (host, self.data_port)
        self._network_check()
        if not self._file_task and bool(task.get("syncing", False)):
            self._start_tracking()
        if self._file_task and bool(task.get("syncing", False)) and self._journal is None:
            from smsrepl.files.journal import open_journal

            # from before the first copy on: SYNC_LINUX_FILE rounds scan what it names
            self._journal = open_journal(self.tree, notice=log.warning)
        self.session = BlockSession(self._make_round, on_state=self._on_state, on_round=self._on_round)
        self._save_task()
        if self.copied:
            self.session._copied = True
        log.info("task %s (%s) to %s:%d", task_id, kind, host, self.data_port)

    def _start_tracking(self) -> None:
        """Kernel change tracking of every source disk, from before the first copy on (where it
        cannot run: sync rounds that read each disk whole, and one notice)."""
        from smsrepl.blocks.tracker import open_tracking
        from smsrepl.replication.lag import LagMeter

        for plan in self._plans:
            if plan.path not in self._trackers:
                self._trackers[plan.path] = open_tracking(plan.path, self.tracking, notice=log.warning)
        maps = [m for m in self._trackers.values() if m is not None]
        kind = "kernel" if maps and len(maps) == len(self._trackers) else ("scan" if not maps else "kernel+scan")
        self._lag = LagMeter(_AllDisks(maps) if maps else None, tracking=kind)

    def close(self) -> None:
        """Stop change tracking (the next agent starts its own, and reads each disk whole once)."""
        for m in self._trackers.values():
            if m is not None:
                m.close()
        self._trackers = {}
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def _refresh_speed_limit(self) -> None:
        from smsrepl.throttle import SpeedSchedule

        try:
            raw = self.cp.get_speed_limit(self.task_id)
        except ControlPlaneError as exc:
            log.warning("speed limit not refreshed: %s", exc)
            return
        if raw == self._schedule_raw:
            return
        try:
            schedule = SpeedSchedule.from_json(raw)
        except ReplicationError as exc:
            log.error("ignoring an invalid speed limit from the control plane: %s", exc)
            return
        self._schedule_raw, self._schedule = raw, schedule
        if self._round is not None:
            self._round.replace_schedule(schedule)

    def _network_check(self) -> None:
        """Measure the link to the receiver over the data port and report it (5.9.1)."""
        from smsrepl.transport.netcheck import UNUSABLE, run_netcheck

        if self.netcheck_seconds <= 0:
            return
        try:
            body = run_netcheck(self._address, self._ctx, seconds=self.netcheck_seconds).body()
        except ReplicationError as exc:
            log.warning("network check failed: %s", exc)
            body = {"destination_connectivity": False, "network_delay": 0.0, "network_jitter": 0.0,
                    "migration_speed": 0.0, "loss_percentage": 100.0, "cpu_usage": 0.0, "mem_usage": 0.0,
                    "evaluation_result": UNUSABLE}
        self.outbox.put("network_check", self.task_id, body)

    # --- rounds ---------------------------------------------------------------------
    def _make_round(self, states):
        from smsrepl.transport.sender import Sender

        if self._file_task:
            from smsrepl.transport.file_sender import FileSender

            cut = self._cutover.is_set()
            rnd = TreeRound(lambda: FileSender(self.tree, self.tree_target, self._address, self._ctx, rules=self._rules,
                                               speed_limit=self._schedule, cpu_cap=self._cpu_cap,
                                               on_report=self._on_report, host_sampler=self._sampler,
                                               journal=self._journal,
                                               whole="the cutover round walks the whole tree" if cut else None),
                            self.state_dir, states=states, first_copy=not self.copied and not cut, cutover=cut)
            self._round = rnd
            return rnd

        lag = self._lag

        def make_sender(disk: DiskPlan, on_report):
            return Sender(disk.path, disk.target, self._address, self._ctx, self.state_dir,
                          speed_limit=self._schedule, cpu_cap=self._cpu_cap, on_report=on_report,
                          host_sampler=self._sampler, dirty_map=self._trackers.get(disk.path),
                          trace=lag.trace if lag is not None else None)

        cut = self._cutover.is_set()
        self._cutover_running = cut
        quiesce = None
        if cut:
            from smsrepl.blocks.quiesce import FREEZE_TIMEOUT, Quiesce

            quiesce = Quiesce([p.path for p in self._plans], freeze=self.freeze, state_dir=self.state_dir,
                              timeout=self.freeze_timeout or FREEZE_TIMEOUT)
        if lag is not None:
            lag.round_started()
        rnd = ServerRound(self._plans, make_sender, self.state_dir, states=states,
                          first_copy=not self.copied and not cut, cutover=cut, on_report=self._on_report,
                          quiesce=quiesce)
        self._round = rnd
        return rnd

    def _maybe_round(self) -> None:
        """Continuous sync: a round every sync_interval; the cutover round once asked for."""
        s = self.session
        if s is None or s.running or self.finished:
            return
        if s.states.state in _ERRORS:
            err = s.last_error
            if (err is not None and getattr(err, "resumable", False)
                    and time.monotonic() - self._last_round_end >= self.retry_delay):
                log.info("resuming after a resumable error: %s", err)
                s.command("START")  # resumes from the receiver's checkpoint
            return
        if s.states.state is not SessionState.SYNCED:
            return
        if self._cutover.is_set():
            self._sync_queued = False  # the cutover round is that round
            s.command("SYNC")  # _make_round sees the cutover flag
            return
        if self._sync_queued:
            self._sync_queued = False
            result = s.command("SYNC")
            if not result.ok:
                log.error("the SYNC queued during the last round could not start: %s", result.result_detail)
            return
        if bool(self.task.get("syncing", False)) and time.monotonic() - self._last_round_end >= self.sync_interval:
            s.command("SYNC")

    def _on_round(self, result, error) -> None:
        self._last_round_end = time.monotonic()
        if error is not None:
            log.error("round failed: %s", error)
            self._wake.set()
            return
        self._rounds.append(result)
        if self._lag is not None and not self._file_task:
            self._lag.round_done(result)
        if result.kind == "full":
            with open(os.path.join(self.state_dir, "copied"), "w") as fh:
                fh.write(self.task_id or "")
        done = result.kind == "cutover" or (result.kind == "full" and not bool(self.task.get("syncing", False)))
        if done:
            if bool(self.task.get("is_need_consistency_check", False)) and not self.session.skip_consistency_check:
                self._consistency_check()
            self._save_task(finished=True)
            self.finished = True
        self._wake.set()

    def _consistency_check(self) -> None:
        from smsrepl.transport.sender import Sender

        if self._file_task:
            from smsrepl.control.consistency import for_upload
            from smsrepl.files.compare import compare_with_listing
            from smsrepl.transport.file_sender import FileSender

            sender = FileSender(self.tree, self.tree_target, self._address, self._ctx, rules=self._rules)
            dirs = list(self._rules.consistency_dirs) if self._rules else []
            result, _ = compare_with_listing(self.tree, sender.describe_target, dirs, rules=self._rules,
                                             list_paths=False)
            for note in result.get("notes", []):
                log.warning("consistency check: %s", note)
            self.consistency = for_upload(result["consistency_result"])
            self.outbox.put("consistency", self.task_id, self.consistency)
            return

        from smsrepl.control.consistency import entry, for_upload

        items = []
        for disk in self._plans:
            sender = Sender(disk.path, disk.target, self._address, self._ctx, self.state_dir)
            differ, total = sender.check()
            items.append(entry(disk.name, total, different=differ))
        self.consistency = for_upload(items)
        self.outbox.put("consistency", self.task_id, self.consistency)

    # --- reports ----------------------------------------------------------------------
    def _on_state(self, pair) -> None:
        self.outbox.put("state", self.source_id, pair.to_json())

    def _on_report(self, rep: dict) -> None:
        self.outbox.put("progress", self.task_id, rep)
