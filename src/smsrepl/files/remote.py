"""Both ends of a file round over a channel, apart from the socket.

The receiver describes its tree (:func:`describe_tree` -> TREE_DATA frames);
the sender decides with the same logic as a local round (files.local), but
against :class:`RemoteTarget`, which turns each decision into operations
batched into FILE_OPS frames; the receiver applies them in order
(:class:`OpApplier`) through a TreeWriter.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import xxhash

from ..codec import Compressor, Decompressor
from ..errors import RemoteProtocolError
from ..protocol import frames as F
from . import wire as W
from .apply import FileSink, TreeWriter
from .compare import _digest
from .rules import RoundFilter
from .scan import Entry, walk

#: operations are sent once this much is batched (before compression)
BATCH = 4 << 20
#: files up to this size travel whole inside one operation; larger ones in CHUNKs
INLINE = 256 << 10


# --- receiver: describe -------------------------------------------------------
def describe_tree(root: str | bytes, *, checksum: bool = False, compressor: Compressor | None = None
                  ) -> Iterator[F.TreeData]:
    """TREE_DATA frames listing every entry under ``root`` (with content digests when asked)."""
    comp = compressor or Compressor()
    top = os.fsencode(root)
    parts: list[bytes] = []
    size = 0
    for e in walk(top, xattrs=True, on_error=lambda p, exc: None):
        digest = _digest(top + b"/" + e.path) if checksum and e.kind == "file" else None
        rec = W.encode_entry(e, digest)
        parts.append(rec)
        size += len(rec)
        if size >= BATCH:
            yield _records(F.TreeData, comp, parts, last=False)
            parts, size = [], 0
    yield _records(F.TreeData, comp, parts, last=True)


def _records(cls, comp: Compressor, parts: list, **kw):
    body = b"".join(parts) or b"\0"  # never empty: an empty TREE_DATA carries one padding byte
    codec, payload = comp.encode(body)
    return cls(codec=codec, raw_len=len(body), payload=payload, **kw)


# --- sender: the receiver's tree, and operations ------------------------------
class Listing:
    """The receiver's tree as received: path -> (entry, content digest or None)."""

    def __init__(self) -> None:
        self.entries: dict[bytes, tuple[Entry, bytes | None]] = {}
        self.done = False

    def add(self, ev: F.TreeData, decomp: Decompressor) -> None:
        if self.done:
            raise RemoteProtocolError("TREE_DATA after the last one")
        body = decomp.decode(ev.codec, ev.payload, ev.raw_len)
        r = W.Reader(body)
        if len(body) == 1 and bytes(body) == b"\0":
            r.pos = 1
        while not r.done():
            e, digest = r.entry()
            self.entries[e.path] = (e, digest)
        self.done = ev.last


class OpStream:
    """Operations batched into FILE_OPS frames, handed to ``send``."""

    def __init__(self, send: Callable[[F.Event], None], compressor: Compressor) -> None:
        self.send = send
        self.comp = compressor
        self.parts: list = []
        self.size = 0
        self.frames = 0
        self.raw_bytes = 0

    def add(self, buffers: list) -> None:
        self.parts += buffers
        self.size += sum(len(b) for b in buffers)
        if self.size >= BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        body = b"".join(self.parts)
        codec, payload = self.comp.encode(body)
        self.send(F.FileOps(codec, len(body), payload))
        self.frames += 1
        self.raw_bytes += len(body)
        self.parts, self.size = [], 0


class RemoteSink:
    """A file on its way: small ones go whole in a FILE operation, large ones as BEGIN, CHUNKs, END."""

    def __init__(self, ops: OpStream, entry: Entry) -> None:
        self.ops, self.entry = ops, entry
        self.inline = entry.size <= INLINE
        self.buf: list[bytes] = []
        self.digest = xxhash.xxh3_128()
        if not self.inline:
            ops.add(W.encode_op(W.BEGIN, entry))

    def write(self, data: bytes) -> None:
        if self.inline:
            self.buf.append(data)
        else:
            self.digest.update(data)
            self.ops.add(W.encode_op(W.CHUNK, data=data))

    def commit(self) -> None:
        if self.inline:
            self.ops.add(W.encode_op(W.FILE, self.entry, data=b"".join(self.buf)))
        else:
            self.ops.add(W.encode_op(W.END, data=self.digest.digest()))

    def abort(self) -> None:
        if not self.inline:
            self.ops.add(W.encode_op(W.ABORT))


