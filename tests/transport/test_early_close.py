"""A block session's CLOSE goes right after its ROUND_END to a receiver that listed
"early-close" (one round trip less at the end of every session), and only after ROUND_DONE
to one that did not."""
from __future__ import annotations

import pytest

from smsrepl.protocol import frames as F
from smsrepl.protocol.connection import SENDER, TRANSITIONS, State
from smsrepl.transport import block_session
from smsrepl.transport.sender import Sender
from smsrepl.transport.tls import client_context


def _copy(tmp_path, bundle, source_image, receiver, streams: int) -> None:
    src = source_image(6 << 20)
    addr = receiver()
    result = Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0,
                    streams=streams).run()
    assert result.kind == "full"
    assert (tmp_path / "t.img").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("streams", [1, 3])
def test_the_close_goes_with_the_round_end(tmp_path, bundle, source_image, receiver, own_connection_frames, streams):
    seen = own_connection_frames
    _copy(tmp_path, bundle, source_image, receiver, streams)
    assert seen.index("send Close") == seen.index("send RoundEnd") + (2 if streams > 1 else 1)  # (its SEQ)
    assert seen.index("send Close") < seen.index("recv RoundDone") < seen.index("recv Close")


def test_a_receiver_without_early_close_gets_the_close_after_round_done(tmp_path, bundle, monkeypatch, source_image,
                                                                        receiver, own_connection_frames):
    # a receiver of the version before: neither listed nor accepted
    monkeypatch.setattr(block_session, "CAPABILITIES", tuple(c for c in F.CAPABILITIES if c != F.EARLY_CLOSE))
    monkeypatch.delitem(TRANSITIONS, (State.ROUND_ENDING, SENDER, F.Close))
    seen = own_connection_frames
    _copy(tmp_path, bundle, source_image, receiver, 1)
    assert seen.index("recv RoundDone") < seen.index("send Close") < seen.index("recv Close")
