"""A sender without state of its own that takes the receiver's session over (adopt-session)
runs its sync round over the connections it asked for: its extra connections name the session
it took over, and the receiver's offer is for that one."""
from __future__ import annotations

import logging
import shutil

from smsrepl.transport.receiver import Receiver
from smsrepl.transport.sender import Sender
from smsrepl.transport.tls import client_context, server_context


def _image(path, size=8 << 20, seed=1) -> None:
    with open(path, "wb") as fh:
        for i in range(size // 65536):
            fh.write(bytes([(i * seed) % 251 + 1]) * 65536)


def test_an_adopted_session_runs_over_its_extra_connections(tmp_path, bundle, caplog):
    src = tmp_path / "src.img"
    _image(src)
    rx = Receiver({"disk0": str(tmp_path / "t.img")}, server_context(bundle), str(tmp_path / "rx"), create=True)
    addr = rx.start()
    try:
        Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0).run()
        shutil.rmtree(tmp_path / "tx")  # this sender's state lost: the next one adopts the receiver's session
        with open(src, "r+b") as fh:
            fh.write(b"\xee" * 65536)
        sender = Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0, streams=3)
        joined: list[int] = []
        real = sender._join_all
        sender._join_all = lambda stripes, *a: (real(stripes, *a), joined.append(stripes.streams))
        with caplog.at_level(logging.WARNING, logger="smsrepl.sender"):
            result = sender.run()
        assert result.kind == "sync" and "taken over" in (result.reconcile or "")
        assert (tmp_path / "t.img").read_bytes() == src.read_bytes()
        assert not [r for r in caplog.records if "not joined" in r.getMessage()]
        assert joined == [3]
    finally:
        rx.stop()
