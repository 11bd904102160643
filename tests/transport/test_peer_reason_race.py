"""The receiver's ERROR is the session's reason even where a send fails on the state it left
(the reader took the ERROR in, "cannot send ... in state error", and has not yet said so)."""
from __future__ import annotations

import time

import pytest

from smsrepl.blocks.replica import Replica
from smsrepl.errors import RemoteError, TargetWriteError
from smsrepl.transport import block_replies
from smsrepl.transport.sender import Sender
from smsrepl.transport.tls import client_context


def test_the_receivers_error_wins_over_a_send_refused_by_the_state_it_left(tmp_path, bundle, monkeypatch,
                                                                           source_image, receiver):
    src = source_image(64 << 20)
    applied = []
    real_apply = Replica.apply_data

    def apply_data(self, *a, **kw):
        applied.append(1)
        if len(applied) == 2:
            raise TargetWriteError("cannot write the target: No space left on device")
        return real_apply(self, *a, **kw)

    monkeypatch.setattr(Replica, "apply_data", apply_data)
    real_raise = block_replies.raise_if_error

    def slow_raise(ev):
        time.sleep(0.5)  # the reader preempted between taking the ERROR in and saying so
        real_raise(ev)

    monkeypatch.setattr(block_replies, "raise_if_error", slow_raise)
    addr = receiver()
    sender = Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0)
    with pytest.raises(RemoteError) as info:
        sender.run()
    assert "No space left on device" in info.value.message
