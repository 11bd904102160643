"""A sender without state of its own that takes the receiver's session over (adopt-session)
runs its sync round over the connections it asked for: its extra connections name the session
it took over, and the receiver's offer is for that one."""
from __future__ import annotations

import logging
import shutil

from smsrepl.transport.sender import Sender
from smsrepl.transport.tls import client_context


def test_an_adopted_session_runs_over_its_extra_connections(tmp_path, bundle, caplog, source_image, receiver):
    src = source_image(8 << 20)
    addr = receiver()
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
