"""Frame layout and the events it carries. No I/O here.

Every frame is a 12-byte header and a body (big-endian integers):

    offset  size  field
    0       4     body length in bytes (at most MAX_BODY)
    4       1     frame type (see TYPES)
    5       1     flags, must be 0
    6       2     reserved, must be 0
    8       4     check: the low 32 bits of XXH3-64 of header bytes 0-7 followed
                  by the checked part of the body (the whole body, except BLOCK_DATA, whose
                  payload is covered by its block digests instead)
    12      len   body

Control frames carry a JSON object (UTF-8) whose keys and types are fixed by
the event class; unknown or missing keys are a protocol error. Binary bodies:

    BLOCK_DATA  u64 offset | u32 range length | u8 codec | 3 zero bytes |
                16-byte digest | zero map, ceil(range length / 4096 / 8) bytes | payload
                (the frame sets the blocks of [offset, offset + range length);
                offset is 4 KiB aligned; range length at most LEGACY_RAW (4 MiB),
                or MAX_RAW (8 MiB) when the receiver listed "frame-8m". Bit i of the zero map (LSB first, unused
                bits 0) says block i is all zero: zero blocks are never carried,
                compressed or not; the payload decodes to the non-zero blocks, in
                order. The digest is XXH3-128 over the XXH3-64 of every 4 KiB
                block, little-endian, 0 for zero blocks (the manifest's fine
                digests): the receiver computes those anyway, so one 16-byte
                digest per frame checks every block at 0.4% less wire than
                sending each block's digest)
    BLOCK_SET   u64 offset | u32 count | u8 codec | 3 zero bytes |
                u32 index * count | u64 digest * count | payload
                (scattered blocks: block i sits at offset + index[i] * 4096;
                indices strictly increase from 0, so offset is the first
                block's; digests and payload as in BLOCK_DATA; only the
                source's last block may be short. Sync rounds send changes
                spread thin this way: one frame, not one per block)
    ZERO_RANGE  u64 offset | u64 length        (the range reads as zero)
    SCANNED     u64 offset                     (nothing below it is left to send this round)
    PING, PONG  u64 nonce | u64 sender clock ns | padding (netcheck sizes)
    MANIFEST_DATA  u8 level (0 coarse, 1 fine) | 7 zero bytes | u64 first |
                u32 count | 4 zero bytes | entries (16 or 8 bytes each, LE)
    TREE_DATA, FILE_OPS  u8 flags (TREE_DATA: bit 0 = last, bit 1 = ordered) | u8 codec |
                u32 raw length | payload (codec as BLOCK_DATA; the raw bytes are
                entry records or operations, see files/wire.py). An ordered
                TREE_DATA holds whole directories, and the directories of a listing
                come breadth first: by depth, then by their path's components
                compared as bytes (the order of files.dirscan); a receiver sends
                them only to a sender that listed "tree-stream", which may then
                start its round (RoundBegin, FILE_OPS) before the last one arrives
    TREE_SUBSET u8 flags (must be 0) | u32 count | count * (u8 recursive | u16 length | path)
                (TREE_REQUEST for some directories only: each one's entries, and with
                recursive everything below it; answered by ordered TREE_DATA frames as
                TREE_REQUEST is, to a sender that listed "tree-stream", and sent only to a
                receiver that listed "tree-subset". Paths are relative, without empty,
                "." or ".." components; b"" is the root)
    SIG_REQUEST u32 block size | path (the rest of the body)
    SIG_DATA    u8 flags (bit 0 = last) | u32 block size | u64 file size |
                u32 first block | u32 count | weak sums u32 LE * count |
                XXH3-64 u64 LE * count

STATUS (0x07, JSON): the receiver's answer to a HELLO of kind "status" (sent after its WELCOME,
to a receiver that listed "status"): ``targets``, one object per target (name, path, kind
block/directory/missing, size, busy, last_round), and ``sessions``, one per running session
that holds a target (target, peer, kind, started, bytes_received, rounds); see
transport/status.py. The asker then sends CLOSE.

Type ranges: 0x01-0x0f session, 0x10-0x1f block rounds, 0x20-0x2f
manifests, 0x30-0x3f file transfer, 0x40-0x4f network check.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import xxhash

from smsrepl._lazy import np
from smsrepl.errors import FrameError
from smsrepl.kernels import FINE_BLOCK

HEADER = struct.Struct(">IBBHI")
HEADER_SIZE = HEADER.size  # 12
#: largest raw payload of one BLOCK_DATA frame a receiver accepts (a sender sends
#: frames above LEGACY_RAW only to a peer that lists the "frame-8m" capability)
MAX_RAW = 8 << 20
LEGACY_RAW = 4 << 20
#: largest body of any frame: a full data frame plus its digests, with room to spare
MAX_BODY = MAX_RAW + (MAX_RAW // FINE_BLOCK) * 12 + 4096
PROTOCOL_VERSION = 2  # 2: frame checks are XXH3-64's low 32 bits (XXH32 ran at 2 GB/s)
#: what this build speaks beyond version 1's core (HELLO and WELCOME list them; each side
#: uses a feature only when the peer listed it)
CAPABILITIES = ("zstd", "block-set", "frame-8m", "files", "tree-stream", "tree-subset", "adopt-session", "status")
#: in a block HELLO: this sender has no completed round of its own for the target and takes over
#: the receiver's session, if the receiver holds a completed copy, with a sync round against its
#: manifest; the receiver then names that session in its WELCOME. In a WELCOME: it may do so
ADOPT_SESSION = "adopt-session"
#: listed in HELLO by a sender that only looks (send --dry-run): the receiver then creates,
#: removes and begins nothing (never listed in WELCOME, nor in an ordinary HELLO)
DRY_RUN = "dry-run"

_BLOCK_PREFIX = struct.Struct(">QIBxxx")
_SET_PREFIX = struct.Struct(">QIBxxx")  # offset, count, codec
#: most blocks in one BLOCK_SET (its payload stays within LEGACY_RAW)
MAX_SET = LEGACY_RAW // FINE_BLOCK
_U64 = struct.Struct(">Q")
_ZERO = struct.Struct(">QQ")
_PING = struct.Struct(">QQ")
_MAN = struct.Struct(">B7xQI4x")
_RECORDS = struct.Struct(">BBI")  # flags (TREE_DATA: bit 0 = last, bit 1 = ordered), codec, raw length
_SIGREQ = struct.Struct(">I")  # block size, then the path
_SUBSET = struct.Struct(">BI")  # flags, count
_SUBDIR = struct.Struct(">BH")  # recursive, path length
_SIGDATA = struct.Struct(">BIQII")  # flags (bit 0 = last), block size, file size, first block, count
#: most signature blocks in one SIG_DATA frame
MAX_SIG = 1 << 19


class Event:
    TYPE: ClassVar[int]


# --- JSON control events --------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hello(Event):
    TYPE: ClassVar[int] = 0x01
    versions: list  # protocol versions the sender speaks
    kind: str  # "block" (files and netcheck add their own)
    target: str
    session_id: str
    source_size: int
    block_size: int
    capabilities: list


@dataclass(frozen=True, slots=True)
class Welcome(Event):
    TYPE: ClassVar[int] = 0x02
    version: int
    session_id: str
    target_size: int
    #: "new": no usable state; "partial": a round was interrupted; "synced": the last round completed
    state: str
    round_id: int
    round_kind: str
    checkpoint: int
    manifest_root: str
    capabilities: list


@dataclass(frozen=True, slots=True)
class Error(Event):
    TYPE: ClassVar[int] = 0x03
    code: str
    message: str
    exit_code: int
    resumable: bool


@dataclass(frozen=True, slots=True)
class Close(Event):
    TYPE: ClassVar[int] = 0x04
    reason: str


@dataclass(frozen=True, slots=True)
class Status(Event):
    """The receiver's targets and running sessions (a HELLO of kind "status" asks for it)."""

    TYPE: ClassVar[int] = 0x07
    targets: list
    sessions: list


