"""The receiver's side of a file round: FILE_OPS frames applied, in order, under its target.

An :class:`OpApplier` decodes each frame's operations (files.wire) and applies them
through a TreeWriter (files.apply): runs of small files natively, large files
through a sink whose data is checked against the digest its END carries, deltas
rebuilt from the receiver's copy (the basis). Anything out of place is a
RemoteProtocolError; a system call that fails, a TargetWriteError naming the entry.
"""
from __future__ import annotations

import os
from typing import cast

from smsrepl.codec import Decompressor
from smsrepl.errors import RemoteProtocolError, TargetWriteError
from smsrepl.files import wire as W
from smsrepl.files.apply import FileSink, TreeWriter
from smsrepl.files.scan import Entry
from smsrepl.protocol import frames as F

#: operations for the file a BEGIN or DELTA opened (and only then)
_TO_SINK = frozenset((W.CHUNK, W.END, W.ABORT, W.COPY))


class OpApplier:
    """Applies FILE_OPS frames, in order, under a target root."""

    def __init__(self, writer: TreeWriter) -> None:
        self.w = writer
        self.decomp = Decompressor()
        self.sink: FileSink | None = None
        self.basis: int = -1  # descriptor of the file a DELTA rebuilds from
        self.basis_blocks = 0
        self.bs = 0
        self.files = 0
        self.bytes = 0

    def apply(self, ev: F.FileOps) -> None:
        body = self.decomp.decode(ev.codec, ev.payload, ev.raw_len)
        r = W.Reader(body)
        while not r.done():
            if self.sink is None and body[r.pos] == W.FILE:
                end, files, nbytes = self.w.write_run(body, r.pos)  # a run of small files, natively
                if end != r.pos:
                    r.pos = end
                    self.files += files
                    self.bytes += nbytes
                    continue
            op = body[r.pos]
            entry = None
            try:
                op, entry, data = W.decode_op(r)
                self._apply(op, entry, data)
            except OSError as exc:  # a system call refused: the sender hears it as SMS.2007
                # a CHUNK or END names no file: it is the one the open sink writes
                named = entry if entry is not None else (self.sink.entry if self.sink is not None else None)
                what = f"{os.fsdecode(named.path)!r}" if named is not None else "the target tree"
                raise TargetWriteError(f"writing {what} ({W.OP_NAMES.get(op, op)}): {exc.strerror or exc}") from None

    def _apply(self, op: int, entry: Entry | None, data: W.OpData) -> None:
        if op in _TO_SINK:
            if self.sink is None or (op == W.COPY and self.basis < 0):
                raise RemoteProtocolError(f"file operation {W.OP_NAMES[op]} out of place")
            self._to_sink(self.sink, op, data)
        elif self.sink is not None:
            raise RemoteProtocolError(f"file operation {W.OP_NAMES[op]} out of place")
        elif entry is None:  # DELETE: the only other operation without an entry
            self.w.delete(bytes(cast(bytes, data)))
        else:
            self._entry_op(op, entry, data)

    def _to_sink(self, sink: FileSink, op: int, data: W.OpData) -> None:
        """CHUNK, COPY, END or ABORT: the file a BEGIN or DELTA opened."""
        if op == W.CHUNK:
            chunk = cast(memoryview, data)
            sink.write(chunk)
            self.bytes += len(chunk)
        elif op == W.COPY:
            self._copy(sink, *cast("tuple[int, int]", data))
        elif op == W.END:
            self.sink = None
            self._close_basis()
            sink.commit(cast(bytes, data))
            self.files += 1
        else:  # ABORT
            self.sink = None
            self._close_basis()
            sink.abort()

    def _entry_op(self, op: int, entry: Entry, data: W.OpData) -> None:
        w = self.w
        if op == W.ROOT:
            w.set_root_meta(entry)
        elif op == W.DIR:
            w.mkdir(entry)
        elif op == W.FILE:
            self._kind(entry, "file")
            w.write_small(entry, data)
            self.files += 1
            self.bytes += entry.size
        elif op == W.BEGIN:
            self._kind(entry, "file")
            self.sink = w.open_file(entry, digest=True)
        elif op == W.DELTA:
            self._kind(entry, "file")
            self._open_basis(entry.path, cast(int, data))
            self.sink = w.open_file(entry, digest=True)
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
            w.hardlink(entry, bytes(cast(bytes, data)))

    def _open_basis(self, path: bytes, block_size: int) -> None:
        if not 0 < block_size <= 1 << 24:
            raise RemoteProtocolError(f"DELTA block size {block_size} out of range")
        self.basis = self.w.open_regular(path)
        if self.basis < 0:
            raise RemoteProtocolError(f"DELTA for {os.fsdecode(path)!r}, which is not a regular file here")
        self.bs = block_size
        self.basis_blocks = -(-os.fstat(self.basis).st_size // block_size)

    def _copy(self, sink: FileSink, first: int, count: int) -> None:
        if count <= 0 or first + count > self.basis_blocks:
            raise RemoteProtocolError(f"COPY of blocks {first}+{count} beyond the basis' {self.basis_blocks}")
        pos, end = first * self.bs, (first + count) * self.bs
        while pos < end:
            data = os.pread(self.basis, min(end - pos, 8 << 20), pos)
            if not data:
                break  # the basis' short last block
            sink.write(data)
            self.bytes += len(data)
            pos += len(data)

    def _close_basis(self) -> None:
        if self.basis >= 0:
            os.close(self.basis)
            self.basis = -1

    @staticmethod
    def _kind(entry: Entry, want: str) -> None:
        if entry.kind != want:
            raise RemoteProtocolError(f"operation for a {want} carries a {entry.kind} entry")

    def close(self) -> None:
        self._close_basis()
        if self.sink is not None:
            self.sink.abort()
            self.sink = None
