"""Events check their own fields when made (events.py), and a frame that cannot be encoded
leaves the connection in ERROR rather than in the state the frame would have led to."""
import numpy as np
import pytest

from smsrepl.errors import FrameError, LocalProtocolError, RemoteProtocolError
from smsrepl.protocol import NEED_DATA, RECEIVER, SENDER, Connection, State
from smsrepl.protocol import frames as F
from smsrepl.protocol import writers as W

from protocol.test_connection import block, hello, pair_in_round, transfer, welcome


def test_a_frame_that_cannot_be_encoded_leaves_the_connection_in_error():
    s, r = pair_in_round()
    sent = s.bytes_sent
    # a compressed payload larger than any frame: the event is well formed, its frame is not
    too_big = F.BlockData(0, 4096, 1, np.ones(1, dtype="<u8"), bytes(F.MAX_BODY))
    with pytest.raises(LocalProtocolError, match="cannot encode BlockData: .*exceeds the maximum"):
        s.send(too_big)
    assert s.state is State.ERROR and s.bytes_sent == sent
    with pytest.raises(LocalProtocolError, match="in state error"):
        s.send(F.Scanned(4096))
    # the peer may still be told why
    got = transfer(s, r, F.Error("SMS.1908", "frame too large", 3, True))
    assert got.code == "SMS.1908" and r.state is State.ERROR


def test_an_event_the_table_refuses_changes_nothing():
    s, _ = pair_in_round()
    with pytest.raises(LocalProtocolError, match="cannot send Hello in state round"):
        s.send(hello())
    assert s.state is State.ROUND


def _digests(n):
    return np.arange(1, n + 1, dtype="<u8")


BAD_EVENTS = [
    (lambda: F.BlockData(0, 8192, 0, _digests(1), b""), "BLOCK_DATA of 8192 bytes needs 2 digests, got 1"),
    (lambda: F.BlockData(100, 4096, 0, _digests(1), b""), r"BlockData.offset 100 is not 4 KiB aligned"),
    (lambda: F.BlockData(0, 0, 0, _digests(0), b""), r"BlockData.raw_len 0 outside 1\.\."),
    (lambda: F.BlockData(0, F.MAX_RAW + 1, 0, _digests(2049), b""), r"BlockData.raw_len \d+ outside 1\.\."),
    (lambda: F.BlockData(0, 4096, 256, _digests(1), b""), r"BlockData.codec 256 outside 0\.\.255"),
    (lambda: F.BlockData(0, 4096, 0, _digests(1), "text"), "BlockData.payload must be bytes-like, not str"),
    (lambda: F.BlockData(0, 4096, 0, None, b""), "needs digests"),
    (lambda: F.BlockSet(0, np.array([0, 1]), 0, _digests(1), b""), "as many digests, got 2 and 1"),
    (lambda: F.BlockSet(0, np.array([0, 2, 2]), 0, _digests(3), b""), "strictly increase"),
    (lambda: F.BlockSet(0, np.arange(F.MAX_SET + 1), 0, _digests(F.MAX_SET + 1), b""), "1..1024 indices"),
    (lambda: F.ZeroRange(-1, 4096), r"ZeroRange.offset -1 outside 0\.\."),
    (lambda: F.Scanned(1.5), "Scanned.offset must be an integer, not float"),
    (lambda: F.Ping(1, 2, F.MAX_BODY), r"Ping.padding \d+ outside"),
    (lambda: F.Pong(-1, 2), r"Pong.nonce -1 outside"),
    (lambda: F.ManifestData("coarse", 0, np.zeros(4, "<u8")), r"ManifestData.entries must be a \(count, 2\) array"),
    (lambda: F.ManifestData("middle", 0, np.zeros(4, "<u8")), "ManifestData.level 'middle' is not one of coarse, fine"),
    (lambda: F.RoundBegin(1, "half", 0), "RoundBegin.kind 'half' is not one of full, sync"),
    (lambda: F.RoundBegin(True, "full", 0), "RoundBegin.round_id must be an integer"),
    (lambda: F.ManifestRequest("fine", -1, 1), "ManifestRequest.first must be an integer in 0.."),
    (lambda: F.Welcome(2, "s", 0, "odd", 0, "full", 0, "", []), "Welcome.state 'odd' is not one of new, partial"),
    (lambda: F.Hello(["2"], "block", "t", "s", 0, 4096, []), "Hello.versions must be a list of integers in 0.."),
    (lambda: F.Hello([2], "block", "t", "s", 0, 4096, [1]), "Hello.capabilities must be a list of strings, not"),
    (lambda: F.Error("SMS.1", "m", 3, 1), "Error.resumable must be a bool"),
    (lambda: F.Checkpoint(1, np.int64(4096), 0), "Checkpoint.offset must be an integer"),
    (lambda: F.Status({"name": "t"}, []), "Status.targets must be a list of objects, not"),
    (lambda: F.TreeData(1, 0, 1, b"x"), "TreeData.last must be a bool, not int"),
    (lambda: F.FileOps(0, 0, b""), r"FileOps.raw_len 0 outside 1\.\."),
    (lambda: F.SigRequest(4096, "a/b"), "SigRequest.path must be non-empty bytes"),
    (lambda: F.SigRequest(4096, b""), "SigRequest.path must be non-empty bytes"),
    (lambda: F.TreeSubset(((b"a/../b", True),)), "TREE_SUBSET path b'a/../b' is not a plain relative path"),
    (lambda: F.TreeSubset(((b"a", 1),)), r"TreeSubset.dirs entry \(b'a', 1\) is not"),
    (lambda: F.TreeSubset([(b"a", True)]), "TreeSubset.dirs must be a tuple, not list"),
    (lambda: F.SigData(True, 4096, 0, 0, np.zeros(2, "<u4"), np.zeros(1, "<u8")), "as many weak as strong"),
]


