"""Golden frames: fixed events whose wire bytes are pinned, so the wire format cannot drift silently.

A deliberate format change updates these digests together with the layout in
frames.py (and PROTOCOL_VERSION once a release has shipped). Version 2 changed every
frame's check from XXH32 to XXH3-64's low 32 bits.

Every frame kind of frames.py has at least one vector (test_every_frame_kind_has_a_golden_vector),
and decoding the pinned bytes gives the event back. The first two data frames come from numpy's
seeded generator; every later vector uses fixed bytes only (BlockData.fixed and BlockSet.fixed
pin the same layouts should numpy's stream ever change).
"""
import dataclasses

import numpy as np
import pytest
import xxhash
import zstandard

from smsrepl import kernels
from smsrepl.files import wire as W
from smsrepl.files.scan import Entry
from smsrepl.protocol import frames as F


def _events():
    rng = np.random.default_rng(2024)
    data = bytearray(rng.integers(0, 256, 5 * 4096 - 100, dtype=np.uint8).tobytes())
    data[4096:8192] = bytes(4096)
    d = np.empty(5, dtype="<u8")
    kernels.block_digests(bytes(data), 4096, d)
    payload = bytes(data[:4096] + data[8192:])
    return {
        "BlockData": F.BlockData(1 << 20, len(data), 0, d, payload),
        "BlockSet": F.BlockSet(2 << 20, np.array([0, 3, 7]), 0, d[[0, 2, 3]], bytes(data[:4096]) + bytes(data[8192:16384])),
        "ZeroRange": F.ZeroRange(3 << 20, 65536),
        "Scanned": F.Scanned(4 << 20),
        "RoundBegin": F.RoundBegin(2, "sync", 0),
        "Ping": F.Ping(7, 123456789, 32),
        "Seq": F.Seq(1234567),
        "Streams": F.Streams(4, ""),
        "Streams.granted": F.Streams(3, "00112233445566778899aabbccddeeff"),
        **_fixed_events(),
    }


MTIME = 1_700_000_000_123_456_789
SESSION = "0123456789abcdef0123456789abcdef"
_DIR = Entry(b"srv", "dir", 0o755, 0, 0, 0, MTIME, 0, 0, 2, 0, None, {})
_CONF = Entry(b"srv/a.conf", "file", 0o640, 0, 33, 24, MTIME, 0, 0, 1, 0, None, {b"user.k": b"v"})
_LINK = Entry(b"srv/current", "symlink", 0o777, 0, 0, 7, MTIME, 0, 0, 1, 0, b"a.conf\xff", {})
#: FILE_OPS of a small round: a directory, a whole small file, a deletion
_OPS = ((W.DIR, _DIR), (W.FILE, _CONF, b"key = value\nother = 42\n\n"), (W.DELETE, None, b"", b"srv/old"))
#: those operations as zstd level 2 made them (a literal: a zstd upgrade must not move the vector)
_OPS_ZSTD = bytes.fromhex(
    "28b52ffd20a4a5030014060202000001ed0017979cfe3d85cd1500020003007372760301000001a00021001801000a0f"
    "007372762f612e636f6e6600010006757365722e6b00000001766b6579203d2076616c75650a6f74686572203d2034320a"
    "0a0b00077372762f6f6c6407004098acd205038381c020603b1d3002")


def _ops_raw() -> bytes:
    return b"".join(bytes(b) for op in _OPS for b in W.encode_op(*op))


