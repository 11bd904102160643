"""A connection begun before the sender existed (connect.connect_ahead): its first session
runs over it, later ones connect anew, and one no session took is closed."""
from __future__ import annotations


import pytest

from smsrepl.errors import ConnectError
from smsrepl.transport import sender_base
from smsrepl.transport.connect import Ahead, connect_ahead
from smsrepl.transport.sender import Sender
from smsrepl.transport.tls import client_context


def test_the_first_session_runs_over_the_connection_begun_ahead(tmp_path, bundle, monkeypatch, source_image, receiver):
    src = source_image()
    addr = receiver()
    ctx = client_context(bundle)
    ahead = connect_ahead(addr, ctx)
    made = []
    real = sender_base.connect
    monkeypatch.setattr(sender_base, "connect", lambda *a, **kw: made.append(a) or real(*a, **kw))
    sender = Sender(str(src), "disk0", addr, ctx, str(tmp_path / "tx"), level=0)
    sender.take_connection(ahead)
    sender.run()
    assert made == []  # the round took the connection begun ahead
    assert (tmp_path / "t.img").read_bytes() == src.read_bytes()
    sender.run()  # a second session: a connection of its own
    assert len(made) == 1


def test_a_failed_connection_begun_ahead_is_the_first_sessions_error(tmp_path, bundle, source_image):
    ahead = Ahead()
    ahead.set_exception(ConnectError("cannot reach the target at 192.0.2.1:9 (ahead)"))
    src = source_image(1 << 20)
    sender = Sender(str(src), "disk0", ("127.0.0.1", 9), client_context(bundle), str(tmp_path / "tx"))
    sender.take_connection(ahead)
    with pytest.raises(ConnectError, match="ahead"):
        sender.run()


def test_a_connection_begun_ahead_and_not_taken_is_closed(tmp_path, bundle):
    closed = []

    class Conn:
        def close(self):
            closed.append(self)

    ahead = Ahead()
    sender = Sender(str(tmp_path / "none.img"), "disk0", ("127.0.0.1", 9), client_context(bundle), str(tmp_path / "tx"))
    sender.take_connection(ahead)
    sender.drop_connection()
    assert closed == []
    ahead.set_result(Conn())  # its handshakes end after the sender gave up on it
    assert len(closed) == 1


def test_a_connection_begun_ahead_is_closed_when_a_stop_breaks_the_wait_for_it(tmp_path, bundle, source_image):
    """A signal's KeyboardInterrupt (cli.interrupt.OneShotStop) while the first session waits for
    the handshakes begun ahead: the session never took it, so it is closed once made."""
    closed = []

    class Conn:
        def close(self):
            closed.append(self)

    class Interrupted(Ahead):
        def result(self, timeout=None):
            if not self.done():  # the wait the signal broke
                raise KeyboardInterrupt
            return super().result(timeout)

    src = source_image(1 << 20)
    ahead = Interrupted()
    ahead.tcp.set_result(None)  # its TCP connection made, its TLS handshake not yet
    sender = Sender(str(src), "disk0", ("127.0.0.1", 9), client_context(bundle), str(tmp_path / "tx"))
    sender.take_connection(ahead)
    try:
        with pytest.raises(KeyboardInterrupt):
            sender.run()
    finally:
        sender.drop_connection()
    ahead.set_result(Conn())  # its handshakes end after the wait was broken
    assert len(closed) == 1
