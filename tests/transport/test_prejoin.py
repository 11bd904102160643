"""A session's extra connections (parallel streams) are begun as soon as its own TCP connection
is made, beside its TLS handshake: on a 50 ms link that is one round trip sooner than after it.
Both ways a first connection comes: connected by the session, or begun ahead (connect_ahead)."""
from __future__ import annotations

import threading
import time

from smsrepl.transport import sender_base
from smsrepl.transport import connect as connect_module
from smsrepl.transport.connect import Ahead, connect, connect_ahead
from smsrepl.transport.sender import Sender
from smsrepl.transport.tls import client_context


def _record_connects(monkeypatch) -> list[str]:
    """Events of sender_base's connects: "tcp" and "tls" of the session's own (the one given
    on_tcp), "extra" when an extra one is begun."""
    seen: list[str] = []
    real = sender_base.connect

    def recording(address, context, *, on_tcp=None, **kw):
        if on_tcp is None:
            seen.append("extra")
            return real(address, context, **kw)

        def tcp(raw):
            seen.append("tcp")
            on_tcp(raw)

        sock = real(address, context, on_tcp=tcp, **kw)
        seen.append("tls")
        return sock

    monkeypatch.setattr(sender_base, "connect", recording)
    monkeypatch.setattr(connect_module, "connect", recording)  # begin_connects's, for the extra ones
    return seen


def test_extra_connections_are_begun_before_the_sessions_tls_handshake_ends(tmp_path, bundle, monkeypatch,
                                                                            source_image, receiver):
    src = source_image()
    addr = receiver()
    seen = _record_connects(monkeypatch)
    Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0, streams=3).run()
    assert seen.index("tcp") < seen.index("extra") < seen.index("tls")
    assert seen.count("extra") == 2
    assert (tmp_path / "t.img").read_bytes() == src.read_bytes()


def test_extra_connections_are_begun_when_a_connection_begun_ahead_is_tcp_connected(tmp_path, bundle, monkeypatch,
                                                                                    source_image, receiver):
    src = source_image()
    addr = receiver()
    seen = _record_connects(monkeypatch)
    ctx = client_context(bundle)
    ahead = Ahead()  # its TCP connection made, its TLS handshake still running
    ahead.tcp.set_result(None)
    sender = Sender(str(src), "disk0", addr, ctx, str(tmp_path / "tx"), level=0, streams=3)
    sender.take_connection(ahead)
    done: list = []
    run = threading.Thread(target=lambda: done.append(sender.run()), daemon=True)
    run.start()
    deadline = time.monotonic() + 30
    while seen.count("extra") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen.count("extra") == 2 and not done
    ahead.set_result(connect(addr, ctx))
    run.join(60)
    assert done and (tmp_path / "t.img").read_bytes() == src.read_bytes()


def test_a_connection_begun_ahead_for_the_same_streams_brings_its_extra_connections(tmp_path, bundle, monkeypatch,
                                                                                    source_image, receiver):
    """connect_ahead(streams=3) begins the extra connections itself, at its TCP connection (the
    sender is still being imported then): the session joins those, and begins none."""
    src = source_image()
    addr = receiver()
    ctx = client_context(bundle)
    ahead = connect_ahead(addr, ctx, 3)
    ahead.result(30)
    assert ahead.planned == 3 and len(ahead.early) == 2
    seen = _record_connects(monkeypatch)
    sender = Sender(str(src), "disk0", addr, ctx, str(tmp_path / "tx"), level=0, streams=3)
    sender.take_connection(ahead)
    joined = []
    real = sender._join
    sender._join = lambda index, key, sid, size, early: (joined.append(early.result())
                                                         or real(index, key, sid, size, early))
    sender.run()
    assert seen == []  # no connection of its own
    assert sorted(map(id, joined)) == sorted(id(f.result()) for f in ahead.early)
    assert (tmp_path / "t.img").read_bytes() == src.read_bytes()


def test_extra_connections_begun_ahead_and_not_taken_are_closed(tmp_path, bundle, receiver):
    addr = receiver()
    ctx = client_context(bundle)
    ahead = connect_ahead(addr, ctx, 3)
    sender = Sender(str(tmp_path / "none.img"), "disk0", addr, ctx, str(tmp_path / "tx"), streams=3)
    sender.take_connection(ahead)
    sender.drop_connection()
    ahead.result(30)
    # the extra ones were made, and closed, or given up before their TLS handshake (connect.Gate)
    socks = [ahead.result()] + [f.result(30) for f in ahead.early if f.exception(30) is None]
    deadline = time.monotonic() + 10
    while any(s.raw.fileno() >= 0 for s in socks) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [s.raw.fileno() for s in socks] == [-1] * len(socks)
    assert len(ahead.early) == 2


