"""One block round's frames, from the source to the channel.

The source is read and digested on the calling thread (blocks/stream.py), frames are
compressed on a pool (zstd releases the GIL: one compressor per core keeps the sender from
being bound by compression; measured 225 MB/s per core at level 1 on binaries, 380 MB/s with
two) and written on a thread of their own. The digests of what was sent wait in
PendingDigests until the receiver acknowledges them durable (CHECKPOINT), then go into the
local copy of the target's manifest.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from smsrepl import faults
from smsrepl.blocks.source import BlockSource
from smsrepl.blocks.dirtymap import FrozenMarks
from smsrepl.blocks.manifest import ManifestFile
from smsrepl.blocks.stream import (CHUNK_END, FRAME_BLOCKS, LEGACY_FRAME_BLOCKS, Covered,
                                   dirty_round_events, round_events)
from smsrepl.codec import AUTO_LEVELS, RAW, AdaptiveChoice, Compressor
from smsrepl.kernels import FINE_BLOCK
from smsrepl.control.sent_marks import SentMarks
from smsrepl.protocol import frames as F
from smsrepl.stages import StageClock
from smsrepl.throttle import CpuCap
from smsrepl.transport.block_replies import Replies
from smsrepl.transport.channel import Channel
from smsrepl.transport.reused_buffers import ReusedBuffers

BlockFrame = F.BlockData | F.BlockSet


class Compression:
    """How frames are compressed: at a fixed zstd level (0: raw), or with "auto" each frame at
    the level of AUTO_LEVELS that moves data fastest so far (``adapt``); a compressor per pool
    thread and level; the CPU cap paced after each frame."""

    def __init__(self, level: int | str, threads: int, cpu_cap: CpuCap | None, stopped: threading.Event) -> None:
        self.adapt = AdaptiveChoice(threads, AUTO_LEVELS) if level == "auto" else None
        self.level = max(AUTO_LEVELS) if isinstance(level, str) else level
        self.threads = threads
        self.cpu_cap = cpu_cap
        self.stopped = stopped  # ends a CPU cap's pacing (the cap may outlive the sender)
        # compressed frames' payloads, given back by the writer once the frame is sent
        self.buffers = ReusedBuffers()
        self._local = threading.local()

    def choose(self) -> int:
        return self.level if self.adapt is None else self.adapt.choose()

    def pace(self) -> None:
        if self.cpu_cap is not None:
            self.cpu_cap.pace(self.stopped)

    def encode(self, ev: BlockFrame, level: int, clock: StageClock) -> tuple[BlockFrame, bytearray | None]:
        """The frame compressed, and the buffer its payload is in (None: raw), which the caller
        gives back once the frame is sent."""
        comps = getattr(self._local, "comps", None)
        if comps is None:
            comps = self._local.comps = {}
        comp = comps.get(level)
        if comp is None:
            comp = comps[level] = Compressor(level)
        out = self.buffers.take(memoryview(ev.payload).nbytes)
        t0 = time.perf_counter()
        codec, payload = comp.encode_into(ev.payload, out)
        dt = time.perf_counter() - t0
        buf: bytearray | None = out
        if codec == RAW:  # the payload is the frame's own
            self.buffers.give(out)
            buf = None
        clock.add("compress", dt)
        if self.adapt is not None:
            self.adapt.record_compress(level, source_bytes(ev), dt)
        self.pace()
        return ev.recoded(codec, payload), buf


class PendingDigests:
    """Digests of sent blocks, copied into the local manifest copy once the receiver made them
    durable."""

    def __init__(self, cache: ManifestFile) -> None:
        self.cache = cache
        self.pending: list[Covered] = []

    def apply(self, acked: int | None) -> None:
        """Those up to source offset ``acked`` (None: all of them, the round is done)."""
        pending, cache = self.pending, self.cache
        limit = None if acked is None else acked // FINE_BLOCK
        i = 0
        for i, cov in enumerate(pending):
            if limit is not None and cov.end > limit:
                break
            if cov.index is None:
                cache.write_fine(cov.first, cov.digests)
            else:
                cache.write_fine_at(cov.first, cov.index, cov.digests)
        else:
            i = len(pending)
        del pending[:i]


def send_round(chan: Channel, source: BlockSource, *, start: int, against: ManifestFile | None,
               dirty: FrozenMarks | None, digests: PendingDigests, compression: Compression, replies: Replies,
               clock: StageClock, peer_caps: frozenset, report: Callable[[int, int], None], streams: int = 1,
               marks: SentMarks | None = None) -> int:
    """Send one round's frames from ``start`` (a sync round's against the manifest copy
    ``against``; with ``dirty``, a frozen dirty map, only the blocks it names); returns the
    source bytes sent as data. ``report(source offset covered, data bytes)`` once a batch's
    frames were handed to the channel; ``marks`` get, for each frame, the channel's frame bytes
    by which it will have reached the socket and what the round will then have sent (progress
    reports; several connections queue frames, and a paced frame leaves over seconds);
    ``streams``: the connections the session runs over (frame_blocks)."""
    out: queue.Queue = queue.Queue(maxsize=2)
    writer_error: list[BaseException] = []
    adapt = compression.adapt

    def writer() -> None:
        raw_done = 0  # data bytes handed to the channel
        try:
            while True:
                work = out.get()
                if work is None:
                    return
                batch, covered, raw = work
                for item, level in batch:
                    frame, buf = item.result() if isinstance(item, Future) else (item, None)
                    # a CHECKPOINT may cover this frame once it is sent: allow it first
                    replies.sent_to = max(replies.sent_to, frame_end(frame))
                    data = isinstance(frame, (F.BlockData, F.BlockSet))
                    if data:
                        raw_done += source_bytes(frame)
                    if marks is not None:
                        marks.add(chan.frame_bytes_queued + F.frame_size(frame), (frame_end(frame), raw_done))
                    t0 = time.perf_counter()
                    chan.send(frame)
                    dt = time.perf_counter() - t0
                    clock.add("send", dt)
                    if adapt is not None and data:
                        # the frame's own bytes: over several connections send() returns once the
                        # frame is queued, and the wire counters move with other frames
                        adapt.record_send(level, source_bytes(frame), F.frame_size(frame), dt)
                    # sent: a channel has written it, several connections' copied it (stripes.owned)
                    compression.buffers.give(buf)
                faults.point("sender.data")
                if marks is not None:
                    marks.add(chan.frame_bytes_queued, (covered, raw))
                report(covered, raw)
                raw_done = raw
        except BaseException as exc:
            writer_error.append(exc)
            while out.get() is not None:  # drain so the producer never blocks forever
                pass

    wt = threading.Thread(target=writer, daemon=True)
    wt.start()
    pool = ThreadPoolExecutor(compression.threads, thread_name_prefix="zstd") if compression.level else None
    sent = 0
    batch: list = []
    covered_to = start
    try:
        sets = "block-set" in peer_caps
        if dirty is not None:  # a frozen dirty map: read only what it names
            events = dirty_round_events(source, dirty, digests.cache, sets=sets, clock=clock)
        else:
            big = "frame-8m" in peer_caps
            events = round_events(source, start=start, cache=against, sets=sets,
                                  frame_blocks=frame_blocks(FRAME_BLOCKS if big else LEGACY_FRAME_BLOCKS, streams),
                                  clock=clock)
        for item in events:
            if writer_error or replies.failure:
                break
            if isinstance(item, Covered):
                digests.pending.append(item)
                covered_to = min(source.size, item.end * FINE_BLOCK)
                continue
            if item is CHUNK_END:
                # exactly one batch per read chunk, even an empty one: with at most
                # 3 batches queued or being written, 1 chunk being cut into frames and
                # stream.AHEAD being read, the stream.BUFFERS read buffers are never
                # reused before their frames are sent
                out.put((batch, covered_to, sent))
                batch = []
                compression.pace()
                digests.apply(replies.acked)
                continue
            level = None
            work: object = item
            if isinstance(item, (F.BlockData, F.BlockSet)):
                sent += source_bytes(item)
                level = compression.choose()
                if level and pool is not None:
                    work = pool.submit(compression.encode, item, level, clock)
            batch.append((work, level))
        if batch:
            out.put((batch, covered_to, sent))
    finally:
        out.put(None)
        wt.join()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        compression.buffers.clear()  # a continuous sender holds none between rounds
    if writer_error:
        raise replies.failure or writer_error[0]  # the session prefers the receiver's ERROR
    if replies.failure:
        raise replies.failure
    return sent


#: a session over several connections sends frames of at most this many bytes in all, one per
#: connection: the receiver applies them in order, holding what comes early up to
#: frame_order.HOLD_BYTES (64 MiB), so a frame that a connection in loss recovery delays must not
#: hold up the others' for long. On an emulated 1 Gbit/s 50 ms link with 0.1% loss, 8 connections
#: moved 71% of the link with 8 MiB frames, 83-85% with 4, 2 or 1 MiB (4 connections: 85% either way)
STREAMS_FRAME_BYTES = 32 << 20


def frame_blocks(most: int, streams: int) -> int:
    """The blocks of one frame: ``most``, halved until ``streams`` of them fit STREAMS_FRAME_BYTES."""
    blocks = most
    while streams * blocks * FINE_BLOCK > STREAMS_FRAME_BYTES and blocks > 64:
        blocks //= 2
    return blocks


def source_bytes(frame: BlockFrame) -> int:
    """The source bytes a BLOCK_DATA or BLOCK_SET frame covers."""
    return frame.raw_len if isinstance(frame, F.BlockData) else len(frame.index) * FINE_BLOCK


def frame_end(frame: object) -> int:
    """The source offset a round frame takes the receiver to (0 for frames that move nothing)."""
    if isinstance(frame, F.BlockData):
        return frame.offset + frame.raw_len
    if isinstance(frame, F.BlockSet):
        return frame.offset + (int(frame.index[-1]) + 1) * FINE_BLOCK
    if isinstance(frame, F.ZeroRange):
        return frame.offset + frame.length
    if isinstance(frame, F.Scanned):
        return frame.offset
    return 0
