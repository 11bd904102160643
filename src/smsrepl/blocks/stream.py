"""The source side of a round, without sockets: which frames to send, in order.

A full round sends every non-zero block from ``start`` (holes and all-zero
blocks become ZERO_RANGE frames, never data). A sync round reads the whole
source and sends only the blocks whose digest differs from the target's
manifest (kept locally as a cache and reconciled with the receiver's before
the round). Frames come in strictly increasing offset order; SCANNED frames
mark progress through stretches with nothing to send.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from smsrepl._lazy import np

from smsrepl import kernels
from smsrepl.codec import RAW
from smsrepl.errors import SourceError
from smsrepl.protocol.frames import (LEGACY_RAW, MAX_RAW, MAX_SET, BlockData, BlockSet, Event,
                                     Scanned, ZeroRange)
from smsrepl.blocks.direct import aligned_buffer
from smsrepl.blocks.manifest import ManifestFile, block_count, run_arrays, runs_of
from smsrepl.blocks.sourcescan import scan
from smsrepl.kernels import FINE_BLOCK

#: blocks per BLOCK_DATA frame (8 MiB, one read chunk) for a peer with the "frame-8m"
#: capability, else LEGACY_FRAME_BLOCKS (4 MiB). zstd-3 with its default parameters
#: for the frame size, measured single-threaded on 48 MiB of /usr binaries (and of
#: the test image's text): 4 MiB frames 3.053x at 181 MB/s (3.322x, 162 MB/s);
#: 8 MiB frames 3.063x at 176 MB/s (3.446x, 160 MB/s). 4 MiB frames needed a larger
#: hash table to match rsync -z on the wire, which cost 10-20% of the speed.
FRAME_BLOCKS = MAX_RAW // FINE_BLOCK
LEGACY_FRAME_BLOCKS = LEGACY_RAW // FINE_BLOCK
#: zero runs at least this long (64 KiB) travel as ZERO_RANGE; shorter ones inside frames
ZERO_RUN_MIN = 16
#: in sync rounds, changed runs shorter than this (256 KiB) travel together in BLOCK_SET
#: frames, one per read chunk: 1% of blocks changed at random is ~20 runs per chunk
SET_RUN_MAX = 64
#: a SCANNED frame after this much source without any frame keeps checkpoints moving
SCANNED_EVERY = 64 << 20
#: a zero run coalesced into one ZERO_RANGE goes out at least every this many bytes: a
#: disk's long all-zero region (read, not a hole) must not keep the receiver without a
#: frame past its idle limit, nor the checkpoint still for minutes
ZERO_FLUSH = 1 << 30
#: read size
CHUNK = 8 << 20
#: bytes of dirty blocks read at a time in a map-driven round (one read ahead of the frames
#: being sent: smaller batches overlap reading with sending and the receiver's writes)
DIRTY_BATCH = 2 << 20
#: chunks read and digested ahead on worker threads while frames are built
AHEAD = 2
#: read buffers: 3 chunks' frames may wait in or at the sender's writer, 1 is
#: being cut into frames, AHEAD are being read (see transport/block_pipeline.py)
BUFFERS = 4 + AHEAD
#: a sync round's read buffers: its frames carry copies of the few blocks that changed (in
#: BLOCK_SET payloads, or gathered as below), so a buffer is free once its chunk was cut into
#: frames. 3 buffers of 8 MiB stay in this machine's 32 MiB L3 cache where 6 did not: reading
#: and digesting 1 GiB from the page cache took 0.204 CPU s instead of 0.250 and 0.118 s
#: instead of 0.143 (medians of 5)
SYNC_BUFFERS = 1 + AHEAD
#: gather buffers (see _Gather): the frames of the 3 chunks queued or being written and of
#: the 1 being cut into frames, as for a full round's read buffers (a sync round's long
#: changed runs are copied there too)
GATHER = 4


class ChunkEnd:
    """Marks the end of one read chunk's frames (its buffer may be reused 4 chunks later)."""


CHUNK_END = ChunkEnd()


@dataclass(slots=True)
class Covered:
    """Blocks [first, first+len(digests)) now hold ``digests`` once acknowledged;
    with ``index``, blocks first + index[i] hold digests[i]."""

    first: int
    digests: np.ndarray
    index: np.ndarray | None = None

    @property
    def end(self) -> int:
        return self.first + (len(self.digests) if self.index is None else int(self.index[-1]) + 1)


