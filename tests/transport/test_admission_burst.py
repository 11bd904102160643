"""Connections that spoke while as many as allowed are before their HELLO wait for a place, and
only one idle past EVICT_AFTER is evicted for them: a session's extra connections (and several
sessions' at once, over a long link) handshake together and none of them is pushed out."""
from __future__ import annotations

import logging
import socket
import ssl
import time

from smsrepl.throttle import SpeedSchedule
from smsrepl.transport import limits
from smsrepl.transport.sender import Sender
from smsrepl.transport.tls import client_context
from smsrepl.transport.tlsio import TLSStream


def _slow_server_handshakes(monkeypatch, seconds: float) -> None:
    """Every handshake of the receiver takes ``seconds`` more: its connections stay before their
    HELLO that long, as over a long link."""
    handshake = TLSStream.handshake

    def slow(self):
        if self.obj.server_side:
            time.sleep(seconds)
        return handshake(self)

    monkeypatch.setattr(TLSStream, "handshake", slow)


def test_extra_connections_handshaking_together_all_join(tmp_path, bundle, source_image, receiver, monkeypatch,
                                                        caplog):
    src = source_image(24 << 20)
    addr = receiver(max_unauthenticated=2)
    _slow_server_handshakes(monkeypatch, 0.3)
    caplog.set_level(logging.INFO, logger="smsrepl.sender")
    # 3 s at 64 Mbit/s: the extra connections join while the round runs
    slow = SpeedSchedule.from_json({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 64}]})
    sender = Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0, streams=6,
                    speed_limit=slow)
    sender.run()
    assert (tmp_path / "t.img").read_bytes() == src.read_bytes()
    joined = [r.getMessage() for r in caplog.records if "runs over" in r.getMessage()]
    assert joined and joined[-1].endswith("runs over 6 connections"), joined
    assert not [r for r in caplog.records if "not joined" in r.getMessage()]


def test_a_connection_idle_before_its_hello_goes_after_evict_after(tmp_path, bundle, source_image, receiver):
    src = source_image()
    addr = receiver(max_unauthenticated=1)
    ctx = client_context(bundle)
    # handshaken, then silent: the one place before HELLO is taken
    idle = ctx.wrap_socket(socket.create_connection(addr), server_hostname=addr[0])
    idle.settimeout(30)
    t0 = time.monotonic()
    Sender(str(src), "disk0", addr, ctx, str(tmp_path / "tx"), level=0, streams=1).run()
    # the sender waited for the idle connection to age, and it was evicted for the sender
    assert time.monotonic() - t0 >= limits.EVICT_AFTER * 0.9
    try:
        assert idle.recv(1) == b""
    except (ssl.SSLError, OSError):
        pass  # reset: evicted too
    idle.close()
    assert (tmp_path / "t.img").read_bytes() == src.read_bytes()


def test_extra_connections_a_short_round_did_not_wait_for_are_no_warning(tmp_path, bundle, source_image, receiver,
                                                                        monkeypatch, caplog):
    src = source_image()  # 4 MiB: done long before any extra connection's handshake
    addr = receiver()
    _slow_server_handshakes(monkeypatch, 2.0)  # the session's own too: 4 s in all
    caplog.set_level(logging.INFO, logger="smsrepl.sender")
    Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0, streams=4).run()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # the joins end after the session
        late = [r for r in caplog.records if "not joined" in r.getMessage()]
        if len(late) == 3:
            break
        time.sleep(0.1)
    assert late and all(r.levelno == logging.INFO for r in late), [(r.levelname, r.getMessage()) for r in late]


def test_a_queue_of_idle_speakers_keeps_a_real_sender_waiting_no_longer_than_evict_after(tmp_path, bundle,
                                                                                        source_image, receiver):
    """Connections that spoke (one byte) and then idle, queued at once ahead of a real sender:
    each waits at most EVICT_AFTER from when it spoke, not EVICT_AFTER behind the one before it
    (with one place before HELLO, five of them held the sender out over 10 s: a flood at an
    address's allowed rate grew the queue without end)."""
    src = source_image()
    addr = receiver(max_unauthenticated=1, handshake_timeout=30)
    idle = []
    for _ in range(6):
        s = socket.create_connection(addr)
        s.sendall(b"\x16")  # the start of a TLS record: it spoke, and says no more
        idle.append(s)
    time.sleep(0.3)
    t0 = time.monotonic()
    try:
        Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0, streams=1).run()
        took = time.monotonic() - t0
    finally:
        for s in idle:
            s.close()
    assert took < limits.EVICT_AFTER + 2.0, took
    assert (tmp_path / "t.img").read_bytes() == src.read_bytes()
