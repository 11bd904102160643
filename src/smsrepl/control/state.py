"""Replication states (5.3.6 / SMS.7728) and session commands (5.5.1 / 5.5.2).

Allowed (``migrationcycle`` -> ``copystate``) pairs, exactly as the
reference's error SMS.7728 lists them ("Values of copystate and
migrationcycle do not match")::

    checking    -> available / waiting / unconnected
    setting     -> waiting / unconnected
    replicating -> initialize / replicate / deleting / stopping / error / stopped / unconnected
    syncing     -> syncing / cloning / deleting / stopping / error / stopped / unconnected
    cutovering  -> cutovering / deleting / stopping / error / stopped / unconnected
    cutovered   -> finished / deleting / stopping / error / stopped / unconnected

Spelling: SMS.7728 and the source-server ``state`` field use lower case
(``initialize``); the 5.3.6 ``changestate`` request body enumerates upper case
(``INIT``, ``REPLICATE``...) for most states. :func:`check_pair` accepts
either spelling, case-insensitively; :class:`StatePair` renders the 5.3.6
body spelling. Notes on the reference: ``available`` (under ``checking``)
is written so in SMS.7728, although the state enum has ``unavailable``;
``unconnected`` appears only in SMS.7728; ``skipping`` is in the state enum
but SMS.7728 allows it under no cycle, so SKIP never changes the pair; the
5.3.6 request example (``WAITING`` with ``cutovered``) is a pair SMS.7728
forbids; SMS.7728 governs here.
"""
from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from smsrepl.errors import ConfigError, ReplicationError, StatePairError, TransitionError

__all__ = [
    "CopyState",
    "MigrationCycle",
    "ALLOWED_PAIRS",
    "StatePair",
    "StatePairError",
    "TransitionError",
    "check_pair",
    "is_allowed",
    "SessionState",
    "Event",
    "TRANSITIONS",
    "SessionStateMachine",
    "Command",
    "CommandResultValue",
    "CommandResult",
    "ServerCommand",
]


class CopyState(enum.Enum):
    """``copystate`` values; ``.value`` is the 5.3.6 request-body spelling."""

    UNAVAILABLE = "UNAVAILABLE"
    AVAILABLE = "available"  # only in SMS.7728 (checking)
    WAITING = "WAITING"
    INITIALIZE = "INIT"
    REPLICATE = "REPLICATE"
    SYNCING = "SYNCING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    SKIPPING = "SKIPPING"
    DELETING = "DELETING"
    ERROR = "ERROR"
    CLONING = "CLONING"
    CUTOVERING = "CUTOVERING"
    FINISHED = "FINISHED"
    CLEARING = "clearing"
    CLEARED = "cleared"
    CLEARFAILED = "clearfailed"
    PREMIGREADY = "premigready"
    PREMIGING = "premiging"
    PREMIGED = "premiged"
    PREMIGFAILED = "premigfailed"
    UNCONNECTED = "unconnected"  # only in SMS.7728

    @property
    def lower(self) -> str:
        """The SMS.7728 / source-server ``state`` spelling."""
        return self.name.lower()

    @classmethod
    def parse(cls, value: "str | CopyState") -> "CopyState":
        if isinstance(value, CopyState):
            return value
        if isinstance(value, str):
            v = value.strip().lower()
            for m in cls:
                if v in (m.name.lower(), m.value.lower()):
                    return m
        raise ConfigError(f"copystate: {value!r} is not a replication state of 5.3.6 / SMS.7728")


class MigrationCycle(enum.Enum):
    CHECKING = "checking"
    SETTING = "setting"
    REPLICATING = "replicating"
    SYNCING = "syncing"
    CUTOVERING = "cutovering"
    CUTOVERED = "cutovered"

    @classmethod
    def parse(cls, value: "str | MigrationCycle") -> "MigrationCycle":
        if isinstance(value, MigrationCycle):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        raise ConfigError(f"migrationcycle: {value!r} is not a migration cycle of 5.3.6")


_C, _M = CopyState, MigrationCycle
_ANYTIME = (_C.DELETING, _C.STOPPING, _C.ERROR, _C.STOPPED, _C.UNCONNECTED)

#: SMS.7728, verbatim: migrationcycle -> the copystates allowed with it.
ALLOWED_PAIRS: Mapping[MigrationCycle, frozenset[CopyState]] = {
    _M.CHECKING: frozenset({_C.AVAILABLE, _C.WAITING, _C.UNCONNECTED}),
    _M.SETTING: frozenset({_C.WAITING, _C.UNCONNECTED}),
    _M.REPLICATING: frozenset({_C.INITIALIZE, _C.REPLICATE, *_ANYTIME}),
    _M.SYNCING: frozenset({_C.SYNCING, _C.CLONING, *_ANYTIME}),
    _M.CUTOVERING: frozenset({_C.CUTOVERING, *_ANYTIME}),
    _M.CUTOVERED: frozenset({_C.FINISHED, *_ANYTIME}),
}


