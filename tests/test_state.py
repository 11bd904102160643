"""Replication states (5.3.6 / SMS.7728), the session state machine, commands (5.5)."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smsrepl.errors import ConfigError, ReplicationError, TransportError
from smsrepl.control.state import (ALLOWED_PAIRS, STATE_PAIRS, TRANSITIONS, Command, CommandResult,
                                   CommandResultValue, CopyState, Event, MigrationCycle,
                                   ServerCommand, SessionState, SessionStateMachine, StatePair,
                                   check_pair, is_allowed)
from smsrepl.errors import StatePairError, TransitionError

# SMS.7728's text, transcribed independently of the module's table.
SMS_7728 = {
    "checking": "available/waiting/unconnected",
    "setting": "waiting/unconnected",
    "replicating": "initialize/replicate/deleting/stopping/error/stopped/unconnected",
    "syncing": "syncing/cloning/deleting/stopping/error/stopped/unconnected",
    "cutovering": "cutovering/deleting/stopping/error/stopped/unconnected",
    "cutovered": "finished/deleting/stopping/error/stopped/unconnected",
}
ALL_STATES = [c.lower for c in CopyState]


def test_table_is_sms7728():
    assert {m.value for m in MigrationCycle} == set(SMS_7728)
    for cycle, allowed in SMS_7728.items():
        assert {c.lower for c in ALLOWED_PAIRS[MigrationCycle(cycle)]} == set(allowed.split("/"))


@pytest.mark.parametrize("cycle", sorted(SMS_7728))
def test_check_pair_every_combination(cycle):
    allowed = set(SMS_7728[cycle].split("/"))
    for state in ALL_STATES:
        if state in allowed:
            assert check_pair(state, cycle) == StatePair(CopyState.parse(state), MigrationCycle(cycle))
            assert is_allowed(state.upper(), cycle.upper())
        else:
            assert not is_allowed(state, cycle)
            with pytest.raises(StatePairError) as ei:
                check_pair(state, cycle)
            err = ei.value
            assert err.code == "SMS.7728" and err.exit_code == 2 and isinstance(err, ConfigError)
            assert str(err).startswith("SMS.7728: ")
            assert f"copystate {state!r} is not allowed with migrationcycle {cycle!r}" in str(err)


def test_spellings_of_5_3_6_and_sms_7728():
    assert CopyState.parse("INIT") is CopyState.parse("initialize") is CopyState.INITIALIZE
    assert CopyState.parse("Replicate") is CopyState.REPLICATE
    assert check_pair("INIT", "replicating").to_json() == {"copystate": "INIT", "migrationcycle": "replicating"}
    assert check_pair("finished", "cutovered").to_json() == {"copystate": "FINISHED", "migrationcycle": "cutovered"}
    # the 5.3.6 request example is itself a pair SMS.7728 forbids
    with pytest.raises(StatePairError, match="with cutovered copystate can only be"):
        check_pair("WAITING", "cutovered")
    # skipping is a state, but SMS.7728 allows it under no cycle
    assert not any(is_allowed("skipping", m) for m in MigrationCycle)


def test_unknown_values_name_the_field():
    with pytest.raises(ConfigError, match="copystate: 'RUNNING' is not a replication state"):
        check_pair("RUNNING", "syncing")
    with pytest.raises(ConfigError, match="migrationcycle: 'copying' is not a migration cycle"):
        check_pair("syncing", "copying")
    with pytest.raises(ConfigError, match="copystate: None"):
        check_pair(None, "syncing")  # type: ignore[arg-type]


def test_every_state_of_the_machine_maps_to_an_allowed_pair():
    reachable = {SessionState.IDLE} | {dst for dst in TRANSITIONS.values()} | {src for src, _ in TRANSITIONS}
    assert reachable == set(SessionState)
    for s in SessionState:
        pair = STATE_PAIRS[s]
        if pair is None:
            assert s in (SessionState.IDLE, SessionState.DELETED)
        else:
            check_pair(pair.copystate, pair.migrationcycle)
    # DELETED is terminal
    assert not any(src is SessionState.DELETED for src, _ in TRANSITIONS)


def run(events, machine=None):
    reported: list[StatePair] = []
    m = machine or SessionStateMachine(reported.append)
    for e in events:
        m.fire(e)
    return m, [str(p) for p in reported]


def test_full_copy_pause_resume_sync_error_delete():
    E = Event
    m, seen = run([
        E.START, E.COPY_RUNNING, E.COPY_RUNNING, E.STOP, E.STOPPED, E.RESUME, E.COPY_RUNNING, E.COPY_DONE,
        E.SYNC_START, E.SYNC_DONE, E.SYNC_START, E.ERROR, E.RESUME, E.SYNC_START, E.DELETE, E.DELETED,
    ])
    assert seen == [
        "INIT/replicating", "REPLICATE/replicating", "STOPPING/replicating", "STOPPED/replicating",
        "REPLICATE/replicating", "SYNCING/syncing", "ERROR/syncing", "SYNCING/syncing", "DELETING/syncing",
    ]
    assert m.state is SessionState.DELETED and m.pair is None
    with pytest.raises(TransitionError, match="'start' is not allowed in state 'deleted'"):
        m.fire(E.START)


def test_sync_run_and_cutover():
    E = Event
    m, seen = run([E.SYNC_START, E.SYNC_DONE, E.SKIP, E.SYNC_START, E.CUTOVER, E.STOP, E.STOPPED, E.RESUME,
                   E.CUTOVER_DONE, E.SKIP])
    assert seen == ["SYNCING/syncing", "CUTOVERING/cutovering", "STOPPING/cutovering", "STOPPED/cutovering",
                    "CUTOVERING/cutovering", "FINISHED/cutovered"]
    m.fire(E.DELETE)
    assert str(m.pair) == "DELETING/cutovered"


def test_invalid_events_raise_and_do_not_report():
    seen = []
    m = SessionStateMachine(seen.append)
    for e in (Event.COPY_DONE, Event.SYNC_DONE, Event.RESUME, Event.CUTOVER, Event.STOPPED):
        assert not m.can(e)
        with pytest.raises(TransitionError) as ei:
            m.fire(e)
        assert isinstance(ei.value, ReplicationError) and ei.value.exit_code == 2
    assert seen == [] and m.state is SessionState.IDLE
    m.fire(Event.START)
    with pytest.raises(TransitionError):
        m.fire(Event.SYNC_START)  # no sync round during the first copy
    assert m.state is SessionState.INIT


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list(Event)), max_size=60))
def test_random_event_sequences_only_report_allowed_pairs(events):
    seen: list[StatePair] = []
    m = SessionStateMachine(seen.append)
    for e in events:
        if m.can(e):
            m.fire(e)
        else:
            before = m.state
            with pytest.raises(TransitionError):
                m.fire(e)
            assert m.state is before
    for p in seen:
        assert is_allowed(p.copystate, p.migrationcycle)
    for a, b in itertools.pairwise(seen):
        assert a != b  # only changes are reported
    assert seen == m.history


def test_command_vocabulary():
    assert {c.value for c in Command} >= {"START", "STOP", "DELETE", "SYNC", "SKIP"}
    assert Command.parse("sync") is Command.SYNC
    with pytest.raises(ConfigError, match="command_name: 'PAUSE' is not a 5.5.1 command"):
        Command.parse("PAUSE")
    cmd = ServerCommand.from_json({"command_name": "START", "command_param": {"task_id": "t-1", "bucket": "b"}})
    assert cmd == ServerCommand(Command.START, "t-1", "b")
    assert ServerCommand.from_json({"command_name": "STOP"}).task_id is None
    with pytest.raises(ConfigError, match="command_name is missing"):
        ServerCommand.from_json({})
    with pytest.raises(ConfigError, match="command_param: expected an object"):
        ServerCommand.from_json({"command_name": "STOP", "command_param": "x"})


def test_command_result_is_the_5_5_2_body():
    ok = CommandResult.success("SYNC", round=3)
    assert ok.ok and ok.to_json() == {"command_name": "SYNC", "result": "success", "result_detail": {"round": 3}}
    bad = CommandResult.fail(Command.START, TransportError("connection reset"))
    assert not bad.ok
    assert bad.to_json() == {"command_name": "START", "result": "fail",
                             "result_detail": {"error_code": "SMS.0807", "error_msg": "connection reset"}}
    assert CommandResult.fail("STOP", "not running").to_json()["result_detail"] == {"error_msg": "not running"}
    assert CommandResult("DELETE", "success").result is CommandResultValue.SUCCESS
    assert CommandResult(Command.SKIP, CommandResultValue.FAIL).to_json()["result_detail"] == {}
    with pytest.raises(ConfigError, match="result: 'done' must be 'success' or 'fail'"):
        CommandResult(Command.SKIP, "done")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="result_detail: expected an object"):
        CommandResult(Command.SKIP, "fail", "oops")  # type: ignore[arg-type]
