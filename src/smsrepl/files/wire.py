"""Byte layouts of file sessions: entry records and the operations of a round.

Both travel inside frames (TREE_DATA, FILE_OPS; see protocol.frames), as a
body of records, zstd-compressed when that pays. Big-endian integers.

Entry record::

    u8 kind | u32 mode | u32 uid | u32 gid | u64 size | i64 mtime_ns | u64 rdev |
    u32 nlink | u16 path length | u16 link length | u32 xattr bytes | u8 has digest |
    path | link | xattrs (u16 count, then per item u16 name length, name,
    u32 value length, value) | 16-byte XXH3-128 of the content if has digest

Operations (u8 opcode, then)::

    ROOT, DIR, SYMLINK, SPECIAL, META   entry
    FILE      entry, then entry.size bytes of data (a whole small file)
    BEGIN     entry (a large file: its data follows in CHUNK operations)
    CHUNK     u32 length, data
    END       16-byte XXH3-128 of the file's data (checked before the rename)
    ABORT     (nothing: the file begun is dropped; it changed while being read)
    DELTA     entry, u32 block size (a large file rebuilt from the receiver's copy at
              the same path, the basis: COPY and CHUNK operations follow, then END)
    COPY      u64 first block, u64 count (blocks of the basis, in its block size)
    HARDLINK  entry, u16 length, path of the entry it is another name of
    DELETE    u16 length, path
"""
from __future__ import annotations

import builtins
import struct
from collections.abc import Iterator

from smsrepl.errors import RemoteProtocolError
from smsrepl.files.scan import Entry

KIND_CODES = {"file": 1, "dir": 2, "symlink": 3, "chardev": 4, "blockdev": 5, "fifo": 6, "socket": 7}
KINDS = {v: k for k, v in KIND_CODES.items()}
_ENTRY = struct.Struct(">BIIIQqQIHHIB")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

ROOT, DIR, FILE, SYMLINK, SPECIAL, META, BEGIN, CHUNK, END, HARDLINK, DELETE, ABORT, DELTA, COPY = range(1, 15)
OP_NAMES = {ROOT: "ROOT", DIR: "DIR", FILE: "FILE", SYMLINK: "SYMLINK", SPECIAL: "SPECIAL", META: "META",
            BEGIN: "BEGIN", CHUNK: "CHUNK", END: "END", HARDLINK: "HARDLINK", DELETE: "DELETE", ABORT: "ABORT",
            DELTA: "DELTA", COPY: "COPY"}
_WITH_ENTRY = {ROOT, DIR, FILE, SYMLINK, SPECIAL, META, BEGIN, HARDLINK, DELTA}
_COPY = struct.Struct(">QQ")
#: what an operation carries besides its entry: FILE and CHUNK data (memoryview), END's digest,
#: HARDLINK's and DELETE's path (bytes), DELTA's block size (int), COPY's (first, count)
OpData = memoryview | bytes | int | tuple[int, int] | None

#: a body (TREE_DATA records, FILE_OPS operations) is sent once this much is batched
#: (before compression)
BATCH = 4 << 20
#: files up to this size travel whole inside one FILE operation; larger ones in CHUNKs
INLINE = 256 << 10
#: literal data per CHUNK operation
CHUNK_MAX = 1 << 20
#: seconds without a frame after which one is sent anyway (the peer's idle timeout is 120 s)
KEEPALIVE = 20.0


def encode_entry(e: Entry, digest: bytes | None = None) -> bytes:
    xb = b""
    if e.xattrs:
        items = sorted(e.xattrs.items())
        xb = _U16.pack(len(items)) + b"".join(_U16.pack(len(k)) + k + _U32.pack(len(v)) + v for k, v in items)
    link = e.link or b""
    head = _ENTRY.pack(KIND_CODES[e.kind], e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.rdev, e.nlink,
                       len(e.path), len(link), len(xb), 1 if digest else 0)
    return head + e.path + link + xb + (digest or b"")


