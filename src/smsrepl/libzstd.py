"""zstd compression through the system's libzstd (libzstd.so.1), where there is one.

Called through ctypes, ZSTD_compress2 writes a frame straight into a buffer the caller reuses.
python-zstandard cannot: its compress() returns a fresh buffer per frame (a page fault per 4 KiB
under the CLI's mmap threshold), and its streaming API copies the input into its own window and
the output out in pieces. On the test image's text frames, interleaved (8 rounds, level 2, one
core): this path 544 MB/s, python-zstandard's streaming into a reused buffer 506 MB/s; a 1 GiB
loopback copy took 2.81 CPU s (both ends) against 2.98. Compressor uses the system's library
where it loads (1.4 or later: the parameter API) and python-zstandard elsewhere. Decompression
stays with python-zstandard (it decodes into the caller's buffer already: 2.7 GB/s against 2.8).

ctypes lets go of the GIL during the call, as python-zstandard does, so compressing threads
run side by side. ``SMSREPL_SYSTEM_ZSTD=0`` in the environment keeps to python-zstandard.
"""
from __future__ import annotations

import ctypes
import logging
import os

from smsrepl._lazy import np
from smsrepl.errors import CompressionError

#: ZSTD_compress2 and ZSTD_CCtx_setParameter are stable from 1.4.0
MIN_VERSION = 10400
_C_LEVEL, _C_WINDOW_LOG, _C_CONTENT_SIZE, _C_CHECKSUM = 100, 101, 200, 201
_ERROR_DST_TOO_SMALL = 70  # ZSTD_error_dstSize_tooSmall

_lib: ctypes.CDLL | None = None
_looked = False


def library() -> ctypes.CDLL | None:
    """The system's libzstd, loaded on first use; None where there is none (or it is too old)."""
    global _lib, _looked
    if not _looked:
        _lib, _looked = _load(), True
    return _lib


def _load() -> ctypes.CDLL | None:
    wanted = os.environ.get("SMSREPL_SYSTEM_ZSTD", "1")
    if wanted not in ("0", "1"):
        logging.getLogger("smsrepl").warning(
            "SMSREPL_SYSTEM_ZSTD=%r is neither 0 nor 1: compressing with the system's libzstd where it loads",
            wanted)
    if wanted == "0":
        return None
    try:
        lib = ctypes.CDLL("libzstd.so.1")
        lib.ZSTD_versionNumber.restype = ctypes.c_uint
        lib.ZSTD_versionNumber.argtypes = []
        if lib.ZSTD_versionNumber() < MIN_VERSION:
            return None
        lib.ZSTD_createCCtx.restype = ctypes.c_void_p
        lib.ZSTD_createCCtx.argtypes = []
        lib.ZSTD_freeCCtx.restype = ctypes.c_size_t
        lib.ZSTD_freeCCtx.argtypes = [ctypes.c_void_p]
        lib.ZSTD_CCtx_setParameter.restype = ctypes.c_size_t
        lib.ZSTD_CCtx_setParameter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.ZSTD_compress2.restype = ctypes.c_size_t
        lib.ZSTD_compress2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                       ctypes.c_size_t]
        lib.ZSTD_isError.restype = ctypes.c_uint
        lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        lib.ZSTD_getErrorName.restype = ctypes.c_char_p
        lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
        lib.ZSTD_getErrorCode.restype = ctypes.c_int
        lib.ZSTD_getErrorCode.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return lib


def _address(buf) -> int:
    """Where a contiguous buffer's first byte is (read-only buffers too)."""
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data) if len(buf) else 0


class Context:
    """One compression context: one thread's (a zstd context is not thread-safe)."""

    def __init__(self, lib: ctypes.CDLL, level: int, window_log: int) -> None:
        self._lib = lib
        self._cctx = lib.ZSTD_createCCtx()
        if not self._cctx:
            raise CompressionError("zstd could not make a compression context (out of memory)")
        for param, value in ((_C_LEVEL, level), (_C_WINDOW_LOG, window_log), (_C_CONTENT_SIZE, 1), (_C_CHECKSUM, 0)):
            self._check(lib.ZSTD_CCtx_setParameter(self._cctx, param, value))

    def _check(self, code: int) -> int:
        if self._lib.ZSTD_isError(code):
            raise CompressionError(f"zstd compression failed: {self._lib.ZSTD_getErrorName(code).decode()}")
        return code

    def compress_into(self, data, out: bytearray, limit: int) -> int | None:
        """Compress ``data`` into one frame in ``out``'s first ``limit`` bytes; its length, or None
        when the frame does not fit."""
        code = self._lib.ZSTD_compress2(self._cctx, _address(out), min(limit, len(out)), _address(data), len(data))
        if self._lib.ZSTD_isError(code) and self._lib.ZSTD_getErrorCode(code) == _ERROR_DST_TOO_SMALL:
            return None
        return self._check(code)

    def __del__(self) -> None:
        cctx, self._cctx = getattr(self, "_cctx", None), None
        if cctx:
            self._lib.ZSTD_freeCCtx(cctx)