def _copy_over_three(tmp_path, bundle, source_image, receiver) -> None:
    src = source_image()
    addr = receiver()
    sender = Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0, streams=3)
    joined: list[int] = []
    real = sender._join_all
    sender._join_all = lambda stripes, *a: (real(stripes, *a), joined.append(stripes.streams))
    sender.run()
    assert joined == [3]
    assert (tmp_path / "t.img").read_bytes() == src.read_bytes()


def test_the_hello_asks_for_the_connections_and_the_answer_follows_the_welcome(tmp_path, bundle, source_image,
                                                                              receiver, own_connection_frames):
    seen = own_connection_frames
    _copy_over_three(tmp_path, bundle, source_image, receiver)
    # (the replies are read on a thread of their own: the grant may be read after the first frames went)
    assert [f for f in seen if f.startswith("recv")][:2] == ["recv Welcome", "recv Streams"]
    assert seen.count("send Streams") == 0  # asked in HELLO, not again


def test_a_receiver_without_streams_hello_is_asked_after_its_welcome(tmp_path, bundle, monkeypatch, source_image,
                                                                     receiver, own_connection_frames):
    from smsrepl.protocol import frames as F
    from smsrepl.transport import block_session
    from smsrepl.transport.session import Session

    # a receiver of the version before: it neither lists streams-hello nor reads the HELLO's entry
    monkeypatch.setattr(block_session, "CAPABILITIES", tuple(c for c in F.CAPABILITIES if c != F.STREAMS_HELLO))
    monkeypatch.setattr(Session, "grant_hello_ask", lambda self: None)
    seen = own_connection_frames
    _copy_over_three(tmp_path, bundle, source_image, receiver)
    assert [f for f in seen if f.startswith("send")][:2] == ["send Hello", "send Streams"]
    assert seen.index("recv Welcome") < seen.index("send Streams") < seen.index("recv Streams")


def test_a_hello_asking_for_a_count_that_is_not_one_is_a_protocol_error():
    import pytest

    from smsrepl.errors import RemoteProtocolError
    from smsrepl.transport.session import hello_streams

    assert hello_streams(["zstd", "streams", "streams=4"]) == 4
    assert hello_streams(["zstd", "streams"]) == 0
    for bad in ("streams=", "streams=x", "streams=-1", "streams=99999", "streams=\u00b2", "streams=\u0663"):
        with pytest.raises(RemoteProtocolError, match="not a count"):
            hello_streams([bad])


def test_frames_shrink_as_the_connections_grow(tmp_path, bundle, monkeypatch, source_image, receiver):
    """Frames of a session over several connections fit STREAMS_FRAME_BYTES together: the
    receiver applies them in order, and an 8 MiB frame delayed on one of 8 connections held up
    the others' (71% of an emulated lossy link, 83-85% with 4 MiB frames)."""
    from smsrepl.blocks.stream import FRAME_BLOCKS
    from smsrepl.protocol import frames as F
    from smsrepl.transport.block_pipeline import frame_blocks
    from smsrepl.transport.channel import Channel

    assert [frame_blocks(FRAME_BLOCKS, n) * 4096 >> 20 for n in (1, 2, 4, 5, 8, 16)] == [8, 8, 8, 4, 4, 2]
    assert frame_blocks(FRAME_BLOCKS, 10_000) == 64
    sizes: list[int] = []
    send = Channel.send

    def sending(self, event):
        if isinstance(event, F.BlockData):
            sizes.append(event.raw_len)
        return send(self, event)

    monkeypatch.setattr(Channel, "send", sending)
    src = source_image(24 << 20)
    addr = receiver({"one": str(tmp_path / "one.img"), "eight": str(tmp_path / "eight.img")})
    for target, streams, most in (("one", 1, 8 << 20), ("eight", 8, 4 << 20)):
        sizes.clear()
        Sender(str(src), target, addr, client_context(bundle), str(tmp_path / target), level=0,
               streams=streams).run()
        assert max(sizes) == most
        assert (tmp_path / f"{target}.img").read_bytes() == src.read_bytes()


def test_a_hello_with_a_bad_streams_entry_is_refused_and_the_target_untouched(tmp_path, bundle, monkeypatch,
                                                                             source_image, receiver):
    """A sender whose HELLO says "streams=x" hears a protocol error naming it; the receiver writes
    nothing and serves the next sender as ever."""
    import pytest

    from smsrepl.errors import ReplicationError
    from smsrepl.transport import sender as sender_module

    src = source_image()
    addr = receiver()
    real = sender_module._capabilities
    monkeypatch.setattr(sender_module, "_capabilities", lambda stateless: real(stateless) + ["streams=x"])
    with pytest.raises(ReplicationError, match="streams=x"):
        Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0).run()
    target = tmp_path / "t.img"
    assert not target.exists() or not target.read_bytes().strip(b"\0")
    monkeypatch.setattr(sender_module, "_capabilities", real)
    Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0).run()
    assert target.read_bytes() == src.read_bytes()