@dataclass(frozen=True, slots=True)
class RoundBegin(Event):
    TYPE: ClassVar[int] = 0x10
    round_id: int
    kind: str  # "full" or "sync"
    start: int
    #: for sync rounds, the receiver keeps blocks it was not sent; for full rounds it holds only what it was sent


@dataclass(frozen=True, slots=True)
class Checkpoint(Event):
    TYPE: ClassVar[int] = 0x14
    round_id: int
    offset: int  # everything of this round below offset is durable on the target
    bytes_written: int


@dataclass(frozen=True, slots=True)
class RoundEnd(Event):
    TYPE: ClassVar[int] = 0x15
    round_id: int


@dataclass(frozen=True, slots=True)
class RoundDone(Event):
    TYPE: ClassVar[int] = 0x16
    round_id: int
    manifest_root: str


@dataclass(frozen=True, slots=True)
class ManifestRequest(Event):
    TYPE: ClassVar[int] = 0x20
    level: str  # "coarse" or "fine"
    first: int
    count: int


# --- binary events ----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BlockData(Event):
    TYPE: ClassVar[int] = 0x11
    offset: int
    raw_len: int
    codec: int
    #: numpy uint64 array, one per 4 KiB of raw data (0 = zero block); the sender
    #: sets it, and the frame carries the zero map and their XXH3-128 instead
    digests: Any
    payload: Any  # bytes-like
    #: set when decoded (digests is then None): numpy bool array of zero blocks, and the digest
    zeros: Any = None
    check: bytes = b""