def is_allowed(copystate: "str | CopyState", migrationcycle: "str | MigrationCycle") -> bool:
    return CopyState.parse(copystate) in ALLOWED_PAIRS[MigrationCycle.parse(migrationcycle)]


def check_pair(copystate: "str | CopyState", migrationcycle: "str | MigrationCycle") -> "StatePair":
    """Return the pair if SMS.7728 allows it, else raise :class:`StatePairError`."""
    c, m = CopyState.parse(copystate), MigrationCycle.parse(migrationcycle)
    allowed = ALLOWED_PAIRS[m]
    if c not in allowed:
        names = "/".join(sorted(a.lower for a in allowed))
        raise StatePairError(
            f"copystate {c.lower!r} is not allowed with migrationcycle {m.value!r} "
            f"(with {m.value} copystate can only be {names})"
        )
    return StatePair(c, m)


@dataclass(frozen=True, slots=True)
class StatePair:
    copystate: CopyState
    migrationcycle: MigrationCycle

    def to_json(self) -> dict:
        """The 5.3.6 ``PUT /v3/sources/{id}/changestate`` body."""
        return {"copystate": self.copystate.value, "migrationcycle": self.migrationcycle.value}

    def __str__(self) -> str:
        return f"{self.copystate.value}/{self.migrationcycle.value}"


# ---------------------------------------------------------------------------
# Session state machine
# ---------------------------------------------------------------------------

class SessionState(enum.Enum):
    """Where a session is; each maps to one pair (or none)."""

    IDLE = "idle"  # nothing started yet: reports nothing
    INIT = "init"
    REPLICATING = "replicating"
    REPL_STOPPING = "repl_stopping"
    REPL_STOPPED = "repl_stopped"
    REPL_ERROR = "repl_error"
    REPL_DELETING = "repl_deleting"
    SYNCED = "synced"  # between sync rounds
    SYNC_ROUND = "sync_round"
    SYNC_STOPPING = "sync_stopping"
    SYNC_STOPPED = "sync_stopped"
    SYNC_ERROR = "sync_error"
    SYNC_DELETING = "sync_deleting"
    CUTOVERING = "cutovering"
    CUT_STOPPING = "cut_stopping"
    CUT_STOPPED = "cut_stopped"
    CUT_ERROR = "cut_error"
    CUT_DELETING = "cut_deleting"
    FINISHED = "finished"
    DONE_DELETING = "done_deleting"
    DELETED = "deleted"  # state dropped: reports nothing


S = SessionState

STATE_PAIRS: Mapping[SessionState, StatePair | None] = {
    S.IDLE: None,
    S.INIT: StatePair(_C.INITIALIZE, _M.REPLICATING),
    S.REPLICATING: StatePair(_C.REPLICATE, _M.REPLICATING),
    S.REPL_STOPPING: StatePair(_C.STOPPING, _M.REPLICATING),
    S.REPL_STOPPED: StatePair(_C.STOPPED, _M.REPLICATING),
    S.REPL_ERROR: StatePair(_C.ERROR, _M.REPLICATING),
    S.REPL_DELETING: StatePair(_C.DELETING, _M.REPLICATING),
    S.SYNCED: StatePair(_C.SYNCING, _M.SYNCING),
    S.SYNC_ROUND: StatePair(_C.SYNCING, _M.SYNCING),
    S.SYNC_STOPPING: StatePair(_C.STOPPING, _M.SYNCING),
    S.SYNC_STOPPED: StatePair(_C.STOPPED, _M.SYNCING),
    S.SYNC_ERROR: StatePair(_C.ERROR, _M.SYNCING),
    S.SYNC_DELETING: StatePair(_C.DELETING, _M.SYNCING),
    S.CUTOVERING: StatePair(_C.CUTOVERING, _M.CUTOVERING),
    S.CUT_STOPPING: StatePair(_C.STOPPING, _M.CUTOVERING),
    S.CUT_STOPPED: StatePair(_C.STOPPED, _M.CUTOVERING),
    S.CUT_ERROR: StatePair(_C.ERROR, _M.CUTOVERING),
    S.CUT_DELETING: StatePair(_C.DELETING, _M.CUTOVERING),
    S.FINISHED: StatePair(_C.FINISHED, _M.CUTOVERED),
    S.DONE_DELETING: StatePair(_C.DELETING, _M.CUTOVERED),
    S.DELETED: None,
}


