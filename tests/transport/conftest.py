"""Fixtures of the transport tests that run a sender against a Receiver in this process."""
from __future__ import annotations

import threading

import pytest

from smsrepl.protocol.connection import SENDER
from smsrepl.transport.channel import Channel
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.tls import server_context


@pytest.fixture
def source_image(tmp_path):
    """Makes tmp_path/src.img of ``size`` bytes, none of its blocks zero (64 KiB runs of one
    byte; ``seed`` varies them) and returns its path."""
    def make(size: int = 4 << 20, seed: int = 1):
        path = tmp_path / "src.img"
        with open(path, "wb") as fh:
            for i in range(size // 65536):
                fh.write(bytes([(i * seed) % 251 + 1]) * 65536)
        return path
    return make


@pytest.fixture
def receiver(tmp_path, bundle):
    """Starts a Receiver on loopback for ``targets`` (default disk0 at tmp_path/t.img, created)
    and returns its address; stopped at the test's end."""
    started: list[Receiver] = []

    def start(targets: dict | None = None, **kw):
        rx = Receiver(targets or {"disk0": str(tmp_path / "t.img")}, server_context(bundle), str(tmp_path / "rx"),
                      create=True, **kw)
        started.append(rx)
        return rx.start()

    yield start
    for rx in started:
        rx.stop()


@pytest.fixture
def own_connection_frames(monkeypatch) -> list[str]:
    """What the sender's own connection (its first channel: not the extra ones) sends and
    receives, in order ("send Close", "recv RoundDone")."""
    seen: list[str] = []
    first: list[Channel] = []
    lock = threading.Lock()
    send, recv = Channel.send, Channel.recv

    def mine(chan: Channel) -> bool:
        with lock:
            if chan.conn.role is SENDER and not first:
                first.append(chan)
            return bool(first) and chan is first[0]

    def sending(self, event):
        if mine(self):
            seen.append(f"send {type(event).__name__}")
        return send(self, event)

    def receiving(self):
        event = recv(self)
        if mine(self):
            seen.append(f"recv {type(event).__name__}")
        return event

    monkeypatch.setattr(Channel, "send", sending)
    monkeypatch.setattr(Channel, "recv", receiving)
    return seen
