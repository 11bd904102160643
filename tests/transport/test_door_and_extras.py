"""Extra connections begun early wait at the receiver's door without counting among the
connections that have not said HELLO (a door full of those evicts the oldest: the session's
own, still before its HELLO, while its extra connections piled up behind it)."""
from __future__ import annotations

import time

from smsrepl.transport.connect import connect, connect_ahead
from smsrepl.transport.sender import Sender
from smsrepl.transport.tls import client_context


def test_extra_connections_begun_ahead_do_not_push_the_sessions_own_out_of_the_door(tmp_path, bundle, source_image,
                                                                                     receiver):
    src = source_image()
    addr = receiver(max_unauthenticated=3)
    other = None
    try:
        ctx = client_context(bundle)
        ahead = connect_ahead(addr, ctx, 3)  # the sender imports the rest of itself meanwhile
        ahead.result(30)
        time.sleep(0.3)  # its extra connections have done what they do before the session's HELLO
        other = connect(addr, ctx)  # another sender's connection comes to the door
        time.sleep(0.3)
        sender = Sender(str(src), "disk0", addr, ctx, str(tmp_path / "tx"), level=0, streams=3)
        sender.take_connection(ahead)
        sender.run()
        assert (tmp_path / "t.img").read_bytes() == src.read_bytes()
    finally:
        if other is not None:
            other.close()


def test_extra_connections_go_when_the_sessions_hello_cannot_be_sent(tmp_path, bundle, monkeypatch, source_image,
                                                                     receiver):
    from smsrepl.errors import TransportError
    from smsrepl.protocol import frames as F
    from smsrepl.transport.channel import Channel

    src = source_image()
    addr = receiver()
    send = Channel.send

    def failing(self, event):
        if isinstance(event, F.Hello) and event.kind == "block":
            raise TransportError("connection lost while sending: broken pipe")
        return send(self, event)

    monkeypatch.setattr(Channel, "send", failing)
    sender = Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0, streams=3)
    early: list = []
    real = sender._prejoin
    sender._prejoin = lambda raw: (real(raw), early.extend(sender._early))
    try:
        sender.run()
    except TransportError:
        pass
    else:
        raise AssertionError("the session's HELLO did not fail")
    assert len(early) == 2 and sender._early == []
    socks = [f.result(30) for f in early if f.exception(30) is None]
    deadline = time.monotonic() + 10
    while any(s.raw.fileno() >= 0 for s in socks) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(s.raw.fileno() == -1 for s in socks)