class Event(enum.Enum):
    START = "start"  # START command: begin the first full copy
    COPY_RUNNING = "copy_running"  # data is flowing
    COPY_DONE = "copy_done"  # the full copy completed
    SYNC_START = "sync_start"  # SYNC command / next continuous round
    SYNC_DONE = "sync_done"
    STOP = "stop"  # STOP command: pause requested
    STOPPED = "stopped"  # the pause took effect (state saved)
    RESUME = "resume"  # START after a pause or an error
    ERROR = "error"
    DELETE = "delete"  # DELETE command: cancel and drop state
    DELETED = "deleted"  # state dropped
    CUTOVER = "cutover"  # last round before switching to the target
    CUTOVER_DONE = "cutover_done"
    SKIP = "skip"  # SKIP command: skip the consistency check (no state change)


E = Event


def _build_transitions() -> dict[tuple[SessionState, Event], SessionState]:
    t: dict[tuple[SessionState, Event], SessionState] = {
        (S.IDLE, E.START): S.INIT,
        (S.IDLE, E.SYNC_START): S.SYNC_ROUND,  # a later run with saved state: a sync round
        (S.IDLE, E.DELETE): S.DELETED,
        (S.INIT, E.COPY_RUNNING): S.REPLICATING,
        (S.INIT, E.COPY_DONE): S.SYNCED,
        (S.REPLICATING, E.COPY_RUNNING): S.REPLICATING,
        (S.REPLICATING, E.COPY_DONE): S.SYNCED,
        (S.SYNCED, E.SYNC_START): S.SYNC_ROUND,
        (S.SYNC_ROUND, E.SYNC_DONE): S.SYNCED,
        (S.SYNC_ROUND, E.COPY_RUNNING): S.SYNC_ROUND,
        (S.SYNCED, E.CUTOVER): S.CUTOVERING,
        (S.SYNC_ROUND, E.CUTOVER): S.CUTOVERING,  # SIGTERM mid-round: the round becomes the cutover
        (S.CUTOVERING, E.COPY_RUNNING): S.CUTOVERING,
        (S.CUTOVERING, E.CUTOVER_DONE): S.FINISHED,
        (S.FINISHED, E.DELETE): S.DONE_DELETING,
        (S.DONE_DELETING, E.DELETED): S.DELETED,
    }
    phases = {
        # phase: (active states, stopping, stopped, error, deleting, resume-to)
        "repl": ((S.INIT, S.REPLICATING), S.REPL_STOPPING, S.REPL_STOPPED, S.REPL_ERROR, S.REPL_DELETING, S.REPLICATING),
        "sync": ((S.SYNCED, S.SYNC_ROUND), S.SYNC_STOPPING, S.SYNC_STOPPED, S.SYNC_ERROR, S.SYNC_DELETING, S.SYNCED),
        "cut": ((S.CUTOVERING,), S.CUT_STOPPING, S.CUT_STOPPED, S.CUT_ERROR, S.CUT_DELETING, S.CUTOVERING),
    }
    for active, stopping, stopped, error, deleting, resume in phases.values():
        for a in active:
            t[(a, E.STOP)] = stopping
            t[(a, E.ERROR)] = error
            t[(a, E.DELETE)] = deleting
            t[(a, E.SKIP)] = a
        t[(stopping, E.STOPPED)] = stopped
        t[(stopping, E.STOP)] = stopping
        t[(stopping, E.ERROR)] = error
        t[(stopping, E.DELETE)] = deleting
        t[(stopped, E.STOP)] = stopped
        t[(stopped, E.RESUME)] = resume
        t[(stopped, E.DELETE)] = deleting
        t[(stopped, E.ERROR)] = error
        t[(error, E.RESUME)] = resume
        t[(error, E.DELETE)] = deleting
        t[(error, E.ERROR)] = error
        t[(error, E.STOP)] = stopped  # nothing running: a stop is immediate
        t[(deleting, E.DELETED)] = S.DELETED
        t[(deleting, E.ERROR)] = error
        t[(deleting, E.DELETE)] = deleting
    t[(S.FINISHED, E.SKIP)] = S.FINISHED
    return t


#: (state, event) -> next state. Anything not listed is not allowed.
TRANSITIONS: Mapping[tuple[SessionState, Event], SessionState] = _build_transitions()

# Every state the table can reach reports an SMS.7728-allowed pair.
for _st, _pair in STATE_PAIRS.items():
    if _pair is not None:
        check_pair(_pair.copystate, _pair.migrationcycle)
del _st, _pair


