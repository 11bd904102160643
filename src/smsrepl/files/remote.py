"""Both ends of a file round over a channel, apart from the socket.

The receiver describes its tree (:func:`describe_tree` -> TREE_DATA frames);
the sender decides with the same logic as a local round (files.local), but
against :class:`RemoteTarget`, which turns each decision into operations
batched into FILE_OPS frames; the receiver applies them in order
(:class:`OpApplier`) through a TreeWriter.
"""
from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import xxhash

from smsrepl import kernels
from smsrepl.codec import RAW, AdaptiveChoice, Compressor, Decompressor
from smsrepl.errors import RemoteProtocolError, TargetWriteError
from smsrepl.protocol import frames as F
from smsrepl.files import wire as W
from smsrepl.files.apply import TEMP_RE, FileSink, TreeWriter, remove_temporaries
from smsrepl.files.compare import content_digest
from smsrepl.files.dirscan import scan_dirs, without_temporaries
from smsrepl.files.rules import RoundFilter
from smsrepl.files.scan import Entry, root_entry, walk

#: operations are sent once this much is batched (before compression)
BATCH = 4 << 20
#: ... or once the batch's first operation is this many seconds old: operations that trickle
#: in (a sync round's few changed files) reach the receiver as the round goes, not at its end
BATCH_AGE = 0.02
#: records per TREE_DATA of a streamed listing (~1,500 entries): the sender starts early
STREAM_BATCH = 128 << 10
#: files up to this size travel whole inside one operation; larger ones in CHUNKs
INLINE = 256 << 10
#: a changed file at least this large, with a copy on the receiver, goes as a delta against it
DELTA_MIN = 1 << 20
#: new data searched against the basis signature per call (bounded memory for any file size)
DELTA_WINDOW = 16 << 20
#: literal data per CHUNK operation
CHUNK_MAX = 1 << 20
#: seconds without a frame after which one is sent anyway (the peer's idle timeout is 120 s)
KEEPALIVE = 20.0


# --- receiver: describe -------------------------------------------------------
def describe_tree(root: str | bytes, *, checksum: bool = False, compressor: Compressor | None = None,
                  stream: bool = False, dirs=None, keep_temporaries: bool = False) -> Iterator[F.TreeData]:
    """TREE_DATA frames listing every entry under ``root`` (with content digests when asked).
    Temporaries a killed round left (apply.TEMP_RE) are removed first, and not listed.

    With the native kernels and no digests, a directory's records are made in one call
    (files.dirscan), which also finds the temporaries (no walk of its own); the root's own
    entry is then not listed (nobody asks for it). The frames are then ordered (whole
    directories, breadth first), and with ``stream`` (a sender that listed "tree-stream")
    they go every STREAM_BATCH bytes: the sender decides while this end still lists.

    ``dirs``: a TREE_SUBSET's (path, recursive) pairs, native kernels only: those directories'
    entries, and with recursive those of every directory below them; directories that are
    not there are left out.

    ``keep_temporaries``: leave the temporaries where they are (still not listed): a dry run
    changes nothing."""
    comp = compressor or Compressor(1)  # records compress well at the cheapest level
    top = os.fsencode(root)
    ordered = kernels.TREE and not checksum
    batch = STREAM_BATCH if ordered and stream else BATCH
    if keep_temporaries and not os.path.isdir(top):  # a dry run's target not made yet: empty
        yield _records(F.TreeData, comp, [], last=True, ordered=ordered)
        return
    if dirs is not None:
        subset = [without_temporaries(top, b, remove=not keep_temporaries)
                  for b in scan_dirs(top, on_error=lambda p, exc: None, start=normal_subset(dirs))]
        subset.sort(key=lambda b: _order(b.rel))  # recursive ones interleave with the others by depth
        bodies = (b.records for b in subset)
    elif ordered:
        bodies = (without_temporaries(top, b, remove=not keep_temporaries).records
                  for b in scan_dirs(top, on_error=lambda p, exc: None))
    elif kernels.TREE:  # with digests: a directory's files read per call (a check's listing)
        from smsrepl.files.compare import records_with_digests

        root_rec = W.encode_entry(root_entry(top, xattrs=True))
        batches = (without_temporaries(top, b, remove=not keep_temporaries)
                   for b in scan_dirs(top, on_error=lambda p, exc: None))
        bodies = itertools.chain([root_rec], (records_with_digests(top, b.rel, b.records, b.names, b.kinds, b.ends)
                                              for b in batches))
    else:
        if not keep_temporaries:
            remove_temporaries(top)
        bodies = (W.encode_entry(e, content_digest(top + b"/" + e.path) if checksum and e.kind == "file" else None)
                  for e in walk(top, xattrs=True, on_error=lambda p, exc: None)
                  if not (keep_temporaries and any(TEMP_RE.match(c) for c in e.path.split(b"/"))))
    parts: list[bytes] = []
    size = 0
    last = time.monotonic()
    for rec in bodies:
        parts.append(rec)
        size += len(rec)
        # a batch at least every KEEPALIVE seconds: a long checksum scan must not look idle
        if size >= batch or time.monotonic() - last >= KEEPALIVE:
            yield _records(F.TreeData, comp, parts, last=False, ordered=ordered)
            parts, size, last = [], 0, time.monotonic()
    yield _records(F.TreeData, comp, parts, last=True, ordered=ordered)


