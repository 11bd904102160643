"""Frame bodies to events: one reader per frame type (READERS), each checking the body's
layout; the event checks its own fields (events.py). Anything malformed raises FrameError.

A reader gets the body (bytes, or a view of a large body read in place), the header's check
and its first 8 bytes. Data frames (BLOCK_DATA, BLOCK_SET) check only their prefix: their
payload is covered by the blocks' digests. Every other reader is wrapped by _whole, which
checks the whole body first.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial

from smsrepl._lazy import np
from smsrepl.errors import FrameError
from smsrepl.kernels import FINE_BLOCK
from smsrepl.protocol import layout as L
from smsrepl.protocol.events import (
    CONTROL_EVENTS, BlockData, BlockSet, ControlEvent, Event, FileOps, ManifestData, Ping, Pong, Scanned, Seq, SigData,
    SigRequest, TreeData, TreeSubset, ZeroRange, control_fields)

Body = bytes | bytearray | memoryview
Reader = Callable[[Body, int, bytes], Event]


def decode(ftype: int, body: Body, check: int, head8: bytes) -> Event:
    """Decode one frame body. Raises FrameError on anything malformed."""
    reader = READERS.get(ftype)
    if reader is None:
        raise FrameError(f"unknown frame type 0x{ftype:02x}")
    return reader(body, check, head8)


def _prefix_checked(name: str, body: Body, end: int, check: int, head8: bytes) -> None:
    if L.check(head8, memoryview(body)[:end]) != check:
        raise FrameError(f"frame check mismatch (corrupt {name} header)")


def _data_prefix(name: str, body: Body) -> tuple[int, int, int]:
    """A data frame's offset (4 KiB aligned), length or count, and codec."""
    if len(body) < L.BLOCK_PREFIX.size:
        raise FrameError(f"{name} body shorter than its prefix")
    offset, n, codec = L.BLOCK_PREFIX.unpack_from(body)  # BLOCK_SET's prefix has the same layout
    if body[13:16] != b"\0\0\0":
        raise FrameError(f"{name} padding is not zero")
    if offset % FINE_BLOCK:
        raise FrameError(f"{name} offset {offset} is not 4 KiB aligned")
    return offset, n, codec


