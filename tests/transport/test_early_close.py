"""A block session's CLOSE goes right after its ROUND_END to a receiver that listed
"early-close" (one round trip less at the end of every session), and only after ROUND_DONE
to one that did not."""
from __future__ import annotations

import threading

import pytest

from smsrepl.protocol import frames as F
from smsrepl.protocol.connection import SENDER, TRANSITIONS, State
from smsrepl.transport import block_session
from smsrepl.transport.channel import Channel
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.sender import Sender
from smsrepl.transport.tls import client_context, server_context


def _image(path, size=6 << 20) -> None:
    with open(path, "wb") as fh:
        for i in range(size // 65536):
            fh.write(bytes([i % 251 + 1]) * 65536)


def _sender_frames(monkeypatch) -> list[str]:
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


def _copy(tmp_path, bundle, streams: int) -> None:
    src = tmp_path / "src.img"
    _image(src)
    rx = Receiver({"disk0": str(tmp_path / "t.img")}, server_context(bundle), str(tmp_path / "rx"), create=True)
    addr = rx.start()
    try:
        result = Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0,
                        streams=streams).run()
        assert result.kind == "full"
        assert (tmp_path / "t.img").read_bytes() == src.read_bytes()
    finally:
        rx.stop()


@pytest.mark.parametrize("streams", [1, 3])
def test_the_close_goes_with_the_round_end(tmp_path, bundle, monkeypatch, streams):
    seen = _sender_frames(monkeypatch)
    _copy(tmp_path, bundle, streams)
    assert seen.index("send Close") == seen.index("send RoundEnd") + (2 if streams > 1 else 1)  # (its SEQ)
    assert seen.index("send Close") < seen.index("recv RoundDone") < seen.index("recv Close")


def test_a_receiver_without_early_close_gets_the_close_after_round_done(tmp_path, bundle, monkeypatch):
    # a receiver of the version before: neither listed nor accepted
    monkeypatch.setattr(block_session, "CAPABILITIES", tuple(c for c in F.CAPABILITIES if c != F.EARLY_CLOSE))
    monkeypatch.delitem(TRANSITIONS, (State.ROUND_ENDING, SENDER, F.Close))
    seen = _sender_frames(monkeypatch)
    _copy(tmp_path, bundle, 1)
    assert seen.index("recv RoundDone") < seen.index("send Close") < seen.index("recv Close")
