"""Parallel streams end to end in one process (a Receiver and a sender on loopback): how a
session over several connections fails, and what the next session of the same sender does."""
from __future__ import annotations

import threading

import pytest

from smsrepl.errors import RefusedError, ReplicationError
from smsrepl.transport import sender_base
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.session import Session
from smsrepl.transport.tls import client_context, server_context


def _tree(root, files: int = 20) -> None:
    root.mkdir(exist_ok=True)
    for i in range(files):
        (root / f"f{i}").write_bytes(bytes([i]) * (10_000 + i))


def test_a_session_cut_before_the_streams_answer_leaves_nothing_for_the_next_one(tmp_path, bundle, monkeypatch):
    # the first session asks for 3 connections and ends before the receiver's answer; the next
    # one of the same sender runs over one ("auto" found a shorter round trip): it must not wait
    # for an answer to a question it did not ask
    from smsrepl.transport.file_sender import FileSender

    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src)
    counts = iter([3, 1])
    monkeypatch.setattr(sender_base, "initial_streams", lambda want, chan: next(counts))
    real = Session.grant_streams
    refused = []

    def refuse_once(self, ev):
        if not refused:
            refused.append(ev)
            raise RefusedError("not now")
        real(self, ev)

    monkeypatch.setattr(Session, "grant_streams", refuse_once)
    rx = Receiver({"tree": str(dst)}, server_context(bundle), str(tmp_path / "rx"), create=True)
    addr = rx.start()
    try:
        sender = FileSender(str(src), "tree", addr, client_context(bundle), level=0, streams="auto")
        with pytest.raises(ReplicationError, match="not now"):
            sender.run()
        assert sender._joining is None  # nor the connections and copy buffers of the one that ended
        outcome: list = []
        second = threading.Thread(target=lambda: outcome.append(sender.run()), daemon=True)
        second.start()
        second.join(30)
        if second.is_alive():
            sender.stop()
            second.join(10)
        assert outcome, "the second session waited for an answer to a STREAMS it never sent"
    finally:
        rx.stop()
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in src.iterdir())


# --- a hostile or broken peer on an extra connection --------------------------------------

def _striped_session(tmp_path, bundle):
    """A receiver, a block session on it that asked for 2 connections, and the grant's key."""
    from smsrepl.protocol import PROTOCOL_VERSION, SENDER, Connection
    from smsrepl.protocol import frames as F
    from smsrepl.transport.channel import Channel
    from smsrepl.transport.connect import connect

    rx = Receiver({"disk0": str(tmp_path / "t.img")}, server_context(bundle), str(tmp_path / "rx"), create=True)
    addr = rx.start()
    main = Channel(connect(addr, client_context(bundle)), Connection(SENDER))
    main.send(F.Hello([PROTOCOL_VERSION], "block", "disk0", "s1", 1 << 20, F.FINE_BLOCK, list(F.CAPABILITIES)))
    assert isinstance(main.recv(), F.Welcome)
    main.send(F.Streams(2, ""))
    grant = main.recv()
    assert isinstance(grant, F.Streams) and grant.count == 2
    return rx, addr, main, grant.key


def _extra(addr, bundle, index: int, key: str):
    from smsrepl.protocol import PROTOCOL_VERSION, SENDER, Connection
    from smsrepl.protocol import frames as F
    from smsrepl.transport.channel import Channel
    from smsrepl.transport.connect import connect

    chan = Channel(connect(addr, client_context(bundle)), Connection(SENDER))
    chan.send(F.Hello([PROTOCOL_VERSION], "stream", "disk0", "s1", 1 << 20, F.FINE_BLOCK, ["streams"]))
    chan.send(F.Streams(index, key))
    return chan


@pytest.mark.parametrize("bad", ["short SEQ", "SEQ then a round's control frame", "a frame without SEQ"])
def test_an_extra_connection_carrying_a_bad_frame_fails_the_session_and_writes_nothing(tmp_path, bundle, bad):
    from smsrepl.protocol import frames as F
    from smsrepl.protocol.writers import frame

    rx, addr, main, key = _striped_session(tmp_path, bundle)
    try:
        extra = _extra(addr, bundle, 1, key)
        assert isinstance(extra.recv(), F.Welcome)
        wire = {"short SEQ": frame(F.Seq.TYPE, b"\0\0\0\1"),
                "SEQ then a round's control frame": b"".join(bytes(p) for p in F.encode(F.Seq(0)) + F.encode(F.RoundBegin(1, "full", 0))),
                "a frame without SEQ": b"".join(bytes(p) for p in F.encode(F.ZeroRange(0, 4096)))}[bad]
        extra.sock.sendall(wire)  # past this end's own state machine: a broken peer's bytes
        ev = main.recv()
        extra.close()
        main.close()
    finally:
        rx.stop()
    assert isinstance(ev, F.Error), ev
    assert ev.resumable and "extra connection 1" in ev.message, ev
    assert not any((tmp_path / "t.img").read_bytes())  # no data reached the target


def test_an_extra_connection_past_the_grant_is_refused(tmp_path, bundle):
    from smsrepl.protocol import frames as F

    rx, addr, main, key = _striped_session(tmp_path, bundle)
    try:
        extra = _extra(addr, bundle, 2, key)  # granted 2 in all: index 1 only
        ev = extra.recv()
        extra.close()
        main.close()
    finally:
        rx.stop()
    assert isinstance(ev, F.Error) and ev.exit_code == 4 and "not one the session granted" in ev.message, ev