def _read_block_data(body: Body, check: int, head8: bytes) -> BlockData:
    P = L.BLOCK_PREFIX
    offset, raw_len, codec = _data_prefix("BLOCK_DATA", body)
    if raw_len == 0 or raw_len > L.MAX_RAW:
        raise FrameError(f"BLOCK_DATA raw length {raw_len} outside 1..{L.MAX_RAW}")
    nblocks = -(-raw_len // FINE_BLOCK)
    end = P.size + 16 + -(-nblocks // 8)
    if len(body) < end:
        raise FrameError("BLOCK_DATA body shorter than its digest and zero map")
    _prefix_checked("BLOCK_DATA", body, end, check, head8)
    bits = np.frombuffer(body, dtype=np.uint8, count=end - P.size - 16, offset=P.size + 16)
    zeros = np.unpackbits(bits, bitorder="little").astype(bool)
    if zeros[nblocks:].any():
        raise FrameError("BLOCK_DATA zero map has bits past its last block")
    digest = bytes(body[P.size:P.size + 16])
    return BlockData(offset, raw_len, codec, None, memoryview(body)[end:], zeros[:nblocks], digest)


def _read_block_set(body: Body, check: int, head8: bytes) -> BlockSet:
    P = L.SET_PREFIX
    offset, count, codec = _data_prefix("BLOCK_SET", body)
    if not 0 < count <= L.MAX_SET:
        raise FrameError(f"BLOCK_SET count {count} outside 1..{L.MAX_SET}")
    end = P.size + 12 * count
    if len(body) < end:
        raise FrameError("BLOCK_SET body shorter than its indices and digests")
    _prefix_checked("BLOCK_SET", body, end, check, head8)
    index = np.frombuffer(body, dtype=">u4", count=count, offset=P.size).astype(np.int64)
    digests = np.frombuffer(body, dtype="<u8", count=count, offset=P.size + 4 * count)
    return BlockSet(offset, index, codec, digests, memoryview(body)[end:])


def _whole(read: Callable[[Body], Event], name: str) -> Reader:
    """``read`` behind a check of the whole body."""
    def reader(body: Body, check: int, head8: bytes) -> Event:
        if L.check(head8, body) != check:
            raise FrameError(f"frame check mismatch (corrupt {name} frame)")
        return read(body)
    return reader


def read_json(cls: type[ControlEvent], body: Body) -> Event:
    try:
        obj = json.loads(bytes(body))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"{cls.__name__} body is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError(f"{cls.__name__} body is not a JSON object")
    names = list(control_fields(cls))
    missing = [n for n in names if n not in obj]
    extra = [k for k in obj if k not in names]
    if missing or extra:
        raise FrameError(f"{cls.__name__} fields wrong: missing {missing}, unknown {extra}")
    return cls(**obj)  # the event checks each field's type


def _read_zero_range(body: Body) -> ZeroRange:
    if len(body) != L.ZERO.size:
        raise FrameError("ZERO_RANGE body has the wrong size")
    return ZeroRange(*L.ZERO.unpack(body))


def _read_scanned(body: Body) -> Scanned:
    if len(body) != L.U64.size:
        raise FrameError("SCANNED body has the wrong size")
    return Scanned(L.U64.unpack(body)[0])


def _read_seq(body: Body) -> Seq:
    if len(body) != L.U64.size:
        raise FrameError("SEQ body has the wrong size")
    return Seq(L.U64.unpack(body)[0])


def _read_ping(cls: type[Ping] | type[Pong], body: Body) -> Event:
    if len(body) < L.PING.size:
        raise FrameError(f"{cls.__name__.upper()} body too short")
    nonce, clock = L.PING.unpack_from(body)
    return cls(nonce, clock, len(body) - L.PING.size)


def _read_records(cls: type[TreeData] | type[FileOps], body: Body) -> Event:
    if len(body) < L.RECORDS.size:
        raise FrameError(f"{cls.__name__} body too short")
    flags, codec, raw_len = L.RECORDS.unpack_from(body)
    if flags & ~3 or (flags and cls is FileOps):
        raise FrameError(f"{cls.__name__} flags {flags:#x} not allowed")
    if not 0 < raw_len <= L.MAX_RAW:
        raise FrameError(f"{cls.__name__} raw length {raw_len} outside 1..{L.MAX_RAW}")
    payload = memoryview(body)[L.RECORDS.size:]
    if cls is TreeData:
        return TreeData(bool(flags & 1), codec, raw_len, payload, bool(flags & 2))
    return FileOps(codec, raw_len, payload)


def _read_sig_request(body: Body) -> SigRequest:
    if len(body) < L.SIGREQ.size + 1:
        raise FrameError("SIG_REQUEST body too short")
    return SigRequest(L.SIGREQ.unpack_from(body)[0], bytes(body[L.SIGREQ.size:]))


def read_subset(body: Body) -> TreeSubset:
    if len(body) < L.SUBSET.size:
        raise FrameError("TREE_SUBSET body too short")
    flags, count = L.SUBSET.unpack_from(body)
    if flags:
        raise FrameError("TREE_SUBSET flags must be 0")
    pos, dirs = L.SUBSET.size, []
    for _ in range(count):
        if pos + L.SUBDIR.size > len(body):
            raise FrameError("TREE_SUBSET shorter than its count says")
        recursive, n = L.SUBDIR.unpack_from(body, pos)
        pos += L.SUBDIR.size
        path = bytes(body[pos:pos + n])
        pos += n
        if len(path) != n or recursive > 1:
            raise FrameError("TREE_SUBSET entry malformed")
        dirs.append((path, bool(recursive)))
    if pos != len(body):
        raise FrameError("TREE_SUBSET has bytes after its last entry")
    return TreeSubset(tuple(dirs))  # the event checks each path


def _read_sig_data(body: Body) -> SigData:
    S = L.SIGDATA
    if len(body) < S.size:
        raise FrameError("SIG_DATA body too short")
    flags, bs, size, first, count = S.unpack_from(body)
    if flags & ~1 or count > L.MAX_SIG or len(body) != S.size + 12 * count:
        raise FrameError("SIG_DATA flags or length wrong")
    weak = np.frombuffer(body, dtype="<u4", count=count, offset=S.size)
    strong = np.frombuffer(body, dtype="<u8", count=count, offset=S.size + 4 * count)
    return SigData(bool(flags), bs, size, first, weak, strong)


def _read_manifest(body: Body) -> ManifestData:
    if len(body) < L.MAN.size:
        raise FrameError("MANIFEST_DATA body too short")
    level, first, count = L.MAN.unpack_from(body)
    if level not in (0, 1):
        raise FrameError(f"MANIFEST_DATA level {level} unknown")
    width = 16 if level == 0 else 8
    if len(body) != L.MAN.size + width * count:
        raise FrameError("MANIFEST_DATA length does not match its count")
    entries = np.frombuffer(body, dtype="<u8", offset=L.MAN.size)
    if level == 0:
        entries = entries.reshape(count, 2)
    return ManifestData("coarse" if level == 0 else "fine", first, entries)


#: the reader of each frame type
READERS: dict[int, Reader] = {
    BlockData.TYPE: _read_block_data,
    BlockSet.TYPE: _read_block_set,
    **{cls.TYPE: _whole(partial(read_json, cls), cls.__name__) for cls in CONTROL_EVENTS},
    ZeroRange.TYPE: _whole(_read_zero_range, "ZeroRange"),
    Scanned.TYPE: _whole(_read_scanned, "Scanned"),
    Seq.TYPE: _whole(_read_seq, "Seq"),
    Ping.TYPE: _whole(partial(_read_ping, Ping), "Ping"),
    Pong.TYPE: _whole(partial(_read_ping, Pong), "Pong"),
    TreeData.TYPE: _whole(partial(_read_records, TreeData), "TreeData"),
    FileOps.TYPE: _whole(partial(_read_records, FileOps), "FileOps"),
    SigRequest.TYPE: _whole(_read_sig_request, "SigRequest"),
    TreeSubset.TYPE: _whole(read_subset, "TreeSubset"),
    SigData.TYPE: _whole(_read_sig_data, "SigData"),
    ManifestData.TYPE: _whole(_read_manifest, "ManifestData"),
}
