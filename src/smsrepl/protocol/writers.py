"""Events to frames: one writer per event class (WRITERS), each laying out the body of an
event that already checked its fields (events.py). encode() adds the header and its check.

Writers return the buffers to write in order; large payloads are passed on, not copied.
The one error left to a writer is a body too large for a frame (MAX_BODY), raised as
FrameError: the connection then refuses to go on.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import xxhash

from smsrepl._lazy import np
from smsrepl.errors import FrameError
from smsrepl.protocol import layout as L
from smsrepl.protocol.events import (
    CONTROL_EVENTS, BlockData, BlockSet, ControlEvent, Event, FileOps, ManifestData, Ping, Pong, Scanned, SigData,
    Seq, SigRequest, TreeData, TreeSubset, ZeroRange,
    control_fields)

Parts = list[bytes | memoryview]


def encode(event: Event) -> Parts:
    """The frame for ``event`` as buffers to write in order (payloads are not copied)."""
    writer = WRITERS.get(type(event))
    if writer is None:
        raise TypeError(f"not a frame event: {event!r}")
    return writer(event)


def frame(ftype: int, body: bytes, checked_len: int | None = None) -> bytes:
    """A whole frame: header (its check over ``checked_len`` bytes of the body, or all) and body."""
    head8 = _head8(ftype, len(body))
    checked = body if checked_len is None else memoryview(body)[:checked_len]
    return head8 + L.CHECK.pack(L.check(head8, checked)) + body


def frame_digest(digests: Any) -> bytes:
    """BLOCK_DATA's 16-byte digest: XXH3-128 over the blocks' XXH3-64 digests (little-endian)."""
    return xxhash.xxh3_128_digest(np.ascontiguousarray(digests, dtype="<u8").tobytes())


def _head8(ftype: int, length: int) -> bytes:
    if length > L.MAX_BODY:
        raise FrameError(f"a frame body of {length} bytes exceeds the maximum of {L.MAX_BODY}")
    return L.HEAD8.pack(length, ftype, 0, 0)


def _with_payload(ftype: int, prefix: bytes, payload: Any, *, check_payload: bool = False) -> Parts:
    """A frame of ``prefix`` then ``payload`` (not copied); the check covers the prefix only
    (data frames: their blocks' digests cover the payload), or both."""
    view = memoryview(payload).cast("B")
    head8 = _head8(ftype, len(prefix) + len(view))
    checked = L.check(head8, prefix, view) if check_payload else L.check(head8, prefix)
    return [head8 + L.CHECK.pack(checked) + prefix, view]


def _write_json(event: ControlEvent) -> Parts:
    obj = {name: getattr(event, name) for name in control_fields(type(event))}
    return [frame(event.TYPE, json.dumps(obj, separators=(",", ":")).encode())]


def _write_block_data(event: BlockData) -> Parts:
    digests = np.ascontiguousarray(event.digests, dtype="<u8")
    zero_map = np.packbits(digests == 0, bitorder="little").tobytes()
    prefix = L.BLOCK_PREFIX.pack(event.offset, event.raw_len, event.codec) + frame_digest(digests) + zero_map
    return _with_payload(event.TYPE, prefix, event.payload)


def _write_block_set(event: BlockSet) -> Parts:
    index = np.ascontiguousarray(event.index, dtype=">u4")
    digests = np.ascontiguousarray(event.digests, dtype="<u8")
    prefix = L.SET_PREFIX.pack(event.offset, len(index), event.codec) + index.tobytes() + digests.tobytes()
    return _with_payload(event.TYPE, prefix, event.payload)


def _write_zero_range(event: ZeroRange) -> Parts:
    return [frame(event.TYPE, L.ZERO.pack(event.offset, event.length))]


def _write_scanned(event: Scanned) -> Parts:
    return [frame(event.TYPE, L.U64.pack(event.offset))]


def _write_seq(event: Seq) -> Parts:
    return [frame(event.TYPE, L.U64.pack(event.seq))]


def _write_ping(event: Ping | Pong) -> Parts:
    return [frame(event.TYPE, L.PING.pack(event.nonce, event.clock_ns) + bytes(event.padding))]


def _write_records(event: TreeData | FileOps) -> Parts:
    flags = (event.last | event.ordered << 1) if isinstance(event, TreeData) else 0
    # the payload is not copied: these are the large frames of file rounds
    return _with_payload(event.TYPE, L.RECORDS.pack(flags, event.codec, event.raw_len), event.payload,
                         check_payload=True)


def _write_sig_request(event: SigRequest) -> Parts:
    return [frame(event.TYPE, L.SIGREQ.pack(event.block_size) + event.path)]


def _write_subset(event: TreeSubset) -> Parts:
    parts = [L.SUBSET.pack(0, len(event.dirs))]
    for path, recursive in event.dirs:
        parts.append(L.SUBDIR.pack(1 if recursive else 0, len(path)) + path)
    return [frame(event.TYPE, b"".join(parts))]


def _write_sig_data(event: SigData) -> Parts:
    weak = np.ascontiguousarray(event.weak, dtype="<u4")
    strong = np.ascontiguousarray(event.strong, dtype="<u8")
    head = L.SIGDATA.pack(1 if event.last else 0, event.block_size, event.file_size, event.first, len(weak))
    return [frame(event.TYPE, head + weak.tobytes() + strong.tobytes())]


def _write_manifest(event: ManifestData) -> Parts:
    entries = np.ascontiguousarray(event.entries, dtype="<u8")
    level = 0 if event.level == "coarse" else 1
    return [frame(event.TYPE, L.MAN.pack(level, event.first, len(entries)) + entries.tobytes())]


#: the writer of each event class (a writer takes the one class it is listed for)
WRITERS: dict[type[Event], Callable[[Any], Parts]] = {
    **{cls: _write_json for cls in CONTROL_EVENTS},
    BlockData: _write_block_data,
    BlockSet: _write_block_set,
    ZeroRange: _write_zero_range,
    Scanned: _write_scanned,
    Seq: _write_seq,
    Ping: _write_ping,
    Pong: _write_ping,
    TreeData: _write_records,
    FileOps: _write_records,
    SigRequest: _write_sig_request,
    TreeSubset: _write_subset,
    SigData: _write_sig_data,
    ManifestData: _write_manifest,
}


def frame_size(ev: object) -> int:
    """What a frame holds in memory, about (its payload; small frames count as 64 bytes)."""
    payload = getattr(ev, "payload", None)
    if payload is None:
        return 64
    try:
        return memoryview(payload).nbytes + 64
    except TypeError:
        return 64
