"""Payload codecs: zstd where it pays, raw where it does not, and the level that moves data
fastest.

Codec byte on the wire (BLOCK_DATA and BLOCK_SET frames; TREE_DATA and FILE_OPS, the files
wire, use the same byte):
    0  raw      payload is the data itself
    1  zstd     payload is one zstd frame holding the data (content size set)

All-zero blocks never reach the codec (a frame's zero map leaves them out of its payload;
long runs travel as ZERO_RANGE frames). ``Compressor`` sends a payload raw when zstd saves
less than ``MIN_SAVING`` of it, or when samples spread over it do not compress at all:
random or already-compressed data costs the receiver nothing to "decompress".
``Decompressor`` checks the raw length the frame states, and can decode into the caller's
buffer. ``AdaptiveChoice`` picks the level of each frame for ``--level auto`` from what the
transfer measures (the link's rate, each level's ratio and speed); it keeps time and a lock,
which is why the codec lives beside the protocol package and not in it.
"""
from __future__ import annotations

from smsrepl._lazy import _Lazy, np

# imported on first use: a command that never compresses (verify, status) skips its import
zstandard = _Lazy("zstandard")

from smsrepl import libzstd
from smsrepl.errors import CompressionError, DecompressionError

RAW = 0
ZSTD = 1
CODECS = {RAW: "raw", ZSTD: "zstd"}
#: zstd level 2 with a window over the whole frame (WINDOW_LOG). Full copies of the
#: 2 GiB disk-like test image over loopback on this 2-core machine, medians of 3, same
#: runs as rsync -z --whole-file: level 1 1.71x rsync's speed but 1.04x its wire bytes;
#: level 2 1.67x and 0.94x; level 3 1.32x and 0.92x. Level 2 is the fastest level that
#: sends fewer bytes than rsync -z.
DEFAULT_LEVEL = 2
#: the levels ``--level auto`` chooses among for block sends
AUTO_LEVELS = (0, DEFAULT_LEVEL)
#: zstd's parameters are chosen for frames of this size (blocks.stream.FRAME_BLOCKS)
FRAME_SIZE = 8 << 20
#: each frame is compressed on its own, so the window spans the whole frame: the levels'
#: own windows (512 KiB-2 MiB for levels 1-3 at this size) drop every match further back.
#: Decompressing needs no more memory than the frame buffer it fills anyway.
WINDOW_LOG = (FRAME_SIZE - 1).bit_length()
#: send raw unless compression saves at least this fraction
MIN_SAVING = 1 / 32
#: a payload is first tried on SAMPLES pieces of SAMPLE bytes spread over it: where zstd
#: cannot shrink even those, the whole is sent raw without compressing it (random blocks
#: of a sync round, compressed files: zstd level 2 spent 20-30 ms of a 2-core machine's
#: CPU on the 10 MB of 1% random rewrites of a 1 GiB disk, to send them raw anyway)
SAMPLE = 4096
SAMPLES = 8


