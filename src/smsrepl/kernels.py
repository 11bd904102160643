"""Backend selection for the data-plane kernels.

``SMSREPL_BACKEND=pure`` selects the pure-Python reference (:mod:`smsrepl._pure`);
otherwise the C extension :mod:`smsrepl._native._core` is used. On CPython a
missing or broken native module is an ImportError (never a silent fall back to
the ~100x slower reference); other interpreters use the pure backend.

Public API (identical results in both backends; sizes in bytes)::

    ZERO_DIGEST = 0, UNKNOWN_DIGEST = 2**64 - 1, BACKEND = "native" | "pure"
    block_digests(buf, block_size, out) -> int       # out: uint64[ceil(len/bs)]
    zero_map(buf, block_size, out) -> int            # out: uint8/bool[ceil(len/bs)]
    file_signature(buf, block_size, weak_out, strong_out) -> int
    delta_search(weak, strong, block_size, old_len, data) -> np.ndarray int64 (n, 3)
    weak_checksum(buf) -> int
    delta_block_size(file_len) -> int
    apply_delta(old, rows, block_size, data) -> bytes
    read_ranges(fd, buf, offsets, lengths, depth) -> int   # scattered reads, depth in flight (AIO)
    write_ranges(fd, buf, offsets, lengths) -> int         # scattered pwrites, one call
    hash_files(dir_fd, names, out, budget) -> (done, bytes, [(index, errno)])  # XXH3-128 of whole files

Change tracking (traceread.c, twin in _pure/trace.py)::

    TraceReader(pipe_fd, marker_fd, cpu, page_size, idle_us, layout, dev, first, nsectors, bitmap)
    trace_take(bitmap, out) -> int                   # out |= bitmap; bitmap = 0 (atomically)
    trace_parse_page(page, layout, dev, first, nsectors, bitmap) -> dict of counts

Native only (``TREE``): the file-tree kernels of ``_native/fstree_*.c`` (scan_dir,
diff_records, group_records, read_files, write_files, link_files; xattr_cache, what
scan_dir knows of entries without xattrs across the scans of a process).
"""
from __future__ import annotations

import math
import os
import sys
import struct

from smsrepl._lazy import np

TYPE_CHECKING = False  # typing itself would cost every command 3 ms of imports
if TYPE_CHECKING:
    from typing import Any

#: the unit of block digests, dirty maps and the wire's block maps
FINE_BLOCK = 4096

_requested = os.environ.get("SMSREPL_BACKEND", "").strip().lower()
if _requested not in ("", "native", "pure"):
    raise ImportError(f"SMSREPL_BACKEND must be 'native' or 'pure', got {_requested!r}")

if _requested == "pure" or (
    _requested == "" and sys.implementation.name != "cpython"
):
    from smsrepl import _pure

    _impl: Any = _pure
    BACKEND = "pure"
    _delta_search = _impl.delta_search
else:
    try:
        from smsrepl._native import _core

        _impl = _core
    except ImportError as exc:  # pragma: no cover - depends on the build
        raise ImportError(
            "smsrepl native core (smsrepl._native._core) could not be imported: "
            f"{exc}. Build it with `python setup.py build_ext --inplace` or "
            "`pip install -e .`, or set SMSREPL_BACKEND=pure to use the slow "
            "pure-Python reference explicitly."
        ) from exc
    BACKEND = "native"

    def _delta_search(weak, strong, block_size: int, old_len: int, data) -> np.ndarray:
        raw = _impl.delta_search(weak, strong, block_size, old_len, data)
        return np.frombuffer(raw, dtype=np.int64).reshape(-1, 3)


#: digest sentinels, defined with the kernels that write them (blockscan.h; _pure twins them)
ZERO_DIGEST: int = _impl.ZERO_DIGEST
UNKNOWN_DIGEST: int = _impl.UNKNOWN_DIGEST

block_digests = _impl.block_digests
group_digests = _impl.group_digests
zero_map = _impl.zero_map
file_signature = _impl.file_signature
weak_checksum = _impl.weak_checksum
read_ranges = _impl.read_ranges
hash_files = _impl.hash_files
write_ranges = _impl.write_ranges

#: the file-tree kernels (fstree_*.c) exist natively only: where they are missing, file rounds
#: take their per-entry path, which is the reference these kernels are tested against
TREE = BACKEND == "native"
if TREE:
    scan_dir = _impl.scan_dir
    xattr_cache = _impl.xattr_cache
    diff_records = _impl.diff_records
    group_records = _impl.group_records
    read_files = _impl.read_files
    write_files = _impl.write_files
    link_files = _impl.link_files

if BACKEND == "native":
    TraceReader = _impl.TraceReader
    trace_take = _impl.trace_take
    trace_parse_page = _impl.trace_parse_page
else:
    # the change tracker's reader (_native/traceread.c) and its twin, imported when first used
    def TraceReader(*args):
        from smsrepl._pure.trace import PyTraceReader

        return PyTraceReader(*args)

    def trace_take(bitmap, out) -> int:
        from smsrepl._pure.trace import trace_take as take

        return take(bitmap, out)

    def trace_parse_page(page, layout, dev, first_sector, nsectors, bitmap) -> dict:
        from smsrepl._pure.trace import parse_page

        return parse_page(page, layout, dev, first_sector, nsectors, bitmap)


def delta_search(weak, strong, block_size: int, old_len: int, data) -> np.ndarray:
    """rsync-style delta of ``data`` against an old file's signature.

    ``weak``/``strong``: the uint32/uint64 arrays from :func:`file_signature` of
    the old file (``old_len`` bytes, same ``block_size``). Returns an int64 array
    of shape (n, 3): ``(0, offset_in_data, length)`` literal run, or
    ``(1, first_old_block, n_blocks)`` copy of consecutive old blocks. The rows
    cover ``data`` exactly, in order. See ``smsrepl._pure.delta_search`` for the
    exact algorithm and the bounds on the search.
    """
    return _delta_search(weak, strong, block_size, old_len, data)


def delta_block_size(file_len: int) -> int:
    """Block size for :func:`file_signature` of a file of ``file_len`` bytes.

    Mimics rsync (``sum_sizes_sqroot``): sqrt(len) rounded down to a multiple
    of 8, clamped to [700, 131072], so literal totals are comparable with
    rsync's "Literal data".
    """
    if file_len < 700 * 700:
        return 700
    return max(700, min(131072, (math.isqrt(file_len) // 8) * 8))


def apply_delta(old, rows: np.ndarray, block_size: int, data) -> bytes:
    """Rebuild the new file from ``old`` and the rows of :func:`delta_search`
    (literal rows are read from ``data``). Used by tests and tools."""
    old_mv, data_mv = memoryview(old).cast("B"), memoryview(data).cast("B")
    parts = []
    for kind, a, b in np.asarray(rows).tolist():
        if kind == 0:
            parts.append(data_mv[a : a + b])
        else:
            parts.append(old_mv[a * block_size : (a + b) * block_size])
    return b"".join(parts)


def _self_test() -> None:
    buf = bytes(range(256)) * 4 + bytes(1024) + b"smsrepl"
    out = bytearray(40)  # five little-endian uint64 (no numpy: importing it costs a short command 0.1 s)
    n = block_digests(buf, 512, out)
    if n != 3 or list(struct.unpack("<5Q", out)) != _SELF_TEST_DIGESTS:
        raise ImportError("smsrepl native core self-test failed" if BACKEND == "native"
                          else "smsrepl pure backend self-test failed")


_SELF_TEST_DIGESTS = [1177990759783856649, 1177990759783856649, 0, 0, 11997748179830375189]
_self_test()
