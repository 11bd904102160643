"""A stop that comes while the session connects (stop() has no connection to break yet) ends
it before its round: it is not lost, with the round then running to its end."""
from __future__ import annotations

import pytest

from smsrepl.errors import TransportError
from smsrepl.transport import sender_base
from smsrepl.transport.sender import Sender
from smsrepl.transport.tls import client_context


@pytest.mark.parametrize("streams", [1, 3])
def test_a_stop_while_connecting_ends_the_session_before_its_round(tmp_path, bundle, monkeypatch, streams,
                                                                   source_image, receiver):
    src = source_image()
    addr = receiver()
    sender = Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0,
                    streams=streams)
    real = sender_base.connect

    def connecting(*a, **kw):
        sock = real(*a, **kw)
        sender.stop()  # (another thread's: a pause, a continuous sync's abort)
        return sock

    monkeypatch.setattr(sender_base, "connect", connecting)
    with pytest.raises(TransportError, match="stopped"):
        sender.run()
    assert sender.replies.round_done is None
    assert not (tmp_path / "t.img").exists() or (tmp_path / "t.img").read_bytes() != src.read_bytes()


def test_a_stop_while_a_file_session_connects_ends_it_before_its_round(tmp_path, bundle, monkeypatch, receiver):
    from smsrepl.transport.file_sender import FileSender

    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(20):
        (tree / f"f{i}").write_bytes(bytes([i]) * 5000)
    addr = receiver({"files0": str(tmp_path / "t")})
    sender = FileSender(str(tree), "files0", addr, client_context(bundle), streams=3)
    real = sender_base.connect

    def connecting(*a, **kw):
        sock = real(*a, **kw)
        sender.stop()
        return sock

    monkeypatch.setattr(sender_base, "connect", connecting)
    with pytest.raises(TransportError, match="stopped"):
        sender.run()
    assert not (tmp_path / "t" / "f0").exists()