def normal_subset(dirs) -> list[tuple[bytes, bool]]:
    """(path, recursive) pairs without repeats and without what a recursive one covers,
    sorted in listing order (breadth first)."""
    want: dict[bytes, bool] = {}
    for path, rec in dirs:
        want[bytes(path)] = want.get(bytes(path), False) or bool(rec)
    roots = [p for p, r in want.items() if r]

    def below_a_root(path: bytes) -> bool:
        return any(path != d and (not d or path.startswith(d + b"/")) for d in roots)

    return sorted(((p, r) for p, r in want.items() if not below_a_root(p)), key=lambda pr: _order(pr[0]))


def _records(cls, comp: Compressor, parts: list, **kw):
    body = b"".join(parts) or b"\0"  # never empty: an empty TREE_DATA carries one padding byte
    codec, payload = comp.encode(body)
    return cls(codec=codec, raw_len=len(body), payload=payload, **kw)


# --- sender: the receiver's tree, and operations ------------------------------
class Listing:
    """The receiver's tree as received, kept as each directory's records (decoded on demand):
    ``records(rel)`` for a directory-at-a-time round, ``lookup(path)`` -> (entry, content
    digest or None) for the per-entry one.

    An ordered listing (whole directories, breadth first) may still be arriving on the
    thread :meth:`follow` starts: a directory's records are final once a directory after
    it in that order arrived, and every question waits for that much of the listing."""

    ROOT = None  # the key of the root's own record

    def __init__(self) -> None:
        self.groups: dict[bytes | None, list[bytes]] = {}
        self._decoded: dict[bytes | None, list[tuple[Entry, bytes | None]]] = {}
        self._by_path: dict[bytes | None, dict[bytes, tuple[Entry, bytes | None]]] = {}
        self.done = False
        self.ordered: bool | None = None  # set by the first frame
        self._frontier: tuple = ()  # order key of the last directory received (ordered listings)
        self._failed: BaseException | None = None
        self._following = False
        self._cond = threading.Condition()

    def add(self, ev: F.TreeData, decomp: Decompressor) -> None:
        if self.done:
            raise RemoteProtocolError("TREE_DATA after the last one")
        if self.ordered is not None and ev.ordered != self.ordered:
            raise RemoteProtocolError("TREE_DATA both ordered and not in one listing")
        body = bytes(decomp.decode(ev.codec, ev.payload, ev.raw_len))
        groups = _groups(body) if body != b"\0" else []
        frontier = self._frontier
        if ev.ordered:
            for parent, _, _ in groups:
                key = _order(parent)
                if key <= frontier:
                    raise RemoteProtocolError("ordered TREE_DATA out of order (or a directory split)")
                frontier = key
        with self._cond:
            for parent, start, end in groups:
                self.groups.setdefault(parent, []).append(body[start:end])
            self.ordered = ev.ordered
            self._frontier = frontier
            self.done = ev.last
            self._cond.notify_all()

    def follow(self, next_frame: Callable[[], F.TreeData], decomp: Decompressor) -> threading.Thread:
        """Receive the rest of the listing (``next_frame()``) on a thread of its own; a failure
        there is raised by the next question that waits for the listing."""

        def run() -> None:
            try:
                while not self.done:
                    self.add(next_frame(), decomp)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                with self._cond:
                    self._failed = exc
                    self._cond.notify_all()

        thread = threading.Thread(target=run, name="listing", daemon=True)
        self._following = True
        thread.start()
        return thread

    def ready(self, rel: bytes | None) -> bool:
        """Whether directory ``rel``'s records are final (wait() would not block)."""
        return self._final(_order(rel))

    def _final(self, key: tuple | None) -> bool:
        """Whether the records up to order ``key`` (None: all of them) are in. An unordered
        listing's frontier stays empty: only its end makes anything final."""
        return self.done or (key is not None and self._frontier >= key)

    def wait(self, rel: bytes | None = None, *, whole: bool = False) -> None:
        """Until directory ``rel``'s records are final (the whole listing with ``whole``)."""
        if self.done:
            return
        if not self._following:
            raise RuntimeError("the listing is incomplete and nothing receives the rest")
        key = None if whole else _order(rel)
        with self._cond:
            while not self._final(key) and self._failed is None:
                self._cond.wait()
            if not self.done and self._failed is not None:
                raise self._failed

    def records(self, rel: bytes) -> bytes:
        self.wait(rel)
        parts = self.groups.get(rel)
        if not parts:
            return b""
        if len(parts) > 1:
            parts[:] = [b"".join(parts)]
        return parts[0]

    def decoded(self, rel: bytes | None) -> list[tuple[Entry, bytes | None]]:
        got = self._decoded.get(rel)
        if got is None:
            r, got = W.Reader(self.records(rel)), []
            while not r.done():
                got.append(r.entry())
            self._decoded[rel] = got
            self._by_path[rel] = {e.path: (e, d) for e, d in got}
        return got

    def lookup(self, path: bytes) -> tuple[Entry, bytes | None] | None:
        parent = path.rpartition(b"/")[0] if path else self.ROOT
        self.wait(parent)
        if parent not in self.groups:
            return None
        self.decoded(parent)
        return self._by_path[parent].get(path)

    def below(self, path: bytes) -> list[bytes]:
        """Paths listed under directory ``path`` (at any depth)."""
        self.wait(whole=True)
        pre = path + b"/"
        return [e.path for rel in list(self.groups) if rel is not None and (rel == path or rel.startswith(pre))
                for e, _ in self.decoded(rel)]

    @property
    def entries(self) -> dict[bytes, tuple[Entry, bytes | None]]:
        """Every entry: path -> (entry, content digest or None)."""
        self.wait(whole=True)
        out = {}
        for rel in list(self.groups):
            out.update((e.path, (e, d)) for e, d in self.decoded(rel))
        return out


