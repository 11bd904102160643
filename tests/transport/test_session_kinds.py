"""The receiver's dispatch table: HELLO's session kind names the handler that serves it."""
from __future__ import annotations

import threading
import time

import pytest

from smsrepl.protocol import SENDER, Connection
from smsrepl.transport import server as server_module
from smsrepl.protocol import frames as F
from smsrepl.transport.channel import Channel
from smsrepl.transport.connect import connect
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.server import SESSION_KINDS
from smsrepl.transport.tls import client_context, server_context


def test_every_session_kind_a_sender_opens_has_a_handler():
    assert set(SESSION_KINDS) == {"block", "verify", "files", "netcheck", "status", "stream"}


@pytest.mark.parametrize("kind", ["bogus", "", "BLOCK"])
def test_a_kind_not_in_the_table_is_refused_and_nothing_is_written(tmp_path, bundle, kind):
    outcomes = []
    rx = Receiver({"disk0": str(tmp_path / "t.img")}, server_context(bundle), str(tmp_path / "rx"), create=True,
                  on_session=outcomes.append)
    addr = rx.start()
    try:
        chan = Channel(connect(addr, client_context(bundle)), Connection(SENDER))
        chan.send(F.Hello([F.PROTOCOL_VERSION], kind, "disk0", "s1", 1 << 20, F.FINE_BLOCK, list(F.CAPABILITIES)))
        ev = chan.recv()
        chan.close()
    finally:
        rx.stop()
    assert isinstance(ev, F.Error), ev
    assert ev.exit_code == 4 and not ev.resumable, ev
    assert ev.message == f"session kind {kind!r} is not supported by this receiver"
    assert not (tmp_path / "t.img").exists()
    assert not (tmp_path / "rx" / "disk0").exists() and not (tmp_path / "rx" / "disk0.lock").exists()
    assert [(o.target, o.ok, o.error.exit_code) for o in outcomes] == [("disk0", False, 4)]


class _SlowToList(threading.Thread):
    """A connection's thread whose starter (the serving thread) is held up right after starting
    it, as a busy machine may: stop() can come before the thread is listed."""

    def start(self) -> None:
        super().start()
        if getattr(self, "_target", None) is not None and self._target.__name__ == "_handle":
            time.sleep(0.3)


class _Threading:
    Thread = _SlowToList

    def __getattr__(self, name):
        return getattr(threading, name)


def test_stop_returns_once_a_session_that_ended_meanwhile_is_recorded(tmp_path, bundle, monkeypatch):
    monkeypatch.setattr(server_module, "threading", _Threading())
    outcomes = []

    def slow_end(outcome) -> None:  # the session's end takes a while (a checkpoint's fsync, say)
        time.sleep(1.0)
        outcomes.append(outcome)

    rx = Receiver({"disk0": str(tmp_path / "t.img")}, server_context(bundle), str(tmp_path / "rx"), create=True,
                  on_session=slow_end)
    addr = rx.start()
    try:
        chan = Channel(connect(addr, client_context(bundle)), Connection(SENDER))
        chan.send(F.Hello([F.PROTOCOL_VERSION], "bogus", "disk0", "s1", 1 << 20, F.FINE_BLOCK, list(F.CAPABILITIES)))
        assert isinstance(chan.recv(), F.Error)
        chan.close()
    finally:
        rx.stop()
    assert [(o.target, o.ok) for o in outcomes] == [("disk0", False)]


def test_an_extra_connection_without_its_sessions_key_is_refused(tmp_path, bundle):
    """HELLO kind "stream" joins only a running session that granted streams, with its key."""
    rx = Receiver({"disk0": str(tmp_path / "t.img")}, server_context(bundle), str(tmp_path / "rx"), create=True)
    addr = rx.start()
    try:
        chan = Channel(connect(addr, client_context(bundle)), Connection(SENDER))
        chan.send(F.Hello([F.PROTOCOL_VERSION], "stream", "disk0", "s1", 1 << 20, F.FINE_BLOCK, ["streams"]))
        chan.send(F.Streams(1, "00" * 16))
        ev = chan.recv()
        chan.close()
    finally:
        rx.stop()
    assert isinstance(ev, F.Error), ev
    assert ev.exit_code == 4 and "key" in ev.message, ev
    assert not (tmp_path / "t.img").exists()
