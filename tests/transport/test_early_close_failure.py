"""A round that fails at its end after the sender's early CLOSE: the sender reports the
receiver's reason, and the receiver lets the target go at once (its reader stopped at CLOSE:
nothing more comes to drain)."""
from __future__ import annotations

import threading
import time

import pytest

from smsrepl.blocks.replica import Replica
from smsrepl.errors import RemoteError, TargetWriteError
from smsrepl.transport.sender import Sender
from smsrepl.transport.tls import client_context


@pytest.mark.parametrize("streams", [1, 3])
def test_a_round_failing_at_its_end_after_an_early_close(tmp_path, bundle, monkeypatch, streams, source_image,
                                                         receiver):
    src = source_image()

    def full(self, round_id):
        raise TargetWriteError("cannot sync the target: No space left on device")

    monkeypatch.setattr(Replica, "finish", full)
    ended = threading.Event()
    outcomes: list = []

    def on_session(outcome) -> None:
        outcomes.append(outcome)
        ended.set()

    addr = receiver(on_session=on_session)
    sender = Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0,
                    streams=streams)
    with pytest.raises(RemoteError) as info:
        sender.run()
    failed = time.monotonic()
    assert "No space left on device" in info.value.message
    assert info.value.code == TargetWriteError.code and info.value.resumable
    # the session ends (its target let go) once the sender hung up, not after DRAIN_STREAMING
    assert ended.wait(5.0)
    assert time.monotonic() - failed < 3.0
    assert outcomes[0].ok is False
