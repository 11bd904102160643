"""The pure-Python twin of _native/traceread.c: ring-buffer pages parsed, and a CPU's reader.

The page and event layouts are drawn in traceread.h. ``parse_page`` gives the
same counts and sets the same bits as the C parser (the tests compare them on
generated pages); ``PyTraceReader`` has the native TraceReader's face and is
what the pure backend (``SMSREPL_BACKEND=pure``) runs. It is far slower: a
Python reader dropped events at about 150k writes per second where the C one
kept up.
"""
from __future__ import annotations

import errno
import os
import select
import struct
import threading

from smsrepl._lazy import np

MISSED_EVENTS = 1 << 31
COMMIT_MASK = (1 << 27) - 1
#: layout tuple fields, in traceread.h's order
FIELDS = ("commit_off", "commit_size", "data_off", "id_rq", "id_bio", "id_marker",
          "rq_dev", "rq_sector", "rq_nr", "rq_rwbs", "bio_dev", "bio_sector", "bio_nr", "bio_rwbs",
          "marker_off", "marker_magic")
_LOCK = threading.Lock()  # bits set by Python readers and taken by trace_take


def _counts() -> dict:
    return {"ok": 1, "pages": 0, "events": 0, "marks": 0, "missed_pages": 0, "foreign": 0, "last_marker": 0}


