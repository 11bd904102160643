"""The sender's operations on the wire: batched into FILE_OPS frames, sent in order.

A round's decisions become operations (files.wire; files.remote makes them); an
:class:`OpStream` batches them in reused buffers and compresses and sends each
batch on a worker thread while the next one is read.
"""
from __future__ import annotations

import ctypes
import mmap
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from smsrepl.codec import RAW, AdaptiveChoice, Compressor
from smsrepl.control.sent_marks import FrameCounts, SentMarks
from smsrepl.files.wire import BATCH, CHUNK_MAX, INLINE, KEEPALIVE
from smsrepl.protocol import frames as F

#: ... or once the batch's first operation is this many seconds old: operations that trickle
#: in (a sync round's few changed files) reach the receiver as the round goes, not at its end
BATCH_AGE = 0.02


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
                 *, adaptive: bool = False, wire: FrameCounts | None = None) -> None:
        self.send = send
        #: the batches' raw bytes by the frame bytes of ``wire`` (the channel ``send`` writes to)
        #: at which they will have reached its socket: on_socket()
        self.wire = wire
        self._marks = SentMarks(wire.frame_bytes_sent, (0,), at=wire.frame_bytes_queued) if wire is not None else None
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
        #: batch bytes handed over so far, the batch being built included (the caller's thread)
        self._handed = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="file-ops")
        self._zout: bytearray | None = None  # compressed batches, on the worker
        self._inflight: deque[tuple[Future, mmap.mmap | None]] = deque()
        self._last = time.monotonic()

    @property
    def size(self) -> int:
        """Bytes batched and not yet handed to the worker."""
        return self._pos

    @property
    def added(self) -> int:
        """Batch bytes added so far (call on the thread that adds them)."""
        return self._handed + self._pos

    def on_socket(self) -> int:
        """Batch bytes on the socket by now (any thread), the batch leaving now's in part (a
        paced or slow frame leaves over seconds, several connections hold a frame or so each)."""
        return self._marks.value()[0] if self._marks is not None else self.raw_bytes

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
        buf, n = self._buf, self._pos
        if not n or buf is None:
            return
        self._buf, self._pos = None, 0
        self._handed += n
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
        codec: int = RAW
        payload: bytes | memoryview = body
        if level:
            if self._zout is None:  # the worker's, reused: send() returns once the frame is written
                self._zout = bytearray(self.CAPACITY)
            codec, payload = self.comp.encode_into(body, self._zout)
        t1 = time.monotonic()
        frame = F.FileOps(codec, n, payload)
        if self._marks is not None and self.wire is not None:
            self._marks.add(self.wire.frame_bytes_queued + F.frame_size(frame), (self.raw_bytes + n,))
        self.send(frame)
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
