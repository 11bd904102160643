"""Parallel streams end to end in one process (a Receiver and a sender on loopback): how a
session over several connections fails, and what the next session of the same sender does."""
from __future__ import annotations

import threading

import pytest

from smsrepl.errors import RefusedError, ReplicationError
from smsrepl.transport import sender_base
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.session import Session
from smsrepl.transport.tls import client_context, server_context


def _tree(root, files: int = 20) -> None:
    root.mkdir(exist_ok=True)
    for i in range(files):
        (root / f"f{i}").write_bytes(bytes([i]) * (10_000 + i))


def test_a_session_cut_before_the_streams_answer_leaves_nothing_for_the_next_one(tmp_path, bundle, monkeypatch):
    # the first session asks for 3 connections and ends before the receiver's answer; the next
    # one of the same sender runs over one ("auto" found a shorter round trip): it must not wait
    # for an answer to a question it did not ask
    from smsrepl.transport.file_sender import FileSender

    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src)
    counts = iter([3, 1])
    monkeypatch.setattr(sender_base, "initial_streams", lambda want, chan: next(counts))
    real = Session.grant_streams
    refused = []

    def refuse_once(self, ev):
        if not refused:
            refused.append(ev)
            raise RefusedError("not now")
        real(self, ev)

    monkeypatch.setattr(Session, "grant_streams", refuse_once)
    rx = Receiver({"tree": str(dst)}, server_context(bundle), str(tmp_path / "rx"), create=True)
    addr = rx.start()
    try:
        sender = FileSender(str(src), "tree", addr, client_context(bundle), level=0, streams="auto")
        with pytest.raises(ReplicationError, match="not now"):
            sender.run()
        assert sender._joining is None  # nor the connections and copy buffers of the one that ended
        outcome: list = []
        second = threading.Thread(target=lambda: outcome.append(sender.run()), daemon=True)
        second.start()
        second.join(30)
        if second.is_alive():
            sender.stop()
            second.join(10)
        assert outcome, "the second session waited for an answer to a STREAMS it never sent"
    finally:
        rx.stop()
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in src.iterdir())
