"""The events frames carry, each checking its own fields when it is made.

An event with a field the wire cannot carry (a wrong type, a number out of range, an unknown
round kind, as many digests as the range does not have) raises FrameError naming the event and
the field, whether a sender made it or a reader decoded it from a peer's frame (the connection
turns the latter into RemoteProtocolError), so writers take events as they are. Control events
(JSON frames) check fields against their annotations: ints are non-negative and fit 63 bits.
"""
from __future__ import annotations

import operator
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

from smsrepl._lazy import np
from smsrepl.errors import FrameError
from smsrepl.kernels import FINE_BLOCK
from smsrepl.protocol.layout import MAX_BODY, MAX_JSON_INT, MAX_RAW, MAX_SET, MAX_SIG, MAX_U64, PING

#: round kinds, manifest levels and WELCOME states the protocol knows
ROUND_KINDS = ("full", "sync")
LEVELS = ("coarse", "fine")
WELCOME_STATES = ("new", "partial", "synced")


class Event:
    TYPE: ClassVar[int]


def _bad(event: object, name: str, what: str) -> FrameError:
    return FrameError(f"{type(event).__name__}.{name} {what}")


def _uint(event: object, name: str, top: int = MAX_U64, *, low: int = 0) -> int:
    """Field ``name`` as an int in low..top (numpy integers count; bools do not)."""
    value = getattr(event, name)
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise _bad(event, name, f"must be an integer, not {type(value).__name__}") from None
    if not low <= number <= top:
        raise _bad(event, name, f"{number} outside {low}..{top}")
    return number


def _flag(event: object, name: str) -> None:
    if not isinstance(getattr(event, name), bool):
        raise _bad(event, name, f"must be a bool, not {type(getattr(event, name)).__name__}")


def _choice(event: object, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(event, name)
    if value not in allowed or type(value) is not str:
        raise _bad(event, name, f"{value!r} is not one of {', '.join(allowed)}")


def _aligned(event: object, name: str) -> int:
    offset = _uint(event, name)
    if offset % FINE_BLOCK:
        raise _bad(event, name, f"{offset} is not 4 KiB aligned")
    return offset


def _bytes_like(event: object, name: str) -> int:
    """The length in bytes of buffer field ``name``."""
    try:
        return memoryview(getattr(event, name)).nbytes
    except TypeError:
        raise _bad(event, name, f"must be bytes-like, not {type(getattr(event, name)).__name__}") from None


def _array(event: object, name: str, ndim: int = 1) -> int:
    """The length of integer array field ``name`` (a numpy array, or a sequence of ints)."""
    value = getattr(event, name)
    shape = np.shape(value)
    if len(shape) != ndim or (ndim == 2 and shape[1] != 2):
        raise _bad(event, name, f"must be a {'(count, 2)' if ndim == 2 else 'one-dimensional'} array, "
                                f"not of shape {shape}")
    if shape[0] and np.asarray(value).dtype.kind not in "iu":
        raise _bad(event, name, "must hold integers")
    return int(shape[0])


# --- JSON control events --------------------------------------------------

class ControlEvent(Event):
    """An event carried as a JSON object whose keys are the event's fields."""

    def __post_init__(self) -> None:
        for name, hint in control_fields(type(self)).items():
            if not _json_fits(getattr(self, name), hint):
                raise _bad(self, name, f"must be {_describe(hint)}, not {getattr(self, name)!r:.80}")


def control_fields(cls: type[ControlEvent]) -> dict[str, Any]:
    """A control event's fields and their types, in order: the keys of its JSON object."""
    return _FIELDS[cls]


def _json_fits(value: object, hint: Any) -> bool:
    if hint is int:
        return type(value) is int and 0 <= value <= MAX_JSON_INT
    if hint in (str, bool):
        return type(value) is hint
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_json_fits(v, item) for v in value)
    if typing.get_origin(hint) is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return hint is Any


