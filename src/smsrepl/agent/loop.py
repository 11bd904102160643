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
:class:`~smsrepl.agent.outbox.Outbox` that keeps them while the control plane is
unreachable (states in order, only the latest progress) and delivers them once it is back.
``request_cutover()`` (SIGTERM in ``smsrepl agent``) runs the last round once
the source is quiesced: the target then equals the source as of that call.

This module is the loop: commands in, the task read from the control plane, when
the next round runs. The commands' effect on the task's state and the round's
thread are replication.session.BlockSession's; what a round is comes from
agent.block_task (MIGRATE_BLOCK) or agent.file_task (MIGRATE_FILE).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from smsrepl.durable import private_makedirs, write_json_atomic
from smsrepl.errors import ConfigError, ControlPlaneError, ReplicationError
from smsrepl.replication.session import BlockSession
from smsrepl.control.state import Command, CommandResult, ServerCommand, SessionState, SessionStateMachine, StatePair
from smsrepl.agent.block_task import BlockTask, plan_disks
from smsrepl.agent.client import ControlPlane
from smsrepl.agent.file_task import FileTask
from smsrepl.agent.link import TaskLink
from smsrepl.agent.outbox import Outbox
from smsrepl.agent.server import ServerRound, TreeRound

if TYPE_CHECKING:
    from smsrepl.throttle import SpeedSchedule

log = logging.getLogger("smsrepl.agent")

DATA_PORT = 8900
_ERRORS = {SessionState.REPL_ERROR, SessionState.SYNC_ERROR, SessionState.CUT_ERROR}