@dataclass(frozen=True, slots=True)
class BlockSet(Event):
    TYPE: ClassVar[int] = 0x17
    offset: int
    index: Any  # numpy integer array: block numbers relative to offset, strictly increasing from 0
    codec: int
    digests: Any  # numpy uint64 array, one per block
    payload: Any  # bytes-like: the non-zero blocks, in order


@dataclass(frozen=True, slots=True)
class ZeroRange(Event):
    TYPE: ClassVar[int] = 0x12
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Scanned(Event):
    TYPE: ClassVar[int] = 0x13
    offset: int


@dataclass(frozen=True, slots=True)
class Ping(Event):
    TYPE: ClassVar[int] = 0x05
    nonce: int
    clock_ns: int
    padding: int = 0


@dataclass(frozen=True, slots=True)
class Pong(Event):
    TYPE: ClassVar[int] = 0x06
    nonce: int
    clock_ns: int
    padding: int = 0


@dataclass(frozen=True, slots=True)
class ManifestData(Event):
    TYPE: ClassVar[int] = 0x21
    level: str
    first: int
    entries: Any  # numpy array: (count, 2) uint64 for coarse, (count,) uint64 for fine


# --- file sessions (kind "files"; records in files/wire.py) ------------------

@dataclass(frozen=True, slots=True)
class TreeRequest(Event):
    """The sender asks the receiver to describe its tree (TREE_DATA frames answer)."""

    TYPE: ClassVar[int] = 0x30
    checksum: bool  # include each regular file's XXH3-128


@dataclass(frozen=True, slots=True)
class TreeData(Event):
    """Entry records of the receiver's tree; ``last`` ends the answer; ``ordered``: whole
    directories, breadth first (see the module's notes)."""

    TYPE: ClassVar[int] = 0x31
    last: bool
    codec: int
    raw_len: int
    payload: Any
    ordered: bool = False


@dataclass(frozen=True, slots=True)
class FileOps(Event):
    """Operations of a file round, applied in order."""

    TYPE: ClassVar[int] = 0x32
    codec: int
    raw_len: int
    payload: Any


@dataclass(frozen=True, slots=True)
class SigRequest(Event):
    """The sender asks for the block signature of the receiver's copy of ``path`` (a delta basis)."""

    TYPE: ClassVar[int] = 0x33
    block_size: int
    path: bytes


