import ast
import pathlib

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings, strategies as st

from smsrepl import kernels
from smsrepl.codec import Compressor, Decompressor
from smsrepl.errors import DecompressionError, LocalProtocolError, RemoteProtocolError
from smsrepl.protocol import (
    NEED_DATA,
    RECEIVER,
    SENDER,
    BlockData,
    BlockSet,
    Checkpoint,
    Close,
    Connection,
    ConnectionClosed,
    Error,
    Hello,
    ManifestData,
    ManifestRequest,
    Ping,
    Pong,
    RoundBegin,
    RoundDone,
    RoundEnd,
    Scanned,
    State,
    Welcome,
    ZeroRange,
)
from smsrepl.protocol import frames as F
from smsrepl.protocol import layout as L
from smsrepl.protocol import writers as W


def hello(**kw):
    base = dict(versions=[1], kind="block", target="disk0", session_id="abc", source_size=1 << 20,
                block_size=4096, capabilities=["zstd"])
    base.update(kw)
    return Hello(**base)


def welcome():
    return Welcome(1, "abc", 1 << 20, "new", 0, "full", 0, "", ["zstd"])


def block(offset=0, data=None):
    data = data if data is not None else bytes(range(256)) * 32
    d = np.empty(-(-len(data) // 4096), dtype="<u8")
    kernels.block_digests(data, 4096, d)
    return BlockData(offset, len(data), 0, d, data)


def block_set(offset=0, index=(0, 3, 4), data=None):
    index = np.array(index, dtype=np.int64)
    data = data if data is not None else bytes(range(256)) * 16 * len(index)
    d = np.empty(len(index), dtype="<u8")
    kernels.block_digests(data, 4096, d)
    return BlockSet(offset, index, 0, d, data)


def transfer(src: Connection, dst: Connection, event):
    dst.receive_data(b"".join(bytes(p) for p in src.send(event)))
    got = dst.next_event()
    assert dst.next_event() is NEED_DATA
    return got


def pair_in_round():
    s, r = Connection(SENDER), Connection(RECEIVER)
    transfer(s, r, hello())
    transfer(r, s, welcome())
    transfer(s, r, RoundBegin(1, "full", 0))
    return s, r


def test_full_conversation_round_trips_every_event():
    s, r = Connection(SENDER), Connection(RECEIVER)
    assert transfer(s, r, hello()) == hello()
    assert transfer(r, s, welcome()) == welcome()
    assert transfer(s, r, ManifestRequest("coarse", 0, 2)) == ManifestRequest("coarse", 0, 2)
    coarse = np.arange(4, dtype="<u8").reshape(2, 2)
    got = transfer(r, s, ManifestData("coarse", 0, coarse))
    assert got.level == "coarse" and np.array_equal(got.entries, coarse)
    assert transfer(s, r, Ping(7, 123, 100)) == Ping(7, 123, 100)
    assert transfer(r, s, Pong(7, 123, 100)) == Pong(7, 123, 100)
    transfer(s, r, RoundBegin(1, "full", 0))
    assert r.state is State.ROUND
    b = block(8192)
    got = transfer(s, r, b)
    assert (got.offset, got.raw_len, got.codec) == (8192, b.raw_len, 0)
    assert got.digests is None and got.check == F.frame_digest(b.digests) and not got.zeros.any()
    assert bytes(got.payload) == b.payload
    bs = block_set(16384, (0, 2, 9))
    got = transfer(s, r, bs)
    assert (got.offset, got.codec) == (16384, 0) and got.index.tolist() == [0, 2, 9]
    assert np.array_equal(got.digests, bs.digests) and bytes(got.payload) == bs.payload
    assert transfer(s, r, ZeroRange(65536 - 4096, 4096)) == ZeroRange(65536 - 4096, 4096)
    assert transfer(s, r, Scanned(65536)) == Scanned(65536)
    assert transfer(r, s, Checkpoint(1, 65536, 4096)) == Checkpoint(1, 65536, 4096)
    transfer(s, r, RoundEnd(1))
    assert transfer(r, s, RoundDone(1, "ff")) == RoundDone(1, "ff")
    assert s.state is State.IDLE and r.state is State.IDLE
    transfer(s, r, Close("done"))
    transfer(r, s, Close("bye"))
    assert s.state is State.CLOSED
    s.receive_data(b"")
    assert s.next_event().clean is True


@pytest.mark.parametrize("close_read_first", [True, False])
def test_an_early_close_after_round_end_ends_the_round_then_the_session(close_read_first):
    """"early-close": CLOSE right after ROUND_END; the receiver's reader may take the CLOSE in
    before or after its loop answers ROUND_DONE, and both orders end cleanly."""
    s, r = pair_in_round()
    transfer(s, r, RoundEnd(1))
    close = b"".join(bytes(p) for p in s.send(Close("done")))
    assert s.state is State.ROUND_CLOSING
    if close_read_first:
        r.receive_data(close)
        assert isinstance(r.next_event(), Close) and r.state is State.ROUND_CLOSING
    assert transfer(r, s, Checkpoint(1, 4096, 4096)) == Checkpoint(1, 4096, 4096)
    assert transfer(r, s, RoundDone(1, "ff")) == RoundDone(1, "ff")
    assert s.state is State.CLOSING
    if not close_read_first:
        r.receive_data(close)
        assert isinstance(r.next_event(), Close)
    assert r.state is State.CLOSING
    transfer(r, s, Close("bye"))
    assert s.state is State.CLOSED and r.state is State.CLOSED


def test_no_close_before_the_round_ends_nor_data_after_an_early_close():
    s, r = pair_in_round()
    with pytest.raises(LocalProtocolError, match="Close in state round"):
        s.send(Close("done"))  # mid-round: the receiver would end a round it never finished
    transfer(s, r, RoundEnd(1))
    transfer(s, r, Close("done"))
    with pytest.raises(LocalProtocolError):
        s.send(RoundBegin(2, "sync", 0))
    with pytest.raises(LocalProtocolError):
        r.send(Close("bye"))  # the receiver answers CLOSE only after the round's ROUND_DONE


def test_events_outside_the_table_are_errors_on_both_sides():
    s, r = Connection(SENDER), Connection(RECEIVER)
    with pytest.raises(LocalProtocolError):
        s.send(RoundBegin(1, "full", 0))  # before the handshake
    with pytest.raises(LocalProtocolError):
        r.send(welcome())  # nothing asked yet
    transfer(s, r, hello())
    # a misbehaving sender that skips ahead: build the bytes with a second connection
    rogue = Connection(SENDER)
    rogue.send(hello())
    rogue.state = State.ROUND
    r.receive_data(b"".join(bytes(p) for p in rogue.send(block())))
    with pytest.raises(RemoteProtocolError, match="BlockData in state handshake"):
        r.next_event()
    assert r.state is State.ERROR


def test_receiver_cannot_send_data_frames():
    s, r = pair_in_round()
    with pytest.raises(LocalProtocolError):
        r.send(block())


def test_error_frame_is_allowed_in_any_live_state():
    s, r = pair_in_round()
    got = transfer(r, s, Error("SMS.2007", "disk full", 3, True))
    assert got.code == "SMS.2007" and s.state is State.ERROR


def test_stream_cut_mid_frame_is_an_unclean_close():
    s, r = pair_in_round()
    wire = b"".join(bytes(p) for p in s.send(block()))
    r.receive_data(wire[:-5])
    assert r.next_event() is NEED_DATA
    r.receive_data(b"")
    ev = r.next_event()
    assert isinstance(ev, ConnectionClosed) and not ev.clean


@pytest.mark.reliability("hostile peer", "frame length that lies (huge declared size)")
def test_oversized_frame_is_refused_before_buffering_it():
    s, r = pair_in_round()
    r.receive_data(F.HEADER.pack(F.MAX_BODY + 1, BlockData.TYPE, 0, 0, 0))
    with pytest.raises(RemoteProtocolError, match="exceeds the maximum"):
        r.next_event()


@pytest.mark.parametrize("body", [b"{}", b"[]", b"not json", b'{"round_id": 1}', b'{"round_id": -1, "kind": "full", "start": 0}',
                                  b'{"round_id": 1, "kind": "full", "start": 0, "extra": 1}',
                                  b'{"round_id": "1", "kind": "full", "start": 0}'])
def test_malformed_control_frames_are_refused(body):
    s, r = Connection(SENDER), Connection(RECEIVER)
    transfer(s, r, hello())
    transfer(r, s, welcome())
    r.receive_data(W.frame(RoundBegin.TYPE, body))
    with pytest.raises(RemoteProtocolError):
        r.next_event()


def _all_frames():
    s, r = pair_in_round()
    frames = [b"".join(bytes(p) for p in s.send(ev))
              for ev in (block(0), block_set(8192, (0, 2)), ZeroRange(24576, 4096), Scanned(28672), RoundEnd(1))]
    return frames


@pytest.mark.reliability("hostile peer", "every flipped bit of a frame header or control body")
def test_every_flipped_bit_outside_a_data_payload_is_detected():
    for wire in _all_frames():
        protected = len(wire)
        if wire[4] == BlockData.TYPE:
            protected = F.HEADER_SIZE + 16 + 16 + 1
        if wire[4] == BlockSet.TYPE:
            protected = F.HEADER_SIZE + 16 + 12 * 2
        for bit in range(protected * 8):
            s, r = pair_in_round()
            bad = bytearray(wire)
            bad[bit // 8] ^= 1 << (bit % 8)
            r.receive_data(bytes(bad))
            r.receive_data(b"")
            try:
                ev = r.next_event()
            except RemoteProtocolError:
                continue
            # a flip in the length field can only shorten or lengthen the frame: never a valid event
            assert isinstance(ev, ConnectionClosed) and not ev.clean, (bit, ev)


@pytest.mark.parametrize("count, index, problem", [
    (0, [], "count 0 outside"),
    (F.MAX_SET + 1, [], "outside 1..1024"),
    (2, [1, 2], "start at 0"),
    (3, [0, 2, 2], "strictly increase"),
    (3, [0, 5, 4], "strictly increase"),
])
def test_malformed_block_sets_are_refused(count, index, problem):
    s, r = pair_in_round()
    prefix = L.SET_PREFIX.pack(0, count, 0) + np.array(index, dtype=">u4").tobytes() + bytes(8 * len(index))
    r.receive_data(W.frame(BlockSet.TYPE, prefix))
    with pytest.raises(RemoteProtocolError, match=problem):
        r.next_event()


def test_block_set_offset_must_be_aligned_and_encoder_checks_its_arrays():
    s, r = pair_in_round()
    prefix = L.SET_PREFIX.pack(100, 1, 0) + np.zeros(1, dtype=">u4").tobytes() + bytes(8)
    r.receive_data(W.frame(BlockSet.TYPE, prefix))
    with pytest.raises(RemoteProtocolError, match="not 4 KiB aligned"):
        r.next_event()
    with pytest.raises(ValueError, match="as many digests"):
        F.encode(BlockSet(0, np.array([0, 1]), 0, np.zeros(1, dtype="<u8"), b""))


@pytest.mark.reliability("hostile peer", "flipped bits in data payloads")
def test_flipped_payload_bits_fail_the_digest_or_the_codec():
    data = (b"smsrepl payload " * 512)
    comp, dec = Compressor(), Decompressor()
    codec, payload = comp.encode(data)
    assert codec == 1
    digests = np.empty(2, dtype="<u8")
    kernels.block_digests(data, 4096, digests)
    rng = np.random.default_rng(3)
    for bit in rng.choice(len(payload) * 8, 64, replace=False):
        bad = bytearray(payload)
        bad[bit // 8] ^= 1 << (bit % 8)
        try:
            raw = dec.decode(codec, bytes(bad), len(data))
        except DecompressionError:
            continue
        got = np.empty(2, dtype="<u8")
        kernels.block_digests(raw, 4096, got)
        assert not np.array_equal(got, digests)


@pytest.mark.reliability("fuzzing", "random bytes into the frame parser (hypothesis)")
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_documented_errors(blob):
    r = Connection(RECEIVER)
    r.receive_data(blob)
    r.receive_data(b"")
    try:
        for _ in range(50):
            ev = r.next_event()
            if ev is NEED_DATA or isinstance(ev, ConnectionClosed):
                break
    except RemoteProtocolError:
        pass


def test_protocol_package_does_no_io():
    forbidden = {"socket", "ssl", "threading", "time", "asyncio", "select", "selectors", "os", "subprocess"}
    pkg = pathlib.Path(__file__).parents[2] / "src" / "smsrepl" / "protocol"
    for path in pkg.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [(node.module or "").split(".")[0]]
            assert not forbidden.intersection(names), f"{path.name} imports {names}"


def test_large_bodies_read_in_place_give_the_same_events():
    rng = np.random.default_rng(9)
    data = rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    s, _ = pair_in_round()
    wire = b"".join(b"".join(bytes(p) for p in s.send(ev)) for ev in (block(0, data), Scanned(1 << 21), block(1 << 21, data)))
    for step in (1000, 70000, 1 << 20):
        _, r = pair_in_round()
        before = r.bytes_received
        events, pos, direct = [], 0, 0
        while pos < len(wire):
            view = r.receive_buffer()
            if view is not None:  # write straight into the frame's own body buffer
                n = min(len(view), step, len(wire) - pos)
                view[:n] = wire[pos:pos + n]
                r.received(n)
                direct += n
            else:
                n = min(step, len(wire) - pos)
                r.receive_data(wire[pos:pos + n])
            pos += n
            events.extend(r.events())
        assert [type(e).__name__ for e in events] == ["BlockData", "Scanned", "BlockData"]
        assert bytes(events[0].payload) == data and bytes(events[2].payload) == data
        assert events[2].offset == 1 << 21 and direct > 0
        assert r.bytes_received - before == len(wire)


def test_stream_cut_inside_a_body_read_in_place_is_an_unclean_close():
    data = bytes(range(256)) * 1024  # 256 KiB
    s, r = pair_in_round()
    wire = b"".join(bytes(p) for p in s.send(block(0, data)))
    r.receive_data(wire[:1000])
    assert r.next_event() is NEED_DATA
    view = r.receive_buffer()
    assert view is not None and len(view) == len(wire) - 1000
    view[:500] = wire[1000:1500]
    r.received(500)
    with pytest.raises(LocalProtocolError):
        r.received(len(view))
    assert r.next_event() is NEED_DATA
    r.receive_data(b"")
    ev = r.next_event()
    assert isinstance(ev, ConnectionClosed) and not ev.clean


def test_block_data_carries_a_zero_map_and_one_digest_for_the_frame():
    data = bytes(range(256)) * 16
    blocks = [data, bytes(4096), data[::-1], bytes(4096), data]
    d = np.empty(5, dtype="<u8")
    kernels.block_digests(b"".join(blocks), 4096, d)
    assert d[1] == 0 and d[3] == 0
    payload = data + data[::-1] + data
    s, r = pair_in_round()
    wire = b"".join(bytes(p) for p in s.send(BlockData(0, 5 * 4096, 0, d, payload)))
    assert len(wire) == F.HEADER_SIZE + 16 + 16 + 1 + len(payload)
    r.receive_data(wire)
    got = r.next_event()
    assert got.zeros.tolist() == [False, True, False, True, False] and got.check == F.frame_digest(d)
    # a zero map with bits past the last block is refused
    bad = bytearray(wire)
    bad[F.HEADER_SIZE + 32] |= 0x80
    s2, r2 = pair_in_round()
    r2.receive_data(W.frame(BlockData.TYPE, bytes(bad[F.HEADER_SIZE:]), 33))
    with pytest.raises(RemoteProtocolError, match="bits past its last block"):
        r2.next_event()


@pytest.mark.parametrize("ftype,body,match", [
    (0x31, b"\x04\x00\x00\x00\x00\x01x", "flags"),  # TREE_DATA with an unknown flag
    (0x32, b"\x01\x00\x00\x00\x00\x01x", "flags"),  # FILE_OPS never has "last"
    (0x32, b"\x00\x00\x00\x00\x00\x00", "raw length"),  # nothing to apply
    (0x32, b"\x00\x00\x01\x00\x00\x01", "raw length"),  # beyond MAX_RAW
    (0x31, b"\x00", "too short"),
    (0x33, b"\x00\x00\x10\x00", "too short"),  # SIG_REQUEST without a path
    (0x34, b"\x00" + (4096).to_bytes(4, "big") + bytes(8) + bytes(4) + (2).to_bytes(4, "big") + bytes(12),
     "length wrong"),  # SIG_DATA that says 2 blocks and carries 1
])
def test_malformed_file_frames_are_protocol_errors(ftype, body, match):
    import struct

    import xxhash

    from smsrepl.errors import RemoteProtocolError
    from smsrepl.protocol import frames as F

    head8 = struct.pack(">IBBH", len(body), ftype, 0, 0)
    h = xxhash.xxh3_64(head8)
    h.update(body)
    with pytest.raises(RemoteProtocolError, match=match):
        conn = Connection(RECEIVER)
        conn.receive_data(F.encode(F.Hello([F.PROTOCOL_VERSION], "files", "t", "s", 0, 4096, []))[0])
        conn.next_event()
        conn.send(F.Welcome(1, "s", 0, "new", 0, "files", 0, "", []))
        if ftype in (0x32, 0x33):
            conn.receive_data(F.encode(F.RoundBegin(1, "full", 0))[0])
            conn.next_event()
        conn.receive_data(head8 + struct.pack(">I", h.intdigest() & 0xFFFFFFFF) + body)
        conn.next_event()