def _fixed_events():
    records = W.encode_entry(_DIR) + W.encode_entry(_CONF, bytes(range(16))) + W.encode_entry(_LINK)
    ops = _ops_raw()
    caps = ["zstd", "block-set", "frame-8m", "files", "tree-stream", "tree-subset", "adopt-session", "status"]
    last_round = {"round_id": 4, "kind": "sync", "time": "2026-12-06T16:00:00Z", "complete": True,
                  "verified": True, "checkpoint": 10737418240, "source_size": 10737418240}
    blocks = bytes(range(256)) * 16 + bytes(4096) + b"short last block " * 60
    digests = np.empty(3, dtype="<u8")
    kernels.block_digests(blocks, 4096, digests)
    scattered = b"".join(bytes([i]) * 4096 for i in (1, 2, 3))
    set_digests = np.empty(3, dtype="<u8")
    kernels.block_digests(scattered, 4096, set_digests)
    return {
        # data frames of fixed bytes: a zero block (not carried) and a short last block; scattered blocks
        "BlockData.fixed": F.BlockData(1 << 30, len(blocks), 0, digests, blocks[:4096] + blocks[8192:]),
        "BlockSet.fixed": F.BlockSet(8 << 20, np.array([0, 1, 5]), 0, set_digests, scattered),
        # JSON frames: every kind of HELLO a sender sends (block, files, netcheck, status, verify)
        "Hello": F.Hello([2], "block", "vm-disk_0", SESSION, 10737418240, 4096, caps),
        "Hello.files": F.Hello([1, 2], "files", "www", SESSION, 0, 4096, ["files", "tree-stream", "dry-run"]),
        "Hello.netcheck": F.Hello([2], "netcheck", "", SESSION, 0, 4096, caps),
        "Hello.status": F.Hello([2], "status", "", SESSION, 0, 4096, caps),
        "Hello.verify": F.Hello([2], "verify", "vm-disk_0", SESSION, 10737418240, 4096, []),
        "Welcome": F.Welcome(2, SESSION, 10737418240, "partial", 4, "sync", 3 << 30, "ab" * 16,
                             ["zstd", "adopt-session"]),
        "Welcome.new": F.Welcome(2, "", 0, "new", 0, "", 0, "", []),
        "Error": F.Error("SMS.3301", 'target "vm-disk_0" is busy: caf\u00e9 \\ tab\t', 4, False),
        "Error.resumable": F.Error("", "disk full", 3, True),
        "Close": F.Close("netcheck done"),
        "Status": F.Status(
            [{"name": "vm-disk_0", "path": "/dev/vg0/vm", "kind": "block", "size": 10737418240, "busy": True,
              "last_round": last_round},
             {"name": "www", "path": "/srv/www", "kind": "missing", "size": None, "busy": False, "last_round": None}],
            [{"target": "vm-disk_0", "peer": "192.0.2.10:40022", "kind": "block", "started": "2026-12-06T15:59:58Z",
              "bytes_received": 123456789, "rounds": 4}]),
        "Status.empty": F.Status([], []),
        "RoundBegin.full": F.RoundBegin(1, "full", 1 << 40),
        "Checkpoint": F.Checkpoint(4, 3 << 30, 987654321),
        "RoundEnd": F.RoundEnd(4),
        "RoundDone": F.RoundDone(4, "0f" * 16),
        "ManifestRequest": F.ManifestRequest("fine", 256, 1024),
        "ManifestRequest.coarse": F.ManifestRequest("coarse", 0, 1),
        "TreeRequest": F.TreeRequest(True),
        "TreeRequest.no-checksum": F.TreeRequest(False),
        # binary frames
        "Pong": F.Pong(7, 123456789),
        "ZeroRange.max": F.ZeroRange((1 << 64) - 4096, 4096),
        "ManifestData.coarse": F.ManifestData(
            "coarse", 3,
            np.array([[1, 2], [0, (1 << 64) - 1], [0x0123456789ABCDEF, 0xFEDCBA9876543210]], dtype="<u8")),
        "ManifestData.fine": F.ManifestData("fine", 1 << 20,
                                            np.array([0, 1, (1 << 64) - 1, 0x8000000000000000], "<u8")),
        "ManifestData.empty": F.ManifestData("fine", 5, np.zeros(0, dtype="<u8")),
        # file frames: TREE_DATA with each flag alone, FILE_OPS raw and zstd
        "TreeData": F.TreeData(False, 0, len(records), records),
        "TreeData.last": F.TreeData(True, 0, len(records), records),
        "TreeData.ordered": F.TreeData(False, 0, len(records), records, True),
        "TreeData.last-ordered": F.TreeData(True, 0, len(records), records, True),
        "FileOps": F.FileOps(0, len(ops), ops),
        "FileOps.zstd": F.FileOps(1, len(ops), _OPS_ZSTD),
        "TreeSubset": F.TreeSubset(((b"", False), (b"srv/www", True), (b"odd \xff\nname", False))),
        "TreeSubset.empty": F.TreeSubset(()),
        "SigRequest": F.SigRequest(65536, b"srv/big \xff.img"),
        "SigData": F.SigData(False, 4096, 3 * 4096 - 5, 0, np.array([1, 0xFFFFFFFF, 0x12345678], dtype="<u4"),
                             np.array([0, (1 << 64) - 1, 0x0123456789ABCDEF], dtype="<u8")),
        "SigData.empty": F.SigData(True, 131072, 0, 3, np.zeros(0, "<u4"), np.zeros(0, "<u8")),
    }