class Agent:
    def __init__(self, cp: ControlPlane, source_id: str, disks: dict[str, str], state_dir: str, *,
                 task_id: str | None = None, data_port: int = DATA_PORT, poll_interval: float = 2.0,
                 sync_interval: float = 30.0, speed_poll: float = 5.0, host: str | None = None,
                 outbox_retry: float = 1.0, retry_delay: float = 2.0, netcheck_seconds: float = 2.0,
                 tree: str | None = None, tree_target: str = "root", tracking: str = "auto",
                 freeze: bool = False, freeze_timeout: float | None = None, streams: int | str = "auto") -> None:
        if not disks and not tree:
            raise ConfigError("the agent needs --disk NAME=PATH (block tasks) or --tree DIR (file tasks)")
        self.cp = cp
        self.source_id = source_id
        self.disks = dict(disks or {})
        #: the source tree of file-level tasks (MIGRATE_FILE) and the receiver's directory target for it
        self.tree = tree
        self.tree_target = tree_target
        self.state_dir = os.path.abspath(state_dir)
        private_makedirs(self.state_dir)
        self.task_id = task_id
        self.data_port = data_port
        self.poll_interval = poll_interval
        self.sync_interval = sync_interval
        self.speed_poll = speed_poll
        self.retry_delay = retry_delay
        self.netcheck_seconds = netcheck_seconds
        self.streams = streams
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
        self._schedule: SpeedSchedule | None = None
        self._schedule_raw: Any = None
        #: the block or file side of the task, from its START on
        self._driver: BlockTask | FileTask | None = None
        self._round: ServerRound | TreeRound | None = None
        #: a SYNC came while a round ran: one more round once it ends (several SYNCs make one)
        self._sync_queued = False
        self._last_round_end = 0.0
        self._rounds: list = []
        #: how block tasks track changed blocks between rounds (blocks.tracker: auto, kernel or scan)
        self.tracking = tracking
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
            result = self._prepare(rec["task_id"]).command("START")
            if not result.ok:
                log.error("could not resume task %s: %s", rec["task_id"], result.result_detail)
        except ReplicationError as exc:  # e.g. the control plane is down: START from it will come
            log.error("could not resume task %s: %s", rec["task_id"], exc)
            self.session = None

    def _save_task(self, **extra) -> None:
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
            session = self.session
            if name.value == "START":
                if session is None:
                    session = self._prepare(cmd.task_id or self.task_id)
                return session.command("START")
            if session is None:
                return CommandResult.fail(name, "no task has been started")
            if name.value == "SYNC" and session.running:
                return self._queue_sync(session, name)
            if name.value in ("STOP", "DELETE"):
                self._sync_queued = False  # a pause or the end: no round after it
            result = session.command(name)
            if name.value == "DELETE" and result.ok:
                self.deleted = True
            return result
        except ReplicationError as exc:
            return CommandResult.fail(name, exc)

    def _queue_sync(self, session: BlockSession, name: Command) -> CommandResult:
        """SYNC while a round runs: one more round after it, as soon as the session is synced
        again (_maybe_round); SYNCs until then add nothing to it."""
        coalesced = self._sync_queued
        self._sync_queued = True
        log.info("SYNC during a running round: %s", "already queued" if coalesced else "one more round after it")
        return CommandResult.success(name, state=session.states.state.value, queued=True,
                                     coalesced=coalesced)

    # --- set-up from the task -------------------------------------------------------
    def _prepare(self, task_id: str | None) -> BlockSession:
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
        tree = self.tree if kind == "MIGRATE_FILE" else None
        if kind == "MIGRATE_FILE" and not tree:
            raise ConfigError("a MIGRATE_FILE task needs the agent's --tree DIR")
        if kind == "MIGRATE_BLOCK" and not self.disks:
            raise ConfigError("a MIGRATE_BLOCK task needs the agent's --disk NAME=PATH")
        host = self.host or task.get("migration_ip")
        if not host:
            raise ConfigError("the task has no migration_ip")
        plans = [] if tree else plan_disks(task, self.disks)
        certkey = CertKey.from_json(json.dumps(self.cp.get_certkey(task_id)), source="control plane certkey")
        phrase = (self.cp.get_passphrase(task_id) or {}).get("passphrase") or None
        context = client_context(certkey, phrase.encode() if phrase else None)
        self._refresh_speed_limit()
        config = self.cp.get_configuration(task_id) or {}
        rules = None
        if tree:
            from smsrepl.files.rules import PathRules

            rules = PathRules.from_configurations(config, source="the task's configuration (5.10.2)").anchored(tree)
        items = [c for c in config.get("configurations", []) if c.get("config_key") == "LINUX_CPU_LIMIT"]
        cpu_cap = CpuCap.from_configurations({"configurations": [
            {"config_key": c["config_key"], "config_value": c["config_value"]} for c in items]}) if items else None
        from smsrepl.control.hostsample import HostSampler

        link = TaskLink(task_id, (host, self.data_port), context, self.state_dir, cpu_cap,
                        HostSampler(),  # host and agent CPU, memory and disk I/O in every report
                        lambda rep: self.outbox.put("progress", task_id, rep), lambda: self._schedule,
                        streams=self.streams)
        self.task = task
        self._network_check(link)
        driver: BlockTask | FileTask
        if tree and rules is not None:
            driver = FileTask(tree, self.tree_target, rules, link)
        else:
            driver = BlockTask(plans, link, tracking=self.tracking, freeze=self.freeze,
                               freeze_timeout=self.freeze_timeout)
        if self._driver is not None:
            driver.adopt(self._driver)
        self._driver = driver
        if bool(task.get("syncing", False)):
            driver.track_changes()  # from before the first copy on
        session = BlockSession(lambda states: self._make_round(driver, states), on_state=self._on_state)
        session.on_round = lambda result, error: self._on_round(session, driver, result, error)
        self.session = session
        self._save_task()
        if self.copied:
            session._copied = True
        log.info("task %s (%s) to %s:%d", task_id, kind, host, self.data_port)
        return session

    def close(self) -> None:
        """Stop change tracking (the next agent starts its own, and reads each disk whole once)."""
        if self._driver is not None:
            self._driver.close()

    def _refresh_speed_limit(self) -> None:
        from smsrepl.throttle import SpeedSchedule

        task_id = self.task_id
        if task_id is None:  # no task yet: nothing to limit
            return
        try:
            raw = self.cp.get_speed_limit(task_id)
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

    def _network_check(self, link: TaskLink) -> None:
        """Measure the link to the receiver over the data port and report it (5.9.1)."""
        from smsrepl.transport.netcheck import UNUSABLE, run_netcheck

        if self.netcheck_seconds <= 0:
            return
        try:
            body = run_netcheck(link.address, link.context, seconds=self.netcheck_seconds).body()
        except ReplicationError as exc:
            log.warning("network check failed: %s", exc)
            body = {"destination_connectivity": False, "network_delay": 0.0, "network_jitter": 0.0,
                    "migration_speed": 0.0, "loss_percentage": 100.0, "cpu_usage": 0.0, "mem_usage": 0.0,
                    "evaluation_result": UNUSABLE}
        self.outbox.put("network_check", link.task_id, body)

    # --- rounds ---------------------------------------------------------------------
    @property
    def _syncing(self) -> bool:
        """The task wants sync rounds after its copy (5.4.5 ``syncing``)."""
        return self.task is not None and bool(self.task.get("syncing", False))

    def _make_round(self, driver: BlockTask | FileTask, states: SessionStateMachine) -> ServerRound | TreeRound:
        cut = self._cutover.is_set()
        rnd = driver.make_round(states, first_copy=not self.copied and not cut, cutover=cut)
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
        if self._syncing and time.monotonic() - self._last_round_end >= self.sync_interval:
            s.command("SYNC")

    def _on_round(self, session: BlockSession, driver: BlockTask | FileTask, result, error) -> None:
        self._last_round_end = time.monotonic()
        if error is not None:
            log.error("round failed: %s", error)
            self._wake.set()
            return
        self._rounds.append(result)
        driver.round_done(result)
        if result.kind == "full":
            with open(os.path.join(self.state_dir, "copied"), "w") as fh:
                fh.write(self.task_id or "")
        done = result.kind == "cutover" or (result.kind == "full" and not self._syncing)
        if done:
            if (self.task is not None and bool(self.task.get("is_need_consistency_check", False))
                    and not session.skip_consistency_check):
                self._consistency_check(driver)
            self._save_task(finished=True)
            self.finished = True
        self._wake.set()

    def _consistency_check(self, driver: BlockTask | FileTask) -> None:
        self.consistency = driver.consistency()
        self.outbox.put("consistency", driver.link.task_id, self.consistency)

    # --- reports ----------------------------------------------------------------------
    def _on_state(self, pair: StatePair) -> None:
        self.outbox.put("state", self.source_id, pair.to_json())