def _order(rel: bytes | None) -> tuple:
    """A directory's place in a breadth-first listing: depth, then its path's components as bytes."""
    if rel is None:
        return (-1,)
    parts = rel.split(b"/") if rel else []
    return (len(parts), parts)


def _groups(body: bytes) -> list[tuple[bytes | None, int, int]]:
    """(parent directory, start, end) of each run of records of ``body`` with one parent."""
    if kernels.TREE:
        try:
            return kernels.group_records(body)
        except ValueError as exc:
            raise RemoteProtocolError(str(exc)) from None
    out: list[tuple[bytes | None, int, int]] = []
    r = W.Reader(body)
    while not r.done():
        start = r.pos
        e, _ = r.entry()
        parent = e.path.rpartition(b"/")[0] if e.path else Listing.ROOT
        if out and out[-1][0] == parent and parent is not Listing.ROOT:
            out[-1] = (parent, out[-1][1], r.pos)
        else:
            out.append((parent, start, r.pos))
    return out


class OpStream:
    """Operations batched into FILE_OPS frames, compressed and handed to ``send`` on a worker
    thread (in order), so the next batch is read while this one is compressed and sent.

    Batches are built in place in a few buffers made as needed and reused (``space()`` and
    ``advance()`` let files be read straight into them): a fresh 4 MiB buffer per frame
    costs a page fault per 4 KiB, a fifth of a sender's time with many small files. They
    are anonymous mappings: no zeroing, and a round that sends little touches little (three
    zeroed buffers cost a sync round of a 50,000-file tree 10-30 ms before its first frame).

    With ``adaptive``, compression is used only while it moves data faster than sending it
    raw: on a link faster than the compressor (a LAN, loopback) it costs time and CPU for
    nothing; on a slow or throttled link it saves time. The two rates are measured as the
    round goes (raw bytes per second through compress-and-send, and through send alone;
    see codec.AdaptiveChoice) and the faster wins."""

    #: a batch buffer: a whole batch, and the largest single operation that may start it
    CAPACITY = BATCH + INLINE + CHUNK_MAX + (256 << 10)
    #: batches in flight at most (each holds its buffer until sent)
    IN_FLIGHT = 2

    def __init__(self, send: Callable[[F.Event], None], compressor: Compressor, pace: Callable[[], object] | None = None,
                 *, adaptive: bool = False) -> None:
        self.send = send
        self.comp = compressor
        self.pace = pace  # a CPU cap's pace(), once per frame
        # one worker compresses then sends: a compressed batch's send time includes its compression
        self.adapt = AdaptiveChoice(1, (0, compressor.level), pipelined=False) \
            if adaptive and compressor.level != 0 else None
        self._free: list[mmap.mmap] = []
        self._pins: list = []  # ctypes views of the buffers (made with them in space())
        self._address: dict[int, int] = {}  # id(buffer) -> its address, for ctypes.memmove
        self._buf: mmap.mmap | None = None
        self._pos = 0
        self._since = 0.0  # when the batch got its first operation
        self.frames = 0
        self.raw_bytes = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="file-ops")
        self._inflight: deque[tuple[Future, mmap.mmap | None]] = deque()
        self._last = time.monotonic()

    @property
    def size(self) -> int:
        """Bytes batched and not yet handed to the worker."""
        return self._pos

    def keepalive(self) -> None:
        """Call often: after KEEPALIVE seconds without a frame, send what is batched, or a PING."""
        if time.monotonic() - self._last < KEEPALIVE:
            return
        self._last = time.monotonic()
        if self._pos:
            self.flush()
        else:
            self._inflight.append((self._pool.submit(self.send, F.Ping(0, time.monotonic_ns(), 0)), None))

    def space(self) -> tuple[mmap.mmap, int]:
        """The batch buffer and where its free part starts (write there, then advance())."""
        if self._buf is None:
            if not self._free:  # at most IN_FLIGHT + 1 are ever made: flush() waits
                buf = mmap.mmap(-1, self.CAPACITY)
                pin = (ctypes.c_char * len(buf)).from_buffer(buf)  # its address, for memmove
                self._pins.append(pin)
                self._address[id(buf)] = ctypes.addressof(pin)
                self._free.append(buf)
            self._buf = self._free.pop()
        return self._buf, self._pos

    def advance(self, end: int) -> None:
        """Bytes up to ``end`` of the batch buffer were written."""
        if not self._pos:
            self._since = time.monotonic()
        self._pos = end
        if end >= BATCH or time.monotonic() - self._since >= BATCH_AGE:
            self.flush()

    def add(self, buffers: list) -> None:
        buf, pos = self.space()
        need = sum(map(len, buffers))
        if pos and pos + need > self.CAPACITY:
            self.flush()
            buf, pos = self.space()
        if need > self.CAPACITY:
            raise ValueError(f"a file operation of {need} bytes exceeds a batch")
        for b in buffers:
            n = len(b)
            if n >= 1 << 16 and isinstance(b, bytes):
                # through libc: ctypes lets go of the GIL, which a worker timing its send for
                # the adaptive choice would otherwise wait for
                ctypes.memmove(self._address[id(buf)] + pos, b, n)
            else:
                buf[pos:pos + n] = b
            pos += n
        self.advance(pos)

    def flush(self) -> None:
        """Hand the batch to the worker; at most IN_FLIGHT batches wait (bounded memory)."""
        if not self._pos:
            return
        buf, n = self._buf, self._pos
        self._buf, self._pos = None, 0
        self._wait(self.IN_FLIGHT - 1)
        self._inflight.append((self._pool.submit(self._send, buf, n), buf))

    def _wait(self, keep: int) -> None:
        while len(self._inflight) > keep:
            fut, buf = self._inflight.popleft()
            fut.result()  # re-raises a send failure here
            if buf is not None:
                self._free.append(buf)

    @property
    def rates(self) -> dict[int, float | None]:
        """level (0: raw) -> raw bytes per second through the worker, as measured so far."""
        return {lv: self.adapt.rate(lv) for lv in self.adapt.levels} if self.adapt is not None else {}

    def _send(self, buf: mmap.mmap, n: int) -> None:
        t0 = self._last = time.monotonic()
        body = memoryview(buf)[:n]
        level = self.comp.level if self.adapt is None else self.adapt.choose()
        codec, payload = self.comp.encode(body) if level else (RAW, body)
        t1 = time.monotonic()
        self.send(F.FileOps(codec, n, payload))
        if self.adapt is not None:
            if level:
                self.adapt.record_compress(level, n, t1 - t0)
            self.adapt.record_send(level, n, len(payload), time.monotonic() - t1)
        if self.pace is not None:
            self.pace()
        self.frames += 1
        self.raw_bytes += n

    def drain(self) -> None:
        """Flush, and wait until everything reached the channel."""
        self.flush()
        self._wait(0)

    def close(self) -> None:
        for f, _ in self._inflight:
            f.cancel()
        self._pool.shutdown(wait=True)
        self._inflight.clear()