def _describe(hint: Any, many: bool = False) -> str:
    """``hint`` in words: "an integer in 0..N", or with ``many`` "integers in 0..N"."""
    if typing.get_origin(hint) is list:
        return "a list of " + _describe(typing.get_args(hint)[0], True)
    word = {int: "integer", str: "string", bool: "bool"}.get(hint, "object")
    text = (word + "s" if many else ("an " if word[0] in "aeiou" else "a ") + word)
    return text + f" in 0..{MAX_JSON_INT}" if hint is int else text


@dataclass(frozen=True, slots=True)
class Hello(ControlEvent):
    TYPE: ClassVar[int] = 0x01
    versions: list[int]  # protocol versions the sender speaks
    kind: str  # "block", "verify", "files", "netcheck" or "status" (the receiver refuses others)
    target: str
    session_id: str
    source_size: int
    block_size: int
    capabilities: list[str]


@dataclass(frozen=True, slots=True)
class Welcome(ControlEvent):
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
    capabilities: list[str]

    def __post_init__(self) -> None:
        ControlEvent.__post_init__(self)
        _choice(self, "state", WELCOME_STATES)


@dataclass(frozen=True, slots=True)
class Error(ControlEvent):
    TYPE: ClassVar[int] = 0x03
    code: str
    message: str
    exit_code: int
    resumable: bool


@dataclass(frozen=True, slots=True)
class Close(ControlEvent):
    TYPE: ClassVar[int] = 0x04
    reason: str


@dataclass(frozen=True, slots=True)
class Status(ControlEvent):
    """The receiver's targets and running sessions (a HELLO of kind "status" asks for it)."""

    TYPE: ClassVar[int] = 0x07
    targets: list[dict[str, Any]]
    sessions: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class RoundBegin(ControlEvent):
    TYPE: ClassVar[int] = 0x10
    round_id: int
    kind: str  # "full" or "sync"
    start: int
    #: for sync rounds, the receiver keeps blocks it was not sent; for full rounds it holds only what it was sent

    def __post_init__(self) -> None:
        ControlEvent.__post_init__(self)
        _choice(self, "kind", ROUND_KINDS)


@dataclass(frozen=True, slots=True)
class Checkpoint(ControlEvent):
    TYPE: ClassVar[int] = 0x14
    round_id: int
    offset: int  # everything of this round below offset is durable on the target
    bytes_written: int


@dataclass(frozen=True, slots=True)
class RoundEnd(ControlEvent):
    TYPE: ClassVar[int] = 0x15
    round_id: int


@dataclass(frozen=True, slots=True)
class RoundDone(ControlEvent):
    TYPE: ClassVar[int] = 0x16
    round_id: int
    manifest_root: str


@dataclass(frozen=True, slots=True)
class ManifestRequest(ControlEvent):
    TYPE: ClassVar[int] = 0x20
    level: str  # "coarse" or "fine"
    first: int
    count: int

    def __post_init__(self) -> None:
        ControlEvent.__post_init__(self)
        _choice(self, "level", LEVELS)


@dataclass(frozen=True, slots=True)
class TreeRequest(ControlEvent):
    """The sender asks the receiver to describe its tree (TREE_DATA frames answer)."""

    TYPE: ClassVar[int] = 0x30
    checksum: bool  # include each regular file's XXH3-128