def round_events(  # noqa: C901
    source,
    *,
    start: int = 0,
    cache: ManifestFile | None = None,
    chunk: int = CHUNK,
    sets: bool = False,
    frame_blocks: int = FRAME_BLOCKS,
    clock=None,
    zero_flush: int = ZERO_FLUSH,
) -> Iterator[Event | Covered | ChunkEnd]:
    """Yield the frames of one round, each followed by a Covered record for the sender's cache.

    BLOCK_DATA frames carry raw views into the read buffers; the caller
    compresses them (see codec.Compressor), possibly on other threads.

    ``cache`` None means a full round: everything from ``start`` is sent. With
    a cache, only blocks whose digests differ from it are sent (a sync round);
    with ``sets``, short changed runs of a chunk share BLOCK_SET frames.
    Payloads stay valid until 4 more chunks were read: views into the read buffers, or, for
    a sync round (whose read buffers are reused as soon as the next chunk is read), copies.
    """
    zero_from: int | None = None  # pending ZERO_RANGE start, coalesced across chunks
    quiet_from = start  # end of the last frame: SCANNED marks long stretches without any
    zero_end = 0
    old = np.empty(chunk // FINE_BLOCK, dtype="<u8")
    gather = _Gather(chunk)
    for off, view, digests in scan(source, start=start, chunk=chunk, buffers=BUFFERS if cache is None else SYNC_BUFFERS,
                                   ahead=AHEAD, clock=clock):
        gather.next_chunk()
        first = off // FINE_BLOCK
        n = len(digests)
        if cache is not None:
            prev = cache.read_fine(first, n, old, verify=False)
            send = digests != prev
        else:
            send = np.ones(n, dtype=bool)
        is_zero = digests == 0
        sent_any = False
        for r0, rn, picks in _changes(send, sets and cache is not None and view is not None):
            if picks is not None:
                if zero_from is not None:
                    yield ZeroRange(zero_from, zero_end - zero_from)
                    zero_from = None
                for c0 in range(0, len(picks), MAX_SET):
                    pick = picks[c0:c0 + MAX_SET]
                    yield from _set_frames(pick + first, digests[pick], pick, view, source.size, copy=True)
                sent_any = True
                continue
            for s0, sn, zero in _segments(is_zero[r0:r0 + rn], r0):
                b_off = off + s0 * FINE_BLOCK
                b_end = min(off + (s0 + sn) * FINE_BLOCK, source.size)
                if zero:
                    if zero_from is not None and zero_end == b_off:
                        zero_end = b_end
                    else:
                        if zero_from is not None:
                            yield ZeroRange(zero_from, zero_end - zero_from)
                        zero_from, zero_end = b_off, b_end
                    yield Covered(first + s0, digests[s0:s0 + sn].copy())
                    if zero_end - zero_from >= zero_flush:
                        yield ZeroRange(zero_from, zero_end - zero_from)
                        zero_from = None
                        sent_any = True
                    continue
                if zero_from is not None:
                    yield ZeroRange(zero_from, zero_end - zero_from)
                    zero_from = None
                for f0 in range(s0, s0 + sn, frame_blocks):
                    f1 = min(f0 + frame_blocks, s0 + sn)
                    d_off = off + f0 * FINE_BLOCK
                    d_end = min(off + f1 * FINE_BLOCK, source.size)
                    fd = digests[f0:f1].copy()
                    yield BlockData(d_off, d_end - d_off, RAW, fd,
                                    _payload(view, f0, d_end - off, fd, gather, copy=cache is not None))
                    yield Covered(first + f0, fd)
                sent_any = True
        if sent_any or zero_from is not None:
            quiet_from = off + n * FINE_BLOCK
        elif off + n * FINE_BLOCK - quiet_from >= SCANNED_EVERY:
            quiet_from = min(off + n * FINE_BLOCK, source.size)
            yield Scanned(quiet_from)
        yield CHUNK_END
    if zero_from is not None:
        yield ZeroRange(zero_from, zero_end - zero_from)


def _changes(send: np.ndarray, sets: bool) -> Iterator[tuple[int, int, np.ndarray | None]]:
    """A chunk's runs of blocks to send, in order, as ``(first, count, None)``; with ``sets``, each
    stretch of short runs (under SET_RUN_MAX blocks) between long ones as one ``(first, count,
    positions of its blocks to send)``, for BLOCK_SETs built in numpy, not run by run (1% of
    blocks changed at random is ~20 runs per chunk)."""
    starts, counts = run_arrays(send)
    s, c = starts.tolist(), counts.tolist()
    if not sets:
        for r0, rn in zip(s, c):
            yield r0, rn, None
        return
    i = 0
    for li in np.flatnonzero(counts >= SET_RUN_MAX).tolist() + [len(s)]:
        if li > i:  # runs i..li-1 are short
            lo, hi = s[i], s[li - 1] + c[li - 1]
            yield lo, hi - lo, np.flatnonzero(send[lo:hi]) + lo
        if li < len(s):
            yield s[li], c[li], None
        i = li + 1


def _segments(zero: np.ndarray, base: int) -> Iterator[tuple[int, int, bool]]:
    """Cut a run of blocks to send into zero segments (ZERO_RANGE) and data segments.

    Zero runs shorter than ZERO_RUN_MIN inside data stay in the data segment:
    they travel as digest 0 in the frame and cost no payload, while a frame per
    short run would cost more than the run (mixed regions alternate every few blocks).
    """
    n = len(zero)
    if not n:
        return
    if zero.all():
        yield base, n, True
        return
    edges = np.flatnonzero(zero[1:] != zero[:-1]) + 1
    starts = np.concatenate(([0], edges)).tolist()
    ends = np.concatenate((edges, [n])).tolist()
    seg_start = None
    for s, e in zip(starts, ends):
        if zero[s] and e - s >= ZERO_RUN_MIN:
            if seg_start is not None:
                yield base + seg_start, s - seg_start, False
                seg_start = None
            yield base + s, e - s, True
        elif seg_start is None:
            seg_start = s
    if seg_start is not None:
        yield base + seg_start, n - seg_start, False


class _Gather:
    """Where the non-zero blocks of a chunk's frames are gathered: a buffer per chunk, in turn
    over GATHER of them, so that a frame with zero blocks costs a copy into memory already
    mapped instead of a fresh 8 MiB array (a page fault per 4 KiB, ~6% of a level-0 sender)."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.bufs: list[np.ndarray | None] = [None] * GATHER
        self.turn = 0
        self.pos = 0

    def next_chunk(self) -> None:
        self.turn = (self.turn + 1) % GATHER
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        buf = self.bufs[self.turn]
        if buf is None:
            buf = self.bufs[self.turn] = np.empty(self.chunk, dtype=np.uint8)
        if self.pos + n > len(buf):  # more than a chunk's worth: cannot happen, but never overlap
            return np.empty(n, dtype=np.uint8)
        out = buf[self.pos:self.pos + n]
        self.pos += n
        return out


def _payload(view: memoryview, f0: int, end: int, digests: np.ndarray, gather: _Gather | None = None,
             copy: bool = False):
    """The non-zero blocks of view[f0 * 4 KiB:end], without a copy when there is no zero block
    (``copy``: a copy all the same); gathered into ``gather``'s buffer, else into fresh memory."""
    nonzero = digests != 0
    lo = f0 * FINE_BLOCK
    if not copy and nonzero.all():
        return view[lo:end]
    data = np.frombuffer(view, dtype=np.uint8)
    full = (end - lo) // FINE_BLOCK
    keep = nonzero[:full]
    k = int(np.count_nonzero(keep))
    tail = end - lo - full * FINE_BLOCK if full < len(nonzero) and nonzero[full] else 0  # the source's short end
    out = gather.take(k * FINE_BLOCK + tail) if gather is not None else np.empty(k * FINE_BLOCK + tail, np.uint8)
    # take(mode="clip") writes straight into ``out``: np.compress (take's "raise" mode) builds
    # the result in a fresh temporary first and copies it over, a page fault per 4 KiB
    np.take(data[lo:lo + full * FINE_BLOCK].reshape(full, FINE_BLOCK), np.flatnonzero(keep), axis=0,
            out=out[:k * FINE_BLOCK].reshape(k, FINE_BLOCK), mode="clip")
    if tail:
        out[k * FINE_BLOCK:] = data[lo + full * FINE_BLOCK:end]
    return out.data


def dirty_round_events(source, dirty, cache: ManifestFile, *, batch: int = DIRTY_BATCH,
                       sets: bool = True, clock=None) -> Iterator[Event | Covered | ChunkEnd]:
    """A sync round that reads only the blocks a frozen dirty map names (see dirtymap.py).

    Each batch of dirty ranges is read into a buffer of its own (one read per
    range, many in flight) on a worker thread, a batch ahead of the one whose
    frames are being built and sent, digested in one pass, and compared with
    the cache: a dirty block whose digest did not change is not sent (the map
    may say more than changed). What changed travels in BLOCK_SET frames, whole
    runs included, so per-block work stays in numpy and C; blocks that became
    zero carry no payload. One CHUNK_END per batch.
    """
    if not sets:  # a peer without BLOCK_SET: an ordinary sync round, which reads everything
        yield from round_events(source, cache=cache)
        return
    size = source.size
    for ranges, mv in _read_ahead(source, _batches(dirty.ranges(), batch), clock):
        counts = np.array([block_count(n) for _, n in ranges], dtype=np.int64)
        starts = np.array([off // FINE_BLOCK for off, _ in ranges], dtype=np.int64)
        blocks = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts) + np.arange(counts.sum())
        digests = np.empty(len(blocks), dtype="<u8")
        t1 = time.perf_counter()
        kernels.block_digests(mv, FINE_BLOCK, digests)  # ranges are whole blocks but for the source's last
        if clock is not None:
            clock.add("digest", time.perf_counter() - t1)
        changed = np.flatnonzero(digests != cache.read_fine_at(blocks))
        for c0 in range(0, len(changed), MAX_SET):
            pick = changed[c0:c0 + MAX_SET]
            yield from _set_frames(blocks[pick], digests[pick], pick, mv, size)
        yield CHUNK_END


def _read_ahead(source, batches, clock) -> Iterator[tuple[list, memoryview]]:
    """(ranges, their data) of each batch, the next one read on a worker thread meanwhile."""

    def read(ranges):
        total = sum(n for _, n in ranges)
        mv = memoryview(aligned_buffer(total))[:total]  # frames keep views into it: never reused
        t0 = time.perf_counter()
        if source.read_ranges(mv, ranges) < total:
            raise SourceError(f"source {source.path!r} ended before {ranges[-1][0] + ranges[-1][1]}")
        if clock is not None:
            clock.add("read", time.perf_counter() - t0)
        return ranges, mv

    with ThreadPoolExecutor(1, thread_name_prefix="dirty-read") as pool:
        pending: deque = deque()
        try:
            for ranges in batches:
                pending.append(pool.submit(read, ranges))
                if len(pending) > 1:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def _set_frames(blocks: np.ndarray, digests: np.ndarray, positions: np.ndarray, mv: memoryview, size: int,
                copy: bool = False):
    """A BLOCK_SET (or ZERO_RANGEs when nothing but zeros) for changed blocks at ``positions`` of a
    buffer (``copy``: the payload never a view of it, which will be reused)."""
    first = int(blocks[0])
    if not digests.any():
        for b0, n in runs_of(np.isin(np.arange(first, int(blocks[-1]) + 1), blocks), first):
            end = min((b0 + n) * FINE_BLOCK, size)
            yield ZeroRange(b0 * FINE_BLOCK, end - b0 * FINE_BLOCK)
            yield Covered(b0, np.zeros(n, dtype="<u8"))
        return
    index = blocks - first
    yield BlockSet(first * FINE_BLOCK, index, RAW, digests, _gather(mv, positions[digests != 0], copy))
    yield Covered(first, digests, index)


def _gather(mv: memoryview, positions: np.ndarray, copy: bool = False):
    """The 4 KiB blocks at ``positions`` of a buffer, concatenated (only its last block may be short):
    a view where they follow one another (every block the map named changed) unless ``copy``, else a copy."""
    if len(positions) and int(positions[-1]) - int(positions[0]) == len(positions) - 1:
        lo = int(positions[0]) * FINE_BLOCK
        run = mv[lo:min(len(mv), (int(positions[-1]) + 1) * FINE_BLOCK)]
        return bytes(run) if copy else run
    data = np.frombuffer(mv, dtype=np.uint8)
    full = len(data) // FINE_BLOCK
    whole = positions[positions < full]
    out = data[:full * FINE_BLOCK].reshape(full, FINE_BLOCK)[whole].tobytes()
    if len(whole) < len(positions):  # the source's short last block
        out += data[full * FINE_BLOCK:].tobytes()
    return out


def _batches(ranges, limit: int):
    """Lists of (offset, length) ranges of at most ``limit`` bytes together (long ranges split)."""
    out: list[tuple[int, int]] = []
    total = 0
    for off, n in ranges:
        while n:
            take = min(n, limit - total)
            out.append((off, take))
            total += take
            off += take
            n -= take
            if total == limit:
                yield out
                out, total = [], 0
    if out:
        yield out