class RemoteSink:
    """A file on its way: small ones go whole in a FILE operation, large ones as BEGIN, CHUNKs, END."""

    def __init__(self, ops: OpStream, entry: Entry) -> None:
        self.ops, self.entry = ops, entry
        self.inline = entry.size <= INLINE
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

    def __init__(self, ops: OpStream, entry: Entry, block_size: int, basis_size: int, weak, strong,
                 counter: "RemoteTarget | None" = None) -> None:
        self.ops, self.entry, self.bs = ops, entry, block_size
        self.counter = counter
        self.basis_size, self.weak, self.strong = basis_size, weak, strong
        self.buf = bytearray()
        self.digest = xxhash.xxh3_128()
        self.literal = 0
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
            self.literal += b
            if self.counter is not None:
                self.counter.literal_bytes += b
            for off in range(a, a + b, CHUNK_MAX):
                self.ops.add(W.encode_op(W.CHUNK, data=bytes(window[off:min(a + b, off + CHUNK_MAX)])))
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


class RemoteTarget:
    """files.local's target interface, for a receiver at the far end of a channel."""

    def __init__(self, listing: Listing, ops: OpStream, signature: Callable | None = None) -> None:
        self.listing = listing
        self.ops = ops
        #: signature(path, block_size) -> (file size, weak, strong) of the receiver's copy; None: no deltas
        self.signature = signature
        self.literal_bytes = 0
        self.reported: list[str] = []
        self.temporaries_removed = 0  # the receiver removes them while it lists its tree

    def existing(self, path: bytes) -> Entry | None:
        got = self.listing.lookup(path)
        return got[0] if got else None

    def content_digest(self, path: bytes) -> bytes | None:
        got = self.listing.lookup(path)
        return got[1] if got else None

    def paths(self, filt: RoundFilter | None):
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
        from smsrepl.files.local import SETTLE_NS

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
                raise ValueError("a small file larger than a batch")  # INLINE < CAPACITY: never
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