@pytest.mark.parametrize("make, message", BAD_EVENTS, ids=[m[:40] for _, m in BAD_EVENTS])
def test_an_event_with_a_bad_field_is_refused_when_made(make, message):
    with pytest.raises(FrameError, match=message):
        make()


def test_binary_events_take_numpy_integers():
    ev = F.ZeroRange(np.int64(8192), np.uint64(4096))
    assert F.decode(ev.TYPE, b"".join(bytes(p) for p in F.encode(ev))[F.HEADER_SIZE:],
                    *_check_and_head(ev)) == F.ZeroRange(8192, 4096)


def _check_and_head(ev):
    wire = b"".join(bytes(p) for p in F.encode(ev))
    return F.HEADER.unpack_from(wire)[4], wire[:8]


def test_a_peer_frame_with_a_bad_field_is_a_remote_protocol_error():
    s, r = Connection(SENDER), Connection(RECEIVER)
    transfer(s, r, hello())
    transfer(r, s, welcome())
    r.receive_data(W.frame(F.RoundBegin.TYPE, b'{"round_id":1,"kind":"half","start":0}'))
    with pytest.raises(RemoteProtocolError, match="RoundBegin.kind 'half' is not one of full, sync"):
        r.next_event()
    assert r.state is State.ERROR


def test_a_large_control_frame_read_in_place_decodes():
    """A JSON body of 64 KiB or more is assembled in its own buffer (a memoryview)."""
    s, r = Connection(SENDER), Connection(RECEIVER)
    transfer(s, r, hello(kind="status"))
    transfer(r, s, welcome())
    targets = [{"name": f"t{i}", "path": f"/srv/{'x' * 100}/{i}", "kind": "block", "size": i, "busy": False,
                "last_round": None} for i in range(600)]
    wire = b"".join(bytes(p) for p in r.send(F.Status(targets, [])))
    assert len(wire) > 64 << 10
    s.receive_data(wire[:F.HEADER_SIZE + 10])
    assert s.next_event() is NEED_DATA and s.receive_buffer() is not None
    s.receive_data(wire[F.HEADER_SIZE + 10:])
    got = s.next_event()
    assert isinstance(got, F.Status) and got.targets == targets


def test_every_event_class_has_a_reader_and_a_writer():
    from smsrepl.protocol.readers import READERS
    from smsrepl.protocol.writers import WRITERS

    assert set(READERS) == set(F.TYPES) and set(WRITERS) == set(F.TYPES.values())
    assert block().raw_len == 8192
