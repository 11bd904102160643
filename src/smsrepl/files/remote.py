"""The sender's side of a file round: its decisions as operations for the receiver.

:class:`RemoteTarget` is the round target (files.target) for a receiver at the far
end of a channel: it answers from the receiver's listing (files.listing) and turns
each decision into operations (files.wire) on an OpStream (files.opstream). A file
goes whole (FILE), in CHUNKs, or as a delta against the receiver's copy (DELTA,
COPY and CHUNKs, found by the rsync search in the native core); the receiver
applies them with files.opapply.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import xxhash

from smsrepl import kernels
from smsrepl._lazy import np
from smsrepl.files import wire as W
from smsrepl.files.liveread import SETTLE_NS
from smsrepl.files.listing import Listing
from smsrepl.files.opstream import OpStream
from smsrepl.files.rules import RoundFilter
from smsrepl.files.scan import Entry
from smsrepl.files.target import DirRoundTarget

#: a changed file at least this large, with a copy on the receiver, goes as a delta against it
DELTA_MIN = 1 << 20
#: new data searched against the basis signature per call (bounded memory for any file size)
DELTA_WINDOW = 16 << 20

#: (path, block size) -> (size, weak hashes, strong hashes) of the receiver's copy (size 0: none)
Signature = Callable[[bytes, int], tuple[int, "np.ndarray", "np.ndarray"]]


class RemoteSink:
    """A file on its way: small ones go whole in a FILE operation, large ones as BEGIN, CHUNKs, END."""

    def __init__(self, ops: OpStream, entry: Entry) -> None:
        self.ops, self.entry = ops, entry
        self.inline = entry.size <= W.INLINE
        self.buf: list[bytes] = []
        if not self.inline:
            self.digest = xxhash.xxh3_128()  # END carries it; a whole small file needs none
            ops.add(W.encode_op(W.BEGIN, entry))

    def write(self, data: bytes) -> None:
        if self.inline:
            self.buf.append(data)
        else:
            self.digest.update(data)
            self.ops.add(W.encode_op(W.CHUNK, data=data))

    def commit(self) -> None:
        if self.inline:
            data = self.buf[0] if len(self.buf) == 1 else b"".join(self.buf)
            self.ops.add(W.encode_op(W.FILE, self.entry, data=data))
        else:
            self.ops.add(W.encode_op(W.END, data=self.digest.digest()))

    def abort(self) -> None:
        if not self.inline:
            self.ops.add(W.encode_op(W.ABORT))


class DeltaSink:
    """A large changed file sent as COPY operations (blocks the receiver's copy already has)
    and literal CHUNKs, found by the rsync search (kernels.delta_search) window by window."""

    def __init__(self, ops: OpStream, entry: Entry, block_size: int, basis_size: int, weak: np.ndarray,
                 strong: np.ndarray, counter: RemoteTarget | None = None) -> None:
        self.ops, self.entry, self.bs = ops, entry, block_size
        self.counter = counter
        self.basis_size, self.weak, self.strong = basis_size, weak, strong
        self.buf = bytearray()
        self.digest = xxhash.xxh3_128()
        ops.add(W.encode_op(W.DELTA, entry, block_size=block_size))

    def write(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= DELTA_WINDOW:
            self._search(len(self.buf) // self.bs * self.bs)

    def _search(self, n: int) -> None:
        window = memoryview(self.buf)[:n]
        self.digest.update(window)
        rows = kernels.delta_search(self.weak, self.strong, self.bs, self.basis_size, window)
        for kind, a, b in rows.tolist():
            if kind == 1:
                self.ops.add(W.encode_op(W.COPY, first=a, count=b))
                continue
            if self.counter is not None:
                self.counter.literal_bytes += b
            for off in range(a, a + b, W.CHUNK_MAX):
                self.ops.add(W.encode_op(W.CHUNK, data=bytes(window[off:min(a + b, off + W.CHUNK_MAX)])))
        window.release()
        del self.buf[:n]

    def commit(self) -> None:
        if self.buf:
            self._search(len(self.buf))
        self.ops.add(W.encode_op(W.END, data=self.digest.digest()))

    def abort(self) -> None:
        self.ops.add(W.encode_op(W.ABORT))


def _same_meta(a: Entry, b: Entry) -> bool:
    return (a.kind, a.mode, a.uid, a.gid, a.mtime_ns, a.xattrs or {}) == (b.kind, b.mode, b.uid, b.gid, b.mtime_ns,
                                                                          b.xattrs or {})


class RemoteTarget(DirRoundTarget):
    """A round's target (files.target) at the far end of a channel, a directory at a time."""

    def __init__(self, listing: Listing, ops: OpStream, signature: Signature | None = None) -> None:
        self.listing = listing
        self.ops = ops
        #: signature(path, block_size) -> (file size, weak, strong) of the receiver's copy; None: no deltas
        self.signature = signature
        self.literal_bytes = 0
        self.reported: list[str] = []
        self.temporaries_removed = 0  # the receiver removes them while it lists its tree
        self.deletion_limit: Callable[[int, int], None] | None = None

    def existing(self, path: bytes) -> Entry | None:
        got = self.listing.lookup(path)
        return got[0] if got else None

    def content_digest(self, path: bytes) -> bytes | None:
        got = self.listing.lookup(path)
        return got[1] if got else None

    def paths(self, filt: RoundFilter | None) -> Iterator[bytes]:
        for path in sorted(self.listing.entries):
            if not path or filt is None or filt.includes(tuple(path.split(b"/"))):
                yield path

    # --- a directory at a time (files.dirround) ---
    def dir_records(self, rel: bytes) -> bytes:
        if not self.listing.ready(rel):
            # about to wait for the receiver's listing: what is batched goes now, to be
            # applied as soon as the receiver has listed its tree
            self.ops.flush()
        return self.listing.records(rel)

    def gone(self, rel: bytes, indices: list[int]) -> tuple[list[bytes], list[bytes]]:
        """Paths of the records of directory ``rel`` at ``indices``, and those of them that are
        directories (what is below them is known once the whole listing arrived: below())."""
        items = self.listing.decoded(rel)
        paths = [items[j][0].path for j in indices]
        return paths, [items[j][0].path for j in indices if items[j][0].kind == "dir"]

    def below(self, path: bytes) -> list[bytes]:
        return self.listing.below(path)

    def read_files(self, dir_fd: int, records: bytes, indices: list[int], max_size: int) -> tuple[list[int], int, int]:
        """kernels.read_files straight into the batch buffers; (indices left for the careful
        path, files sent, bytes sent)."""
        left: list[int] = []
        files = nbytes = 0
        while indices:
            buf, pos = self.ops.space()
            end, taken, lft, f, b = kernels.read_files(dir_fd, records, indices, max_size, buf, pos,
                                                       time.time_ns() - SETTLE_NS)
            left += lft
            files += f
            nbytes += b
            indices = indices[taken:]
            if indices and not taken and not pos:
                raise ValueError("a small file larger than a batch")  # W.INLINE < CAPACITY: never
            if indices and not taken:
                self.ops.flush()
            else:
                self.ops.advance(end)
        return left, files, nbytes

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

    def open_file(self, e: Entry, basis: Entry | None = None) -> RemoteSink | DeltaSink:
        if (self.signature is not None and basis is not None and basis.kind == "file"
                and min(basis.size, e.size) >= DELTA_MIN):
            bs = kernels.delta_block_size(basis.size)
            self.ops.drain()  # the request must follow what came before on the channel
            size, weak, strong = self.signature(e.path, bs)
            if size:
                return DeltaSink(self.ops, e, bs, size, weak, strong, counter=self)
        return RemoteSink(self.ops, e)

    def finish(self) -> None:
        self.ops.drain()