# --- receiver: apply ----------------------------------------------------------
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

    def _apply(self, op: int, entry: Entry | None, data) -> None:
        w = self.w
        if (self.sink is None) != (op not in (W.CHUNK, W.END, W.ABORT, W.COPY)) or (
                op == W.COPY and self.basis < 0):
            raise RemoteProtocolError(f"file operation {W.OP_NAMES[op]} out of place")
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
        elif op == W.CHUNK:
            self.sink.write(data)
            self.bytes += len(data)
        elif op == W.DELTA:
            self._kind(entry, "file")
            self._open_basis(entry.path, data)
            self.sink = w.open_file(entry, digest=True)
        elif op == W.COPY:
            self._copy(*data)
        elif op == W.END:
            sink, self.sink = self.sink, None
            self._close_basis()
            sink.commit(data)
            self.files += 1
        elif op == W.ABORT:
            sink, self.sink = self.sink, None
            self._close_basis()
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

    def _open_basis(self, path: bytes, block_size: int) -> None:
        if not 0 < block_size <= 1 << 24:
            raise RemoteProtocolError(f"DELTA block size {block_size} out of range")
        self.basis = open_regular(self.w, path)
        if self.basis < 0:
            raise RemoteProtocolError(f"DELTA for {os.fsdecode(path)!r}, which is not a regular file here")
        self.bs = block_size
        self.basis_blocks = -(-os.fstat(self.basis).st_size // block_size)

    def _copy(self, first: int, count: int) -> None:
        if count <= 0 or first + count > self.basis_blocks:
            raise RemoteProtocolError(f"COPY of blocks {first}+{count} beyond the basis' {self.basis_blocks}")
        pos, end = first * self.bs, (first + count) * self.bs
        while pos < end:
            data = os.pread(self.basis, min(end - pos, 8 << 20), pos)
            if not data:
                break  # the basis' short last block
            self.sink.write(data)
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


def open_regular(w: TreeWriter, path: bytes) -> int:
    """A read descriptor of the regular file at ``path`` under the writer's root (never through
    a symlink), or -1 where there is none."""
    from smsrepl.files.apply import check_path

    parts = check_path(path)
    try:
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=w.dir_fd(parts[:-1]))
    except OSError:
        return -1
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return -1
    return fd


def signature_frames(w: TreeWriter, req: F.SigRequest) -> Iterator[F.SigData]:
    """SIG_DATA frames for the receiver's copy of ``req.path`` (one empty frame where there is none)."""
    import numpy as np

    bs = req.block_size
    if not 0 < bs <= 1 << 24:
        raise RemoteProtocolError(f"SIG_REQUEST block size {bs} out of range")
    fd = open_regular(w, req.path)
    if fd < 0:
        yield F.SigData(True, bs, 0, 0, np.empty(0, np.uint32), np.empty(0, np.uint64))
        return
    try:
        size = os.fstat(fd).st_size
        nblocks = -(-size // bs)
        per = max(1, min(F.MAX_SIG, (8 << 20) // bs))  # blocks per read, and per frame
        first = 0
        while True:
            data = os.pread(fd, per * bs, first * bs) if first < nblocks else b""
            n = -(-len(data) // bs)
            weak, strong = np.empty(n, np.uint32), np.empty(n, np.uint64)
            if n:
                kernels.file_signature(data, bs, weak, strong)
            first_here, first = first, first + n
            last = first >= nblocks or not n
            yield F.SigData(last, bs, size, first_here, weak, strong)
            if last:
                return
    finally:
        os.close(fd)