class Compressor:
    """One per thread: zstd contexts are not thread-safe. Through the system's libzstd where
    there is one (libzstd.py: straight into the caller's buffer), else python-zstandard."""

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.level = level
        self._zc = None
        self._ctx: libzstd.Context | None = None
        if not level:
            return
        self._scratch = bytearray(0)  # encode()'s frames, copied out
        self._sample_out = bytearray(SAMPLES * SAMPLE)
        lib = libzstd.library()
        if lib is not None:
            self._ctx = libzstd.Context(lib, level, WINDOW_LOG)
        else:
            # no level's own window is larger at this source size (zstd caps it at the size)
            params = zstandard.ZstdCompressionParameters.from_level(
                level, source_size=FRAME_SIZE, write_content_size=True, write_checksum=False,
                window_log=WINDOW_LOG)
            self._zc = zstandard.ZstdCompressor(compression_params=params)

    @property
    def backend(self) -> str | None:
        """Which zstd compresses: "libzstd" (the system's), "python-zstandard", or None (level 0)."""
        return "libzstd" if self._ctx is not None else "python-zstandard" if self._zc is not None else None

    def encode(self, data: bytes | memoryview) -> tuple[int, bytes | memoryview]:
        """(codec, payload): a zstd frame of its own, or ``data`` itself sent raw."""
        if not self.level:
            return RAW, data
        size = memoryview(data).nbytes
        if len(self._scratch) < size:
            self._scratch = bytearray(size)
        codec, payload = self.encode_into(data, self._scratch)
        return (ZSTD, bytes(payload)) if codec == ZSTD else (codec, payload)

    def encode_into(self, data: bytes | memoryview, out: bytearray) -> tuple[int, bytes | memoryview]:
        """As :meth:`encode`, but a zstd payload is written into ``out`` (a view of it is
        returned): a buffer kept for reuse, where a fresh one for every frame costs a page
        fault per 4 KiB it fills (31,700 faults for 38 text frames, 6% of the compression's
        time). A frame that outgrows what saves MIN_SAVING is abandoned there."""
        if not self.level:
            return RAW, data
        # bytes, not items: len() of an array or view of wider items (or of rows) counts those
        src = data if isinstance(data, bytes) else memoryview(data).cast("B")
        if self._incompressible(src):
            return RAW, data
        n = self._compress(src, out, int(len(src) * (1 - MIN_SAVING)))
        if n is None:
            return RAW, data
        return ZSTD, memoryview(out)[:n]

    def _compress(self, data, out: bytearray, limit: int) -> int | None:
        """One zstd frame of ``data`` in ``out``'s first ``limit`` bytes: its length, or None
        when it does not fit."""
        if self._ctx is not None:
            return self._ctx.compress_into(data, out, limit)
        assert self._zc is not None
        sink = _Sink(out, min(len(out), limit))
        try:
            writer = self._zc.stream_writer(sink, size=len(data), write_size=STREAM_OUT, closefd=False)
            writer.write(data)
            writer.flush(zstandard.FLUSH_FRAME)
        except _Outgrown:
            return None
        except zstandard.ZstdError as exc:
            raise CompressionError(f"zstd compression failed: {exc}") from None
        return sink.pos

    def _incompressible(self, data) -> bool:
        """True when SAMPLES pieces spread over ``data`` do not compress at all."""
        n = len(data)
        if n < 4 * SAMPLES * SAMPLE:
            return False  # small: trying the whole costs little more than the samples
        view = memoryview(data).cast("B")
        step = n // SAMPLES
        sample = b"".join(view[i * step:i * step + SAMPLE] for i in range(SAMPLES))
        return self._compress(sample, self._sample_out, int(len(sample) * (1 - MIN_SAVING / 4))) is None


#: output piece of a streamed frame: zstd's own streaming size, small enough that the
#: allocator reuses the pieces' memory (1 MiB pieces were mapped afresh each time)
STREAM_OUT = 128 << 10


class _Outgrown(Exception):
    pass


class _Sink:
    """Takes a streamed zstd frame's pieces into a buffer, up to ``limit`` bytes."""

    def __init__(self, buf: bytearray, limit: int) -> None:
        self.view = memoryview(buf)
        self.limit = limit
        self.pos = 0

    def write(self, piece) -> int:
        n = len(piece)
        end = self.pos + n
        if end > self.limit:
            raise _Outgrown
        self.view[self.pos:end] = piece
        self.pos = end
        return n


class Decompressor:
    def __init__(self) -> None:
        self._zd = zstandard.ZstdDecompressor()

    def decode(self, codec: int, payload: bytes | memoryview, raw_len: int, into: memoryview | None = None):
        """The raw data of a payload; written into ``into`` (at least raw_len bytes) when given."""
        if codec == RAW:
            if len(payload) != raw_len:
                raise DecompressionError(f"raw payload holds {len(payload)} bytes, frame says {raw_len}")
            if into is not None:
                np.frombuffer(into, dtype=np.uint8, count=raw_len)[:] = np.frombuffer(payload, dtype=np.uint8)
                return into[:raw_len]
            return payload
        if codec == ZSTD and into is not None:
            return self._decode_into(payload, raw_len, into)
        if codec == ZSTD:
            try:
                out = self._zd.decompress(payload, max_output_size=raw_len)
            except zstandard.ZstdError as exc:
                raise DecompressionError(f"zstd decompression failed: {exc}") from None
            if len(out) != raw_len:
                raise DecompressionError(f"zstd payload decompressed to {len(out)} bytes, frame says {raw_len}")
            return out
        raise DecompressionError(f"unknown codec {codec}")

    def _decode_into(self, payload, raw_len: int, into: memoryview) -> memoryview:
        try:
            reader = self._zd.stream_reader(payload, read_size=max(len(payload), 1))
            got = 0
            while got < raw_len:
                n = reader.readinto(into[got:raw_len])
                if not n:
                    break
                got += n
            extra = reader.read(1) if got == raw_len else b""
        except zstandard.ZstdError as exc:
            raise DecompressionError(f"zstd decompression failed: {exc}") from None
        if got != raw_len or extra:
            raise DecompressionError(f"zstd payload decompressed to {'more than ' if extra else ''}{got} bytes, "
                                     f"frame says {raw_len}")
        return into[:raw_len]