def _same_meta(a: Entry, b: Entry) -> bool:
    return (a.kind, a.mode, a.uid, a.gid, a.mtime_ns, a.xattrs or {}) == (b.kind, b.mode, b.uid, b.gid, b.mtime_ns,
                                                                          b.xattrs or {})


class RemoteTarget:
    """files.local's target interface, for a receiver at the far end of a channel."""

    def __init__(self, listing: Listing, ops: OpStream) -> None:
        self.listing = listing.entries
        self.ops = ops
        self.reported: list[str] = []
        self.temporaries_removed = 0  # the receiver removes them at RoundBegin

    def existing(self, path: bytes) -> Entry | None:
        got = self.listing.get(path)
        return got[0] if got else None

    def content_digest(self, path: bytes) -> bytes | None:
        got = self.listing.get(path)
        return got[1] if got else None

    def paths(self, filt: RoundFilter | None):
        for path in sorted(self.listing):
            if not path or filt is None or filt.includes(tuple(path.split(b"/"))):
                yield path

    def set_root_meta(self, e: Entry) -> None:
        self.ops.add(W.encode_op(W.ROOT, e))

    def mkdir(self, e: Entry) -> None:
        self.ops.add(W.encode_op(W.DIR, e))

    def symlink(self, e: Entry) -> None:
        self.ops.add(W.encode_op(W.SYMLINK, e))

    def special(self, e: Entry) -> None:
        self.ops.add(W.encode_op(W.SPECIAL, e))

    def hardlink(self, e: Entry, to: bytes) -> None:
        self.ops.add(W.encode_op(W.HARDLINK, e, path=to))

    def set_meta(self, e: Entry) -> None:
        have = self.existing(e.path)
        if have is None or not _same_meta(have, e):
            self.ops.add(W.encode_op(W.META, e))

    def delete(self, path: bytes) -> None:
        self.ops.add(W.encode_op(W.DELETE, path=path))

    def open_file(self, e: Entry) -> RemoteSink:
        return RemoteSink(self.ops, e)

    def finish(self) -> None:
        self.ops.flush()


# --- receiver: apply ----------------------------------------------------------
class OpApplier:
    """Applies FILE_OPS frames, in order, under a target root."""

    def __init__(self, writer: TreeWriter) -> None:
        self.w = writer
        self.decomp = Decompressor()
        self.sink: FileSink | None = None
        self.files = 0
        self.bytes = 0

    def apply(self, ev: F.FileOps) -> None:
        body = self.decomp.decode(ev.codec, ev.payload, ev.raw_len)
        w = self.w
        for op, entry, data in W.decode_ops(body):
            if (self.sink is None) != (op not in (W.CHUNK, W.END, W.ABORT)):
                raise RemoteProtocolError(f"file operation {W.OP_NAMES[op]} out of place")
            if op == W.ROOT:
                w.set_root_meta(entry)
            elif op == W.DIR:
                w.mkdir(entry)
            elif op == W.FILE:
                self._kind(entry, "file")
                w.write_file(entry, [data])
                self.files += 1
                self.bytes += entry.size
            elif op == W.BEGIN:
                self._kind(entry, "file")
                self.sink = w.open_file(entry)
            elif op == W.CHUNK:
                self.sink.write(data)
                self.bytes += len(data)
            elif op == W.END:
                sink, self.sink = self.sink, None
                sink.commit(data)
                self.files += 1
            elif op == W.ABORT:
                sink, self.sink = self.sink, None
                sink.abort()
            elif op == W.SYMLINK:
                self._kind(entry, "symlink")
                w.symlink(entry)
            elif op == W.SPECIAL:
                if entry.kind in ("file", "dir", "symlink"):
                    raise RemoteProtocolError(f"SPECIAL operation for a {entry.kind}")
                w.special(entry)
            elif op == W.META:
                if w.existing(entry.path) is not None:
                    w.set_meta(entry)
            elif op == W.HARDLINK:
                self._kind(entry, "file")
                w.hardlink(entry, bytes(data))
            elif op == W.DELETE:
                w.delete(bytes(data))

    @staticmethod
    def _kind(entry: Entry, want: str) -> None:
        if entry.kind != want:
            raise RemoteProtocolError(f"operation for a {want} carries a {entry.kind} entry")

    def close(self) -> None:
        if self.sink is not None:
            self.sink.abort()
            self.sink = None
