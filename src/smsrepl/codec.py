"""Payload codecs: zstd where it pays, raw where it does not.

Codec byte on the wire (BLOCK_DATA frames):
    0  raw      payload is the data itself
    1  zstd     payload is one zstd frame holding the data (content size set)

All-zero blocks never reach the codec (they travel as ZERO_RANGE frames).
A payload is sent raw when zstd saves less than ``MIN_SAVING`` of it: random
or already-compressed data costs the receiver nothing to "decompress".
"""
from __future__ import annotations

import numpy as np
import zstandard

from .errors import CompressionError, DecompressionError

RAW = 0
ZSTD = 1
CODECS = {RAW: "raw", ZSTD: "zstd"}
#: zstd level 3, measured over the frames of the 1 GiB disk-like test image on
#: this 2-core machine (single thread): level 1 253 MB/s, 339.9 MB on the wire;
#: level 2 265 MB/s, 333.0 MB; level 3 236 MB/s, 325.1 MB (rsync -z: 324.4 MB).
#: The sender compresses on one thread per core, so level 3 still feeds a
#: 1 Gbit/s link; a faster link with idle CPUs gains from --level 1.
DEFAULT_LEVEL = 3
#: zstd's parameters are chosen for frames of this size (blocks.stream.FRAME_BLOCKS)
FRAME_SIZE = 8 << 20
#: send raw unless compression saves at least this fraction
MIN_SAVING = 1 / 32


class Compressor:
    """One per thread: zstd contexts are not thread-safe."""

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.level = level
        self._zc = None
        if level:
            params = zstandard.ZstdCompressionParameters.from_level(
                level, source_size=FRAME_SIZE, write_content_size=True, write_checksum=False)
            self._zc = zstandard.ZstdCompressor(compression_params=params)

    def encode(self, data: bytes | memoryview) -> tuple[int, bytes | memoryview]:
        if self._zc is None:
            return RAW, data
        try:
            out = self._zc.compress(data)
        except zstandard.ZstdError as exc:
            raise CompressionError(f"zstd compression failed: {exc}") from None
        if len(out) > len(data) * (1 - MIN_SAVING):
            return RAW, data
        return ZSTD, out


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
    """Raw or compressed, whichever moves data faster, measured as a transfer goes.

    Raw frames cost their send time; compressed ones the longer of compression
    (spread over ``threads``) and their send time. Rates are smoothed; the first two
    choices measure both ways, then every PROBE-th choice tries the other way so a
    change of link (or of speed limit) is noticed. Thread-safe."""

    PROBE = 16

    def __init__(self, threads: int = 1) -> None:
        import threading

        self.threads = max(1, threads)
        self._lock = threading.Lock()
        self._n = 0
        self._send: dict[bool, float] = {}  # compressed? -> source bytes per second through send
        self._comp: float | None = None  # source bytes per second through one compressor

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else 0.7 * old + 0.3 * new

    def rate(self, compressed: bool) -> float | None:
        send = self._send.get(compressed)
        if not compressed or send is None:
            return send
        return send if self._comp is None else min(send, self._comp * self.threads)

    def choose(self) -> bool:
        """True: compress the next frame."""
        with self._lock:
            i = self._n
            self._n += 1
            raw, comp = self.rate(False), self.rate(True)
            if raw is None or comp is None:
                pick = i % 2 == 0
            else:
                best = comp >= raw
                pick = best if i % self.PROBE else not best
            return pick

    def record_send(self, compressed: bool, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._send[compressed] = self._ewma(self._send.get(compressed), nbytes / max(seconds, 1e-6))

    def record_compress(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._comp = self._ewma(self._comp, nbytes / max(seconds, 1e-6))