class AdaptiveChoice:
    """The zstd level (0: raw) that moves data fastest, measured as a transfer goes.

    Three things are measured: the link's rate in wire bytes per second (all frames'
    bytes over the time spent sending them, whatever their level), each level's ratio
    (wire bytes per source byte) and each level's compression rate on one thread. A
    level then moves ``link / ratio`` source bytes per second, or what its compressors
    manage if that is less: ``threads`` of them compressing while another thread sends
    (``pipelined``), or one that compresses and then sends. Raw wins on a link faster
    than compression (loopback, a fast LAN), compression on a slower one. Each level is
    tried once, the highest is used until all are measured, and then every PROBE-th choice
    tries one of the others in turn, so a change of data or of link (a speed limit) is noticed.
    Thread-safe."""

    #: one frame in PROBE tries another level: 1/32 of the frames at the wrong level costs a
    #: few percent at most, and a change of link is noticed within 256 MiB
    PROBE = 32
    #: the link rate is taken over at least this many wire bytes at a time: much more than a
    #: socket buffer, which takes a frame at once when it has room and not when it has none
    LINK_WINDOW = 64 << 20

    def __init__(self, threads: int = 1, levels: tuple[int, ...] = (0, DEFAULT_LEVEL), *,
                 pipelined: bool = True) -> None:
        import threading

        if len(set(levels)) < 2:
            raise ValueError("adaptive compression needs at least two levels to choose from")
        self.threads = max(1, threads)
        self.levels = tuple(levels)
        self.pipelined = pipelined
        self._lock = threading.Lock()
        self._n = 0
        self._link: float | None = None  # wire bytes per second
        self._window = [0, 0.0]  # wire bytes and seconds since the last link sample
        self._ratio: dict[int, float] = {0: 1.0}  # level -> wire bytes per source byte
        self._comp: dict[int, float] = {}  # level -> source bytes per second through one compressor

    @staticmethod
    def _ewma(old: float | None, new: float, keep: float = 0.7) -> float:
        return new if old is None else keep * old + (1 - keep) * new

    def rate(self, level: int) -> float | None:
        """Source bytes per second at ``level``, as measured so far (None: not yet known)."""
        link, ratio = self._link, self._ratio.get(level)
        if link is None or ratio is None:
            return None
        through_link = link / max(ratio, 1e-3)
        if not level:
            return through_link
        comp = self._comp.get(level)
        if comp is None:
            return None
        if self.pipelined:
            return min(through_link, comp * self.threads)
        return 1 / (1 / through_link + 1 / comp)

    def best(self) -> int | None:
        """The fastest level so far (None until every level is measured)."""
        rates: dict[int, float] = {}
        for lv in self.levels:
            r = self.rate(lv)
            if r is None:
                return None
            rates[lv] = r
        return max(self.levels, key=rates.__getitem__)

    def choose(self) -> int:
        """The level for the next frame."""
        with self._lock:
            i = self._n
            self._n += 1
            best = self.best()
            if best is None:
                # frames are chosen well before the first measurements come back: try each
                # level once, then stay on the highest until all are measured (over a slow
                # link a raw frame costs more than a compressed one on a fast link)
                if i < len(self.levels):
                    return self.levels[i]
                return max(self.levels)
            if i % self.PROBE:
                return best
            others = [lv for lv in self.levels if lv != best]
            return others[(i // self.PROBE) % len(others)]

    def record_send(self, level: int, source_bytes: int, wire_bytes: int, seconds: float) -> None:
        """A frame of ``source_bytes`` at ``level`` took ``wire_bytes`` and ``seconds`` to send."""
        with self._lock:
            if level and source_bytes:
                self._ratio[level] = self._ewma(self._ratio.get(level), wire_bytes / source_bytes)
            w = self._window
            w[0] += wire_bytes
            w[1] += seconds
            if w[0] >= self.LINK_WINDOW or self._link is None:
                self._link = self._ewma(self._link, w[0] / max(w[1], 1e-6), keep=0.5)
                w[0], w[1] = 0, 0.0

    def record_compress(self, level: int, source_bytes: int, seconds: float) -> None:
        with self._lock:
            self._comp[level] = self._ewma(self._comp.get(level), source_bytes / max(seconds, 1e-6))
