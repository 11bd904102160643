"""A sender that fails because the receiver gave up reports the receiver's reason, not the broken
pipe that followed: its reader, on the ERROR frame, shuts the socket, so a send still under way on
another thread fails with EPIPE (a full-disk run once exited with SMS.0807 "Broken pipe")."""
import os
import time

import pytest

from smsrepl import faults
from smsrepl.blocks.replica import Replica
from smsrepl.errors import ReplicationError
from smsrepl.protocol import frames as F
from smsrepl.transport import channel as channel_module
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.sender import Sender
from smsrepl.transport.tls import client_context, server_context


def test_the_receivers_error_wins_over_the_broken_pipe_it_causes(tmp_path, bundle, monkeypatch):
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(24 << 20))
    faults.configure("enospc@target.write:0")  # the receiver's disk is full (same process)
    rx = Receiver({"disk0": str(tmp_path / "dst.img")}, server_context(bundle), str(tmp_path / "rx"), create=True)
    addr = rx.start()
    sender = Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0)
    real_send = channel_module.Channel.send

    def send(chan, ev):
        if isinstance(ev, F.RoundEnd):  # the round's data is out: its END goes once the ERROR is in
            deadline = time.monotonic() + 30
            while sender.replies.failure is None and time.monotonic() < deadline:
                time.sleep(0.01)
        return real_send(chan, ev)

    monkeypatch.setattr(channel_module.Channel, "send", send)
    real_apply = Replica.apply_data

    def late_apply(replica, *args, **kw):  # a busy receiver: the sender is done streaming first
        time.sleep(0.5)
        return real_apply(replica, *args, **kw)

    monkeypatch.setattr(Replica, "apply_data", late_apply)
    try:
        with pytest.raises(ReplicationError) as got:
            sender.run()
    finally:
        rx.stop()
        faults.configure("")
    assert got.value.code == "SMS.2007" and "No space left on device" in str(got.value), got.value
    assert got.value.exit_code == 3 and got.value.resumable