GOLDEN = {
    "BlockData": (16329, "e0f4ef4601ab60ef"),
    "BlockSet": (12352, "cb4716ccbf74f403"),
    "ZeroRange": (28, "036c88f5a8c8b3e5"),
    "Scanned": (20, "ecf80b8a6608bc1a"),
    "Seq": (20, "ad0f66297cbf0b3a"),
    "Streams": (32, "4e8fb73a6f77c6b6"),
    "Streams.granted": (64, "0359b45f304f6751"),
    "RoundBegin": (50, "d21ea536da39f451"),
    "Ping": (60, "ae084049fe645e67"),
    "BlockData.fixed": (5161, "08d96d0d99818d68"),
    "BlockSet.fixed": (12352, "a120c1c8d4304a0a"),
    "Hello": (264, "20b827938046c18e"),
    "Hello.files": (191, "a7e749860f9b032b"),
    "Hello.netcheck": (248, "1f2a793f786e123f"),
    "Hello.status": (246, "9599eb9ded7604be"),
    "Hello.verify": (175, "d2d0b51db922c32e"),
    "Welcome": (265, "74a7e616e339edca"),
    "Welcome.new": (152, "1479693f1ca4af75"),
    "Error": (124, "24b6dd6db90a7b7b"),
    "Error.resumable": (76, "1da0c268d8362920"),
    "Close": (38, "0adc7115bed47614"),
    "Status": (509, "99dac385c9330838"),
    "Status.empty": (40, "3df5bff951407928"),
    "RoundBegin.full": (62, "d573dde2ae10ed13"),
    "Checkpoint": (72, "05d84a98dd433166"),
    "RoundEnd": (26, "754963093dbf5a2e"),
    "RoundDone": (77, "a80cceed123cec5a"),
    "ManifestRequest": (53, "911c018c13f4940d"),
    "ManifestRequest.coarse": (50, "c646f2ccd4ba2153"),
    "TreeRequest": (29, "0eb39256313383d5"),
    "TreeRequest.no-checksum": (30, "e631b7305055f583"),
    "Pong": (28, "e59267800127eaeb"),
    "ZeroRange.max": (28, "9ed8bc255b090fc2"),
    "ManifestData.coarse": (84, "e2263c6b2d8f98ff"),
    "ManifestData.fine": (68, "58541e42577776f1"),
    "ManifestData.empty": (36, "ee35051bbd67a8c8"),
    "TreeData": (230, "f4014d60997ca1ec"),
    "TreeData.last": (230, "8790bf45c284b1a2"),
    "TreeData.ordered": (230, "6c387e0f5ba8eea0"),
    "TreeData.last-ordered": (230, "c4156b4c279ad039"),
    "FileOps": (182, "b65889db3fe77dd8"),
    "FileOps.zstd": (143, "89ccd9e2ce670239"),
    "TreeSubset": (43, "a4d2bdba915d1a1b"),
    "TreeSubset.empty": (17, "96df20543ed70c41"),
    "SigRequest": (29, "671b0cca09070216"),
    "SigData": (69, "8d3cc9fb89733c3c"),
    "SigData.empty": (33, "5b388f5d83a6fa95"),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_frame_bytes_are_pinned(name):
    wire = b"".join(bytes(p) for p in F.encode(_events()[name]))
    assert (len(wire), xxhash.xxh3_64_hexdigest(wire)) == GOLDEN[name]


def _frame_kinds() -> set[type]:
    """Every event class frames.py defines (an Event subclass with a TYPE)."""
    return {c for c in vars(F).values()
            if isinstance(c, type) and issubclass(c, F.Event) and c is not F.Event and hasattr(c, "TYPE")}


def test_every_frame_kind_has_a_golden_vector():
    kinds = _frame_kinds()
    assert kinds == set(F.TYPES.values())  # each one can be decoded, too
    missing = sorted(c.__name__ for c in kinds - {type(e) for e in _events().values()})
    assert not missing, f"frame kinds without a golden vector: {missing}"
    assert set(GOLDEN) == set(_events())


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return value


def _fields(event) -> dict:
    return {f.name: _plain(getattr(event, f.name)) for f in dataclasses.fields(event)}


def _decoded_form(event) -> dict:
    """What decoding ``event``'s frame gives: a BLOCK_DATA frame carries the zero map and the
    frame digest, not the blocks' digests."""
    if isinstance(event, F.BlockData):
        event = dataclasses.replace(event, digests=None, zeros=np.asarray(event.digests) == 0,
                                    check=F.frame_digest(event.digests))
    return _fields(event)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_pinned_bytes_decode_to_the_event(name):
    event = _events()[name]
    wire = b"".join(bytes(p) for p in F.encode(event))
    length, ftype, flags, reserved, check = F.HEADER.unpack_from(wire)
    assert (length, ftype, flags, reserved) == (len(wire) - F.HEADER_SIZE, type(event).TYPE, 0, 0)
    got = F.decode(ftype, wire[F.HEADER_SIZE:], check, wire[:8])
    assert type(got) is type(event)
    assert _fields(got) == _decoded_form(event)


def test_file_frames_carry_the_records_of_wire():
    ops = _events()["FileOps.zstd"]
    assert zstandard.ZstdDecompressor().decompress(ops.payload) == _ops_raw()
    assert [op for op, _, _ in W.decode_ops(_ops_raw())] == [W.DIR, W.FILE, W.DELETE]
    r = W.Reader(_events()["TreeData"].payload)
    assert [r.entry()[0].path for _ in range(3)] == [b"srv", b"srv/a.conf", b"srv/current"] and r.done()


#: frames spelled out field by field: the layout of frames.py's docstring, independent of its code
SPELLED = {
    "TreeSubset": bytes.fromhex(
        "0000001f"  # body length 31
        "35" "00" "0000"  # type TREE_SUBSET, flags, reserved
        "0cf7790d"  # check: low 32 bits of XXH3-64 of header bytes 0-7 and the body
        "00" "00000003"  # flags, 3 directories
        "00" "0000"  # not recursive, b"" (the root)
        "01" "0007" "7372762f777777"  # recursive, b"srv/www"
        "00" "000a" "6f646420ff0a6e616d65"),  # not recursive, b"odd \xff\nname"
    "RoundEnd": bytes.fromhex("0000000e" "15" "00" "0000" "a7f1fe1b") + b'{"round_id":4}',
    "Scanned": bytes.fromhex("00000008" "13" "00" "0000" "ccfc5f01" "0000000000400000"),
    "Seq": bytes.fromhex("00000008" "51" "00" "0000" "89836f2d" "000000000012d687"),
}


@pytest.mark.parametrize("name", sorted(SPELLED))
def test_a_frame_spelled_out_field_by_field(name):
    assert b"".join(bytes(p) for p in F.encode(_events()[name])) == SPELLED[name]