@dataclass(frozen=True, slots=True)
class Streams(ControlEvent):
    """Parallel streams ("streams"). On a session's connection, the sender asks for ``count``
    connections in all (key ""), and the receiver grants a count and a key; each extra
    connection then says HELLO of kind "stream" and STREAMS (its index from 1, the key)."""

    TYPE: ClassVar[int] = 0x50
    count: int
    key: str


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

    def __post_init__(self) -> None:
        _aligned(self, "offset")
        raw_len = _uint(self, "raw_len", MAX_RAW, low=1)
        _uint(self, "codec", 0xFF)
        nblocks = -(-raw_len // FINE_BLOCK)
        if self.digests is not None:
            if _array(self, "digests") != nblocks:
                raise FrameError(f"BLOCK_DATA of {raw_len} bytes needs {nblocks} digests, got {len(self.digests)}")
        elif len(self.check) != 16 or np.shape(self.zeros) != (nblocks,):
            raise FrameError("BlockData needs digests, or (as decoded) a zero map per block and a 16-byte check")
        _bytes_like(self, "payload")

    def recoded(self, codec: int, payload: Any) -> BlockData:
        return _recoded(self, codec, payload)


@dataclass(frozen=True, slots=True)
class BlockSet(Event):
    TYPE: ClassVar[int] = 0x17
    offset: int
    index: Any  # numpy integer array: block numbers relative to offset, strictly increasing from 0
    codec: int
    digests: Any  # numpy uint64 array, one per block
    payload: Any  # bytes-like: the non-zero blocks, in order

    def __post_init__(self) -> None:
        _aligned(self, "offset")
        _uint(self, "codec", 0xFF)
        count, ndigests = _array(self, "index"), _array(self, "digests")
        if not 0 < count <= MAX_SET or ndigests != count:
            raise FrameError(f"BLOCK_SET needs 1..{MAX_SET} indices and as many digests, got {count} and {ndigests}")
        index = np.asarray(self.index)
        if index[0] != 0 or (count > 1 and not (np.diff(index) > 0).all()):
            raise FrameError("BLOCK_SET indices must start at 0 and strictly increase")
        _bytes_like(self, "payload")

    def recoded(self, codec: int, payload: Any) -> BlockSet:
        return _recoded(self, codec, payload)


_Data = TypeVar("_Data", "BlockData", "BlockSet")
_DATA_FIELDS = {cls: tuple(f.name for f in fields(cls)) for cls in (BlockData, BlockSet)}


def _recoded(event: _Data, codec: int, payload: Any) -> _Data:
    """``event`` with its payload encoded by ``codec``: only the two new fields are checked
    (a sender compresses every data frame; its blocks, digests and index were checked when made)."""
    new = object.__new__(type(event))
    for name in _DATA_FIELDS[type(event)]:
        object.__setattr__(new, name, getattr(event, name))
    object.__setattr__(new, "codec", codec)
    object.__setattr__(new, "payload", payload)
    _uint(new, "codec", 0xFF)
    _bytes_like(new, "payload")
    return new


@dataclass(frozen=True, slots=True)
class ZeroRange(Event):
    TYPE: ClassVar[int] = 0x12
    offset: int
    length: int

    def __post_init__(self) -> None:
        _uint(self, "offset")
        _uint(self, "length")


@dataclass(frozen=True, slots=True)
class Scanned(Event):
    TYPE: ClassVar[int] = 0x13
    offset: int

    def __post_init__(self) -> None:
        _uint(self, "offset")


@dataclass(frozen=True, slots=True)
class Ping(Event):
    TYPE: ClassVar[int] = 0x05
    nonce: int
    clock_ns: int
    padding: int = 0

    def __post_init__(self) -> None:
        _ping(self)


@dataclass(frozen=True, slots=True)
class Pong(Event):
    TYPE: ClassVar[int] = 0x06
    nonce: int
    clock_ns: int
    padding: int = 0

    def __post_init__(self) -> None:
        _ping(self)


@dataclass(frozen=True, slots=True)
class Seq(Event):
    """The place of the frame after it in the session's one order, over all its connections."""

    TYPE: ClassVar[int] = 0x51
    seq: int

    def __post_init__(self) -> None:
        _uint(self, "seq")


def _ping(event: Ping | Pong) -> None:
    _uint(event, "nonce")
    _uint(event, "clock_ns")
    _uint(event, "padding", MAX_BODY - PING.size)


@dataclass(frozen=True, slots=True)
class ManifestData(Event):
    TYPE: ClassVar[int] = 0x21
    level: str
    first: int
    entries: Any  # numpy array: (count, 2) uint64 for coarse, (count,) uint64 for fine

    def __post_init__(self) -> None:
        _choice(self, "level", LEVELS)
        _uint(self, "first")
        if _array(self, "entries", 2 if self.level == "coarse" else 1) > 0xFFFFFFFF:
            raise _bad(self, "entries", "has more than 2**32 - 1 entries")


# --- file sessions (kind "files"; records in files/wire.py) ------------------

@dataclass(frozen=True, slots=True)
class TreeData(Event):
    """Entry records of the receiver's tree; ``last`` ends the answer; ``ordered``: whole
    directories, breadth first (see frames.py's notes)."""

    TYPE: ClassVar[int] = 0x31
    last: bool
    codec: int
    raw_len: int
    payload: Any
    ordered: bool = False

    def __post_init__(self) -> None:
        _flag(self, "last")
        _flag(self, "ordered")
        _records(self)


@dataclass(frozen=True, slots=True)
class FileOps(Event):
    """Operations of a file round, applied in order."""

    TYPE: ClassVar[int] = 0x32
    codec: int
    raw_len: int
    payload: Any

    def __post_init__(self) -> None:
        _records(self)


def _records(event: TreeData | FileOps) -> None:
    _uint(event, "codec", 0xFF)
    _uint(event, "raw_len", MAX_RAW, low=1)
    _bytes_like(event, "payload")


@dataclass(frozen=True, slots=True)
class SigRequest(Event):
    """The sender asks for the block signature of the receiver's copy of ``path`` (a delta basis)."""

    TYPE: ClassVar[int] = 0x33
    block_size: int
    path: bytes

    def __post_init__(self) -> None:
        _uint(self, "block_size", 0xFFFFFFFF)
        if not isinstance(self.path, bytes) or not self.path:
            raise _bad(self, "path", f"must be non-empty bytes, not {self.path!r:.80}")


@dataclass(frozen=True, slots=True)
class TreeSubset(Event):
    """The sender asks for the receiver's entries of some directories only: ``dirs`` is a tuple
    of (relative path, recursive) (a round of the directories a change journal named)."""

    TYPE: ClassVar[int] = 0x35
    dirs: tuple[tuple[bytes, bool], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.dirs, tuple):
            raise _bad(self, "dirs", f"must be a tuple, not {type(self.dirs).__name__}")
        for entry in self.dirs:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], bytes)
                    and isinstance(entry[1], bool)):
                raise _bad(self, "dirs", f"entry {entry!r:.80} is not (bytes path, bool recursive)")
            path = entry[0]
            if len(path) > 0xFFFF:
                raise FrameError("TREE_SUBSET path longer than 65535 bytes")
            if path and (b"\0" in path or any(c in (b"", b".", b"..") for c in path.split(b"/"))):
                raise FrameError(f"TREE_SUBSET path {path!r} is not a plain relative path")


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

    def __post_init__(self) -> None:
        _flag(self, "last")
        _uint(self, "block_size", 0xFFFFFFFF)
        _uint(self, "file_size")
        _uint(self, "first", 0xFFFFFFFF)
        if _array(self, "weak") != _array(self, "strong") or len(self.weak) > MAX_SIG:
            raise FrameError(f"SIG_DATA needs as many weak as strong sums, at most {MAX_SIG}")


CONTROL_EVENTS: tuple[type[ControlEvent], ...] = (
    Hello, Welcome, Error, Close, RoundBegin, Checkpoint, RoundEnd, RoundDone, ManifestRequest, TreeRequest, Status,
    Streams)
BINARY_EVENTS: tuple[type[Event], ...] = (
    BlockData, BlockSet, ZeroRange, Scanned, Ping, Pong, ManifestData, TreeData, FileOps, SigRequest, SigData, TreeSubset,
    Seq)
#: every event class by its frame type
TYPES: dict[int, type[Event]] = {cls.TYPE: cls for cls in CONTROL_EVENTS + BINARY_EVENTS}
_FIELDS = {cls: {name: hint for name, hint in typing.get_type_hints(cls).items() if typing.get_origin(hint) is not ClassVar}
           for cls in CONTROL_EVENTS}