class Reader:
    """Reads records from a decoded body; any inconsistency is a RemoteProtocolError."""

    def __init__(self, body: bytes | memoryview) -> None:
        self.buf = memoryview(body)
        self.pos = 0

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise RemoteProtocolError("file record runs past the end of its frame")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def done(self) -> bool:
        return self.pos >= len(self.buf)

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return _U16.unpack(self._take(2))[0]

    def u32(self) -> int:
        return _U32.unpack(self._take(4))[0]

    def bytes(self, n: int) -> bytes:
        return bytes(self._take(n))

    def view(self, n: int) -> memoryview:
        return self._take(n)

    def entry(self) -> tuple[Entry, builtins.bytes | None]:
        (kind, mode, uid, gid, size, mtime, rdev, nlink, plen, llen, xlen,
         has_digest) = _ENTRY.unpack(self._take(_ENTRY.size))
        if kind not in KINDS:
            raise RemoteProtocolError(f"file record of unknown kind {kind}")
        if mode > 0o7777:
            raise RemoteProtocolError(f"file record with mode {mode:o} beyond permission bits")
        path = self.bytes(plen)
        link = self.bytes(llen) if llen or kind == KIND_CODES["symlink"] else None
        xattrs: dict = {}  # none travels as none: a target's extra ones are removed
        if xlen:
            sub = Reader(self._take(xlen))
            xattrs = {}
            for _ in range(sub.u16()):
                name = sub.bytes(sub.u16())
                xattrs[name] = sub.bytes(sub.u32())
            if not sub.done():
                raise RemoteProtocolError("xattr block longer than its items")
        digest = self.bytes(16) if has_digest else None
        if b"\0" in path or (link and b"\0" in link) or (xattrs and any(b"\0" in k or not k for k in xattrs)):
            raise RemoteProtocolError("file record with a NUL byte in its path, link or xattr name")
        return Entry(path, KINDS[kind], mode, uid, gid, size, mtime, 0, 0, nlink, rdev, link, xattrs), digest


def encode_op(op: int, entry: Entry | None = None, data: bytes | memoryview = b"", path: bytes = b"",
              block_size: int = 0, first: int = 0, count: int = 0) -> list:
    """Buffers of one operation (data is not copied)."""
    out: list = [bytes((op,))]
    if op in _WITH_ENTRY:
        if entry is None:
            raise ValueError(f"a {OP_NAMES[op]} operation needs an entry")
        out.append(encode_entry(entry))
    if op == DELTA:
        out.append(_U32.pack(block_size))
    elif op == COPY:
        out.append(_COPY.pack(first, count))
    if op == FILE:
        out.append(data)
    elif op == CHUNK:
        out += [_U32.pack(len(data)), data]
    elif op == END:
        out.append(bytes(data))
    elif op in (HARDLINK, DELETE):
        out += [_U16.pack(len(path)), path]
    return out


def decode_ops(body: bytes | memoryview) -> Iterator[tuple[int, Entry | None, OpData]]:
    """(opcode, entry, data or path) for each operation of a FILE_OPS body."""
    r = Reader(body)
    while not r.done():
        yield decode_op(r)


def decode_op(r: Reader) -> tuple[int, Entry | None, OpData]:
    """The operation at the reader's position (which moves past it)."""
    op = r.u8()
    if op not in OP_NAMES:
        raise RemoteProtocolError(f"unknown file operation {op}")
    entry = r.entry()[0] if op in _WITH_ENTRY else None
    if op == FILE and entry is not None:  # FILE always has one
        return op, entry, r.view(entry.size)
    if op == CHUNK:
        return op, None, r.view(r.u32())
    if op == END:
        return op, None, r.bytes(16)
    if op in (HARDLINK, DELETE):
        return op, entry, r.bytes(r.u16())
    if op == DELTA:
        return op, entry, r.u32()
    if op == COPY:
        return op, None, _COPY.unpack(r.view(_COPY.size))
    return op, entry, None