def _mark(bitmap: np.ndarray, first: int, nsectors: int, sector: int, nr: int) -> None:
    lo, hi = first, first + nsectors
    end = sector + nr
    if not nr or end <= lo or sector >= hi:
        return
    b0 = (max(sector, lo) - lo) // 8
    b1 = min((min(end, hi) - lo - 1) // 8 + 1, -(-nsectors // 8))
    bits = bitmap.view(np.uint8)
    for b in range(b0, b1):
        bits[b >> 3] |= 1 << (b & 7)


def parse_page(page, layout, dev: int, first: int, nsectors: int, bitmap, counts: dict | None = None) -> dict:
    """Parse one page as sms_trace_parse_page does; ``bitmap`` a uint64 array of the source's blocks."""
    lay = dict(zip(FIELDS, layout))
    c = counts if counts is not None else _counts()
    page = bytes(page)
    data_off, c_off, c_size = lay["data_off"], lay["commit_off"], lay["commit_size"]
    if len(page) < data_off or c_off + c_size > len(page) or c_size not in (4, 8):
        c["ok"] = 0
        return c
    commit = int.from_bytes(page[c_off:c_off + c_size], "little")
    c["pages"] += 1
    if commit & MISSED_EVENTS:
        c["missed_pages"] += 1
    size = commit & COMMIT_MASK
    p = page[data_off:]
    if size > len(p):
        c["ok"] = 0
        return c
    pos = 0
    while pos + 4 <= size:
        head = struct.unpack_from("<I", p, pos)[0]
        tl, delta = head & 31, head >> 5
        if tl == 29:
            if delta == 0:
                break
            if pos + 8 > size:
                c["ok"] = 0
                return c
            nxt = pos + 4 + struct.unpack_from("<I", p, pos + 4)[0]
        elif tl >= 30:
            nxt = pos + 8
        elif tl == 0:
            if pos + 8 > size:
                c["ok"] = 0
                return c
            ln = struct.unpack_from("<I", p, pos + 4)[0]
            nxt = pos + 4 + ln
            if ln < 4 or nxt > size:
                c["ok"] = 0
                return c
            _event(p[pos + 8:nxt], lay, dev, first, nsectors, bitmap, c)
        else:
            nxt = pos + 4 + 4 * tl
            if nxt > size:
                c["ok"] = 0
                return c
            _event(p[pos + 4:nxt], lay, dev, first, nsectors, bitmap, c)
        if nxt <= pos:
            c["ok"] = 0
            return c
        pos = nxt
    return c


def _event(data: bytes, lay: dict, dev: int, first: int, nsectors: int, bitmap, c: dict) -> None:
    if len(data) < 2:
        return
    kind = struct.unpack_from("<H", data, 0)[0]
    if lay["id_marker"] and kind == lay["id_marker"]:
        off = lay["marker_off"]
        if len(data) >= off + 12 and struct.unpack_from("<I", data, off)[0] == lay["marker_magic"]:
            c["marks"] += 1
            c["last_marker"] = max(c["last_marker"], struct.unpack_from("<Q", data, off + 4)[0])
        return
    if lay["id_rq"] and kind == lay["id_rq"]:
        o = (lay["rq_dev"], lay["rq_sector"], lay["rq_nr"], lay["rq_rwbs"])
    elif lay["id_bio"] and kind == lay["id_bio"]:
        o = (lay["bio_dev"], lay["bio_sector"], lay["bio_nr"], lay["bio_rwbs"])
    else:
        c["foreign"] += 1
        return
    need = max(o[0] + 4, o[1] + 8, o[2] + 4, o[3] + 1)
    if len(data) < need or struct.unpack_from("<I", data, o[0])[0] != dev:
        c["foreign"] += 1
        return
    c["events"] += 1
    if data[o[3]] == ord("R"):
        return
    with _LOCK:
        _mark(bitmap, first, nsectors, struct.unpack_from("<Q", data, o[1])[0], struct.unpack_from("<I", data, o[2])[0])


def trace_take(bitmap, out) -> int:
    """out |= bitmap, bitmap = 0; returns the bits moved (the pure twin of sms_trace_take)."""
    with _LOCK:
        b = np.frombuffer(bitmap, dtype=np.uint64)
        o = np.frombuffer(out, dtype=np.uint64)
        taken = int(np.unpackbits(b.view(np.uint8)).sum())
        np.bitwise_or(o, b, out=o)
        b[:] = 0
    return taken


class PyTraceReader:
    """The native TraceReader's face, in Python (see the module doc)."""

    def __init__(self, pipe_fd: int, marker_fd: int, cpu: int, page_size: int, idle_us: int, layout,
                 dev: int, first_sector: int, nsectors: int, bitmap) -> None:
        self._args = (pipe_fd, marker_fd, cpu, page_size, idle_us / 1e6)
        self._layout = tuple(layout)
        self._disk = (dev, first_sector, nsectors, np.frombuffer(bitmap, dtype=np.uint64))
        self._magic = dict(zip(FIELDS, layout))["marker_magic"]
        self._want = self._written = self._seen = self._seen_missed = self._failures = 0
        self._stop = False
        self._error = 0
        self._counts = _counts()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def __del__(self) -> None:
        try:
            os.close(self._wake)
        except (AttributeError, OSError):
            pass

    def request(self, seq: int) -> None:
        if seq < 1:
            raise ValueError("request: a boundary is numbered from 1")
        self._want = seq
        self._poke()

    def stop(self) -> None:
        self._stop = True
        self._poke()

    def _poke(self) -> None:
        try:
            os.eventfd_write(self._wake, 1)
        except BlockingIOError:
            pass

    def state(self) -> dict:
        c = self._counts
        return {"seen": self._seen, "seen_missed": self._seen_missed, "pages": c["pages"], "events": c["events"],
                "marks": c["marks"], "missed_pages": c["missed_pages"], "foreign": c["foreign"],
                "marker_failures": self._failures, "error": self._error}

    def run(self) -> None:
        pipe_fd, marker_fd, cpu, page_size, idle = self._args
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        try:
            os.sched_setaffinity(0, {cpu})
            if os.sched_getaffinity(0) != {cpu}:
                raise OSError(errno.EXDEV, "not on its CPU")
            while not self._stop:
                want = self._want
                if want > self._written:
                    try:
                        os.write(marker_fd, struct.pack("<IQ", self._magic, want))
                        self._written = want
                    except OSError as exc:
                        if exc.errno != errno.EBADF:
                            raise
                        self._failures += 1
                try:
                    page = os.read(pipe_fd, page_size)
                except BlockingIOError:
                    page = b""
                if not page:
                    if poller.poll(max(1, int(idle * 1000))):
                        try:
                            os.eventfd_read(self._wake)
                        except BlockingIOError:
                            pass
                    continue
                before = self._counts["last_marker"]
                parse_page(page, self._layout, *self._disk, counts=self._counts)
                if self._counts["last_marker"] != before and self._counts["last_marker"] <= self._written:
                    self._seen_missed = self._counts["missed_pages"]
                    self._seen = self._counts["last_marker"]
        except OSError as exc:
            self._error = exc.errno or errno.EIO
            raise
