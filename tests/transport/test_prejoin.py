"""A session's extra connections (parallel streams) are begun as soon as its own TCP connection
is made, beside its TLS handshake: on a 50 ms link that is one round trip sooner than after it.
Both ways a first connection comes: connected by the session, or begun ahead (connect_ahead)."""
from __future__ import annotations

import threading
import time

from smsrepl.transport import sender_base
from smsrepl.transport.connect import Ahead, connect
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.sender import Sender
from smsrepl.transport.tls import client_context, server_context


def _image(path, size=4 << 20) -> None:
    with open(path, "wb") as fh:
        for i in range(size // 65536):
            fh.write(bytes([i % 251 + 1]) * 65536)


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
    return seen


def test_extra_connections_are_begun_before_the_sessions_tls_handshake_ends(tmp_path, bundle, monkeypatch):
    src = tmp_path / "src.img"
    _image(src)
    rx = Receiver({"disk0": str(tmp_path / "t.img")}, server_context(bundle), str(tmp_path / "rx"), create=True)
    addr = rx.start()
    try:
        seen = _record_connects(monkeypatch)
        Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0, streams=3).run()
        assert seen.index("tcp") < seen.index("extra") < seen.index("tls")
        assert seen.count("extra") == 2
        assert (tmp_path / "t.img").read_bytes() == src.read_bytes()
    finally:
        rx.stop()


def test_extra_connections_are_begun_when_a_connection_begun_ahead_is_tcp_connected(tmp_path, bundle, monkeypatch):
    src = tmp_path / "src.img"
    _image(src)
    rx = Receiver({"disk0": str(tmp_path / "t.img")}, server_context(bundle), str(tmp_path / "rx"), create=True)
    addr = rx.start()
    try:
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
    finally:
        rx.stop()