@dataclass(frozen=True, slots=True)
class TreeSubset(Event):
    """The sender asks for the receiver's entries of some directories only: ``dirs`` is a tuple
    of (relative path, recursive) (a round of the directories a change journal named)."""

    TYPE: ClassVar[int] = 0x35
    dirs: tuple


@dataclass(frozen=True, slots=True)
class SigData(Event):
    """Blocks ``first``.. of the signature: weak (uint32) and XXH3-64 (uint64) sums; ``file_size`` 0
    and no blocks when there is no usable basis."""

    TYPE: ClassVar[int] = 0x34
    last: bool
    block_size: int
    file_size: int
    first: int
    weak: Any
    strong: Any


JSON_EVENTS: dict[int, type] = {
    cls.TYPE: cls for cls in (Hello, Welcome, Error, Close, RoundBegin, Checkpoint, RoundEnd, RoundDone, ManifestRequest,
                              TreeRequest, Status)
}
BINARY_EVENTS: dict[int, type] = {cls.TYPE: cls for cls in (BlockData, BlockSet, ZeroRange, Scanned, Ping, Pong, ManifestData,
                                                            TreeData, FileOps, SigRequest, SigData, TreeSubset)}
TYPES: dict[int, type] = {**JSON_EVENTS, **BINARY_EVENTS}

_JSON_TYPES = {"int": int, "str": str, "bool": bool, "list": list}
_MAX_INT = (1 << 63) - 1


def _check(header8: bytes, checked: bytes | memoryview) -> int:
    h = xxhash.xxh3_64(header8)
    h.update(checked)
    return h.intdigest() & 0xFFFFFFFF


def _frame(ftype: int, body: bytes, checked_len: int | None = None) -> bytes:
    head8 = struct.pack(">IBBH", len(body), ftype, 0, 0)
    checked = body if checked_len is None else memoryview(body)[:checked_len]
    return head8 + struct.pack(">I", _check(head8, checked)) + body


