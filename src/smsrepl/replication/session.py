"""A block replication task driven by the control plane's session commands (5.5.1 / 5.5.2).

    session = BlockSession(lambda states: Sender(..., states=states), on_state=report_pair)
    result = session.command("START")      # full copy (or resume) runs on a thread
    session.command("STOP")                # pause: waits until the round let go
    session.command("START")               # resume from the receiver's checkpoint
    session.command("SYNC")                # one sync round, once the copy is done
    session.command("DELETE")              # stop and drop the local state
    session.command("SKIP")                # the consistency check will be skipped

Every command answers a :class:`~smsrepl.control.state.CommandResult` (``success``
or ``fail`` with a detail), as 5.5.2 expects. One state machine spans the
whole task, so the (copystate, migrationcycle) pairs reported through
``on_state`` follow SMS.7728 across rounds, pauses, errors and deletion.
"""
from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from typing import Any

from smsrepl.errors import ReplicationError
from smsrepl.control.state import (Command, CommandResult, Event, ServerCommand, SessionState,
                                   SessionStateMachine, StatePair)

#: how long STOP and DELETE wait for a running round to let go
STOP_TIMEOUT = 60.0

_STOPPED = {SessionState.REPL_STOPPED, SessionState.SYNC_STOPPED, SessionState.CUT_STOPPED}
_ERRORS = {SessionState.REPL_ERROR, SessionState.SYNC_ERROR, SessionState.CUT_ERROR}


class BlockSession:
    def __init__(self, make_sender: Callable[[SessionStateMachine], Any], *,
                 on_state: Callable[[StatePair], Any] | None = None,
                 on_round: Callable[[Any, BaseException | None], Any] | None = None) -> None:
        """``make_sender(states)`` builds a Sender for one round that reports into ``states``;
        ``on_round(result, error)`` is called when a round ends (result None on error)."""
        self._make_sender = make_sender
        self.states = SessionStateMachine(on_state)
        self.on_round = on_round
        self.skip_consistency_check = False
        self._lock = threading.Lock()
        self._sender = None
        self._thread: threading.Thread | None = None
        self._copied = False  # a full copy has completed: SYNC may run
        self.last_error: BaseException | None = None
        self.last_result = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def command(self, cmd: ServerCommand | Command | str) -> CommandResult:
        name = cmd.command_name if isinstance(cmd, ServerCommand) else Command.parse(cmd)
        try:
            handler = {
                Command.START: self._start,
                Command.STOP: self._stop,
                Command.SYNC: self._sync,
                Command.DELETE: self._delete,
                Command.SKIP: self._skip,
            }.get(name)
            if handler is None:
                return CommandResult.fail(name, f"{name.value} is not handled by the data plane")
            return handler(name)
        except ReplicationError as exc:
            return CommandResult.fail(name, exc)

    # --- commands -----------------------------------------------------------
    def _start(self, name: Command) -> CommandResult:
        with self._lock:
            if self.running:
                return CommandResult.fail(name, "a round is already running")
            st = self.states.state
            if st is SessionState.DELETED:
                return CommandResult.fail(name, "the task was deleted")
            if st in _STOPPED or st in _ERRORS:
                self.states.fire(Event.RESUME)
            self._launch()
        return CommandResult.success(name, state=self.states.state.value)

    def _sync(self, name: Command) -> CommandResult:
        with self._lock:
            if self.running:
                return CommandResult.fail(name, "a round is already running")
            if not self._copied or self.states.state is not SessionState.SYNCED:
                return CommandResult.fail(name, f"no completed copy to sync (state {self.states.state.value})")
            self._launch()
        return CommandResult.success(name, state=self.states.state.value)

    def _stop(self, name: Command) -> CommandResult:
        failed = self._halt(name, Event.STOP, "nothing to stop")
        if failed:
            return failed
        if self.states.can(Event.STOPPED):
            self.states.fire(Event.STOPPED)
        return CommandResult.success(name, state=self.states.state.value)

    def _delete(self, name: Command) -> CommandResult:
        failed = self._halt(name, Event.DELETE, "cannot delete")
        if failed:
            return failed
        state_dir = getattr(self._sender or self._make_sender(self.states), "dir", None)
        if state_dir and os.path.isdir(state_dir):
            shutil.rmtree(state_dir)
        if self.states.can(Event.DELETED):
            self.states.fire(Event.DELETED)
        return CommandResult.success(name, state=self.states.state.value, dropped=state_dir)

    def _halt(self, name: Command, event: Event, refusal: str) -> CommandResult | None:
        """Fire ``event`` and break the running round; a fail result if either cannot be done."""
        with self._lock:
            if not self.states.can(event):
                return CommandResult.fail(name, f"{refusal} in state {self.states.state.value}")
            self.states.fire(event)
            thread, sender = self._thread, self._sender
            if sender is not None:
                sender.stop()
        if thread is not None:
            thread.join(STOP_TIMEOUT)
            if thread.is_alive():
                return CommandResult.fail(name, "the running round did not stop in time")
        return None

    def _skip(self, name: Command) -> CommandResult:
        self.skip_consistency_check = True
        if self.states.can(Event.SKIP):
            self.states.fire(Event.SKIP)
        return CommandResult.success(name, skip_consistency_check=True)

    # --- rounds ----------------------------------------------------------------
    def _launch(self) -> None:
        sender = self._make_sender(self.states)
        self._sender = sender
        self._thread = threading.Thread(target=self._run, args=(sender,), name="block-round", daemon=True)
        self._thread.start()

    def _run(self, sender) -> None:
        result, error = None, None
        try:
            result = sender.run()
            self._copied = True
            self.last_result = result
        except ReplicationError as exc:
            error = exc
            if not sender.stop_requested:
                self.last_error = exc
                if self.states.state is SessionState.IDLE:  # failed before the round began (no connection)
                    self.states.fire(Event.START)
                if self.states.can(Event.ERROR):
                    self.states.fire(Event.ERROR)
        finally:
            with self._lock:
                if self._sender is sender:
                    self._sender = None
        if self.on_round is not None:
            self.on_round(result, error)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the running round; True when none is running any more."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.running