class SessionStateMachine:
    """Drives a session's state by events; reports pairs through a callback.

    ``on_report(pair)`` is called with a :class:`StatePair` each time the
    reported pair changes (never for IDLE/DELETED, never with a pair
    SMS.7728 forbids). ``fire`` raises :class:`TransitionError` for an event
    the current state does not allow; ``can`` asks first. Thread-safe; the
    callback runs outside the lock.
    """

    def __init__(self, on_report: Callable[[StatePair], Any] | None = None, initial: SessionState = S.IDLE) -> None:
        self._on_report = on_report
        self._state = initial
        self._lock = threading.Lock()
        self._last: StatePair | None = STATE_PAIRS[initial]
        self.history: list[StatePair] = []

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def pair(self) -> StatePair | None:
        return STATE_PAIRS[self._state]

    def can(self, event: Event) -> bool:
        return (self._state, event) in TRANSITIONS

    def fire(self, event: Event) -> StatePair | None:
        """Apply ``event``; return the pair now reported (None if none)."""
        with self._lock:
            nxt = TRANSITIONS.get((self._state, event))
            if nxt is None:
                raise TransitionError(f"session event {event.value!r} is not allowed in state {self._state.value!r}")
            self._state = nxt
            pair = STATE_PAIRS[nxt]
            changed = None  # the pair to report, when it changed
            if pair is not None:
                check_pair(pair.copystate, pair.migrationcycle)
                if pair != self._last:
                    changed = pair
                    self.history.append(pair)
                self._last = pair
        if changed is not None and self._on_report is not None:
            self._on_report(changed)
        return pair


# ---------------------------------------------------------------------------
# Commands (5.5.1 / 5.5.2)
# ---------------------------------------------------------------------------

class Command(enum.Enum):
    """``command_name``: 5.5.1 lists START, STOP, DELETE, SYNC, SKIP; 5.5.2
    also lists UPLOAD_LOG and RSET_LOG_ACL (spelled so), which smsrepl
    answers with ``fail``."""

    START = "START"
    STOP = "STOP"
    DELETE = "DELETE"
    SYNC = "SYNC"
    SKIP = "SKIP"
    UPLOAD_LOG = "UPLOAD_LOG"
    RSET_LOG_ACL = "RSET_LOG_ACL"

    @classmethod
    def parse(cls, value: "str | Command") -> "Command":
        if isinstance(value, Command):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().upper())
            except ValueError:
                pass
        raise ConfigError(f"command_name: {value!r} is not a 5.5.1 command (START, STOP, DELETE, SYNC, SKIP)")


class CommandResultValue(enum.Enum):
    SUCCESS = "success"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class ServerCommand:
    """A 5.5.1 ``GET /v3/sources/{id}/command`` response body."""

    command_name: Command
    task_id: str | None = None
    bucket: str | None = None

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "ServerCommand":
        if not isinstance(obj, Mapping):
            raise ConfigError(f"command: expected an object, got {type(obj).__name__}")
        if "command_name" not in obj:
            raise ConfigError("command: command_name is missing")
        param = obj.get("command_param") or {}
        if not isinstance(param, Mapping):
            raise ConfigError(f"command_param: expected an object, got {type(param).__name__}")
        return cls(Command.parse(obj["command_name"]), param.get("task_id"), param.get("bucket"))


@dataclass(frozen=True, slots=True)
class CommandResult:
    """A 5.5.2 ``POST /v3/sources/{id}/command_result`` body.

    All three fields are required there; ``result_detail`` is a JSON object
    that the control plane only stores.
    """

    command_name: Command
    result: CommandResultValue
    result_detail: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "command_name", Command.parse(self.command_name))
        if not isinstance(self.result, CommandResultValue):
            try:
                object.__setattr__(self, "result", CommandResultValue(self.result))
            except ValueError:
                raise ConfigError(f"result: {self.result!r} must be 'success' or 'fail'") from None
        if not isinstance(self.result_detail, Mapping):
            raise ConfigError(f"result_detail: expected an object, got {type(self.result_detail).__name__}")

    @property
    def ok(self) -> bool:
        return self.result is CommandResultValue.SUCCESS

    @classmethod
    def success(cls, command: "Command | str", **detail: Any) -> "CommandResult":
        return cls(Command.parse(command), CommandResultValue.SUCCESS, dict(detail))

    @classmethod
    def fail(cls, command: "Command | str", error: "BaseException | str", **detail: Any) -> "CommandResult":
        d: dict[str, Any] = dict(detail)
        if isinstance(error, ReplicationError):
            if error.code:
                d["error_code"] = error.code
            d["error_msg"] = error.message
        else:
            d["error_msg"] = str(error)
        return cls(Command.parse(command), CommandResultValue.FAIL, d)

    def to_json(self) -> dict:
        return {
            "command_name": self.command_name.value,
            "result": self.result.value,
            "result_detail": dict(self.result_detail),
        }