def encode(event: Event) -> list[bytes | memoryview]:
    """The frame for ``event`` as buffers to write in order (payloads are not copied)."""
    t = type(event).TYPE
    if t in JSON_EVENTS:
        body = json.dumps({f.name: getattr(event, f.name) for f in fields(event)}, separators=(",", ":")).encode()
        return [_frame(t, body)]
    if isinstance(event, BlockData):
        digests = np.ascontiguousarray(event.digests, dtype="<u8")
        nblocks = -(-event.raw_len // FINE_BLOCK)
        if len(digests) != nblocks:
            raise ValueError(f"BLOCK_DATA of {event.raw_len} bytes needs {nblocks} digests, got {len(digests)}")
        zero_map = np.packbits(digests == 0, bitorder="little").tobytes()
        prefix = (_BLOCK_PREFIX.pack(event.offset, event.raw_len, event.codec)
                  + frame_digest(digests) + zero_map)
        payload = memoryview(event.payload).cast("B")
        head8 = struct.pack(">IBBH", len(prefix) + len(payload), t, 0, 0)
        return [head8 + struct.pack(">I", _check(head8, prefix)) + prefix, payload]
    if isinstance(event, BlockSet):
        index = np.ascontiguousarray(event.index, dtype=">u4")
        digests = np.ascontiguousarray(event.digests, dtype="<u8")
        if not 0 < len(index) <= MAX_SET or len(digests) != len(index):
            raise ValueError(f"BLOCK_SET needs 1..{MAX_SET} indices and as many digests, got {len(index)} and {len(digests)}")
        prefix = _SET_PREFIX.pack(event.offset, len(index), event.codec) + index.tobytes() + digests.tobytes()
        payload = memoryview(event.payload).cast("B")
        head8 = struct.pack(">IBBH", len(prefix) + len(payload), t, 0, 0)
        return [head8 + struct.pack(">I", _check(head8, prefix)) + prefix, payload]
    if isinstance(event, ZeroRange):
        return [_frame(t, _ZERO.pack(event.offset, event.length))]
    if isinstance(event, Scanned):
        return [_frame(t, _U64.pack(event.offset))]
    if isinstance(event, (Ping, Pong)):
        return [_frame(t, _PING.pack(event.nonce, event.clock_ns) + bytes(event.padding))]
    if isinstance(event, (TreeData, FileOps)):
        if not 0 < event.raw_len <= MAX_RAW:
            raise ValueError(f"{type(event).__name__} of {event.raw_len} bytes outside 1..{MAX_RAW}")
        flags = (event.last | event.ordered << 1) if isinstance(event, TreeData) else 0
        prefix = _RECORDS.pack(flags, event.codec, event.raw_len)
        payload = memoryview(event.payload).cast("B")  # not copied: these are the large frames of file rounds
        head8 = struct.pack(">IBBH", len(prefix) + len(payload), t, 0, 0)
        check = xxhash.xxh3_64(head8)
        check.update(prefix)
        check.update(payload)
        return [head8 + struct.pack(">I", check.intdigest() & 0xFFFFFFFF) + prefix, payload]
    if isinstance(event, SigRequest):
        return [_frame(t, _SIGREQ.pack(event.block_size) + bytes(event.path))]
    if isinstance(event, TreeSubset):
        parts = [_SUBSET.pack(0, len(event.dirs))]
        for path, recursive in event.dirs:
            path = bytes(path)
            if len(path) > 0xFFFF:
                raise ValueError("TREE_SUBSET path longer than 65535 bytes")
            parts.append(_SUBDIR.pack(1 if recursive else 0, len(path)) + path)
        return [_frame(t, b"".join(parts))]
    if isinstance(event, SigData):
        weak = np.ascontiguousarray(event.weak, dtype="<u4")
        strong = np.ascontiguousarray(event.strong, dtype="<u8")
        if len(weak) != len(strong) or len(weak) > MAX_SIG:
            raise ValueError(f"SIG_DATA needs as many weak as strong sums, at most {MAX_SIG}")
        head = _SIGDATA.pack(1 if event.last else 0, event.block_size, event.file_size, event.first, len(weak))
        return [_frame(t, head + weak.tobytes() + strong.tobytes())]
    if isinstance(event, ManifestData):
        entries = np.ascontiguousarray(event.entries, dtype="<u8")
        level = {"coarse": 0, "fine": 1}[event.level]
        count = len(entries)
        return [_frame(t, _MAN.pack(level, event.first, count) + entries.tobytes())]
    raise TypeError(f"not a frame event: {event!r}")


def decode(ftype: int, body: bytes, check: int, head8: bytes) -> Event:
    """Decode one frame body. Raises FrameError on anything malformed."""
    cls = TYPES.get(ftype)
    if cls is None:
        raise FrameError(f"unknown frame type 0x{ftype:02x}")
    if ftype == BlockData.TYPE:
        if len(body) < _BLOCK_PREFIX.size:
            raise FrameError("BLOCK_DATA body shorter than its prefix")
        offset, raw_len, codec = _BLOCK_PREFIX.unpack_from(body)
        if body[13:16] != b"\0\0\0":
            raise FrameError("BLOCK_DATA padding is not zero")
        if raw_len == 0 or raw_len > MAX_RAW:
            raise FrameError(f"BLOCK_DATA raw length {raw_len} outside 1..{MAX_RAW}")
        if offset % FINE_BLOCK:
            raise FrameError(f"BLOCK_DATA offset {offset} is not 4 KiB aligned")
        nblocks = -(-raw_len // FINE_BLOCK)
        end = _BLOCK_PREFIX.size + 16 + -(-nblocks // 8)
        if len(body) < end:
            raise FrameError("BLOCK_DATA body shorter than its digest and zero map")
        if _check(head8, memoryview(body)[:end]) != check:
            raise FrameError("frame check mismatch (corrupt BLOCK_DATA header)")
        bits = np.frombuffer(body, dtype=np.uint8, count=end - _BLOCK_PREFIX.size - 16, offset=_BLOCK_PREFIX.size + 16)
        zeros = np.unpackbits(bits, bitorder="little").astype(bool)
        if zeros[nblocks:].any():
            raise FrameError("BLOCK_DATA zero map has bits past its last block")
        digest = bytes(body[_BLOCK_PREFIX.size:_BLOCK_PREFIX.size + 16])
        return BlockData(offset, raw_len, codec, None, memoryview(body)[end:], zeros[:nblocks], digest)
    if ftype == BlockSet.TYPE:
        return _decode_set(body, check, head8)
    if _check(head8, body) != check:
        raise FrameError(f"frame check mismatch (corrupt {cls.__name__} frame)")
    if ftype in JSON_EVENTS:
        return _decode_json(cls, body)
    if ftype == ZeroRange.TYPE:
        if len(body) != _ZERO.size:
            raise FrameError("ZERO_RANGE body has the wrong size")
        return ZeroRange(*_ZERO.unpack(body))
    if ftype == Scanned.TYPE:
        if len(body) != 8:
            raise FrameError("SCANNED body has the wrong size")
        return Scanned(_U64.unpack(body)[0])
    if ftype in (Ping.TYPE, Pong.TYPE):
        if len(body) < _PING.size:
            raise FrameError(f"{cls.__name__.upper()} body too short")
        nonce, clock = _PING.unpack_from(body)
        return cls(nonce, clock, len(body) - _PING.size)
    if ftype in (TreeData.TYPE, FileOps.TYPE):
        if len(body) < _RECORDS.size:
            raise FrameError(f"{cls.__name__} body too short")
        flags, codec, raw_len = _RECORDS.unpack_from(body)
        if flags & ~3 or (flags and ftype == FileOps.TYPE):
            raise FrameError(f"{cls.__name__} flags {flags:#x} not allowed")
        if not 0 < raw_len <= MAX_RAW:
            raise FrameError(f"{cls.__name__} raw length {raw_len} outside 1..{MAX_RAW}")
        payload = memoryview(body)[_RECORDS.size:]
        if ftype == TreeData.TYPE:
            return TreeData(bool(flags & 1), codec, raw_len, payload, bool(flags & 2))
        return FileOps(codec, raw_len, payload)
    if ftype == SigRequest.TYPE:
        if len(body) < _SIGREQ.size + 1:
            raise FrameError("SIG_REQUEST body too short")
        return SigRequest(_SIGREQ.unpack_from(body)[0], bytes(body[_SIGREQ.size:]))
    if ftype == TreeSubset.TYPE:
        return _decode_subset(body)
    if ftype == SigData.TYPE:
        if len(body) < _SIGDATA.size:
            raise FrameError("SIG_DATA body too short")
        flags, bs, size, first, count = _SIGDATA.unpack_from(body)
        if flags & ~1 or count > MAX_SIG or len(body) != _SIGDATA.size + 12 * count:
            raise FrameError("SIG_DATA flags or length wrong")
        weak = np.frombuffer(body, dtype="<u4", count=count, offset=_SIGDATA.size)
        strong = np.frombuffer(body, dtype="<u8", count=count, offset=_SIGDATA.size + 4 * count)
        return SigData(bool(flags), bs, size, first, weak, strong)
    if ftype == ManifestData.TYPE:
        if len(body) < _MAN.size:
            raise FrameError("MANIFEST_DATA body too short")
        level, first, count = _MAN.unpack_from(body)
        if level not in (0, 1):
            raise FrameError(f"MANIFEST_DATA level {level} unknown")
        width = 16 if level == 0 else 8
        if len(body) != _MAN.size + width * count:
            raise FrameError("MANIFEST_DATA length does not match its count")
        entries = np.frombuffer(body, dtype="<u8", offset=_MAN.size)
        if level == 0:
            entries = entries.reshape(count, 2)
        return ManifestData("coarse" if level == 0 else "fine", first, entries)
    raise FrameError(f"frame type 0x{ftype:02x} has no decoder")  # pragma: no cover


def frame_digest(digests: np.ndarray) -> bytes:
    """BLOCK_DATA's 16-byte digest: XXH3-128 over the blocks' XXH3-64 digests (little-endian)."""
    return xxhash.xxh3_128_digest(np.ascontiguousarray(digests, dtype="<u8").tobytes())


def _decode_set(body: bytes, check: int, head8: bytes) -> BlockSet:
    if len(body) < _SET_PREFIX.size:
        raise FrameError("BLOCK_SET body shorter than its prefix")
    offset, count, codec = _SET_PREFIX.unpack_from(body)
    if body[13:16] != b"\0\0\0":
        raise FrameError("BLOCK_SET padding is not zero")
    if not 0 < count <= MAX_SET:
        raise FrameError(f"BLOCK_SET count {count} outside 1..{MAX_SET}")
    if offset % FINE_BLOCK:
        raise FrameError(f"BLOCK_SET offset {offset} is not 4 KiB aligned")
    end = _SET_PREFIX.size + 12 * count
    if len(body) < end:
        raise FrameError("BLOCK_SET body shorter than its indices and digests")
    if _check(head8, memoryview(body)[:end]) != check:
        raise FrameError("frame check mismatch (corrupt BLOCK_SET header)")
    index = np.frombuffer(body, dtype=">u4", count=count, offset=_SET_PREFIX.size).astype(np.int64)
    if index[0] != 0 or (count > 1 and not (np.diff(index) > 0).all()):
        raise FrameError("BLOCK_SET indices must start at 0 and strictly increase")
    digests = np.frombuffer(body, dtype="<u8", count=count, offset=_SET_PREFIX.size + 4 * count)
    return BlockSet(offset, index, codec, digests, memoryview(body)[end:])


def _decode_subset(body: bytes) -> TreeSubset:
    if len(body) < _SUBSET.size:
        raise FrameError("TREE_SUBSET body too short")
    flags, count = _SUBSET.unpack_from(body)
    if flags:
        raise FrameError("TREE_SUBSET flags must be 0")
    pos, dirs = _SUBSET.size, []
    for _ in range(count):
        if pos + _SUBDIR.size > len(body):
            raise FrameError("TREE_SUBSET shorter than its count says")
        recursive, n = _SUBDIR.unpack_from(body, pos)
        pos += _SUBDIR.size
        path = bytes(body[pos:pos + n])
        pos += n
        if len(path) != n or recursive > 1:
            raise FrameError("TREE_SUBSET entry malformed")
        if path and (b"\0" in path or any(c in (b"", b".", b"..") for c in path.split(b"/"))):
            raise FrameError(f"TREE_SUBSET path {path!r} is not a plain relative path")
        dirs.append((path, bool(recursive)))
    if pos != len(body):
        raise FrameError("TREE_SUBSET has bytes after its last entry")
    return TreeSubset(tuple(dirs))


def _decode_json(cls: type, body: bytes) -> Event:
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"{cls.__name__} body is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError(f"{cls.__name__} body is not a JSON object")
    names = [f.name for f in fields(cls)]
    missing = [n for n in names if n not in obj]
    extra = [k for k in obj if k not in names]
    if missing or extra:
        raise FrameError(f"{cls.__name__} fields wrong: missing {missing}, unknown {extra}")
    hints = {f.name: f.type for f in fields(cls)}
    for name in names:
        want = _JSON_TYPES.get(str(hints[name]).split()[0].strip("'\""), None)
        value = obj[name]
        if want is int:
            if type(value) is not int or not 0 <= value <= _MAX_INT:
                raise FrameError(f"{cls.__name__}.{name} must be a non-negative integer")
        elif want is not None and type(value) is not want:
            raise FrameError(f"{cls.__name__}.{name} must be {want.__name__}")
    return cls(**obj)
