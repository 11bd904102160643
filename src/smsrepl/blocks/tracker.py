"""Kernel changed-block tracking: every write to the source disk, by any process or the kernel.

No kernel module: a private tracefs instance per tracked disk records
``block:block_rq_complete`` (request-based disks: virtio, NVMe, SCSI, loop)
or ``block:block_bio_complete`` (bio-based ones), filtered in the kernel to
the disk's dev and to writes, discards and write-zeroes (``nr_sector > 0 &&
!(rwbs ~ "R*")``). A reader per CPU, pinned to it, runs in the native core
(_native/traceread.c: a Python reader dropped events at about 150k writes/s,
the C one none at 292k events/s for 2.4% of a core) and sets one bit per
4 KiB block of the source in a bitmap shared with this module.

Writes count at **completion**: a write in flight across a boundary is
marked after it, so the next round reads it once it is on the disk (marking
at queue time left 789 wrong target blocks over 43 rounds in a test that
held writes in flight across boundaries; at completion, 0).

A round boundary (:meth:`KernelTracker.boundary`) is exact: each reader
writes a marker into its own CPU's buffer and the boundary is closed once
every reader has read its marker, so every write that completed before the
boundary was asked for is in the bits it returns. What a reader marks after
its marker but before the bits are taken goes to the earlier round, which
reads the block after the write completed: over-marking, never a miss.

Loss is never silent. Per-CPU ``overrun``/``dropped events`` counters (read
before the markers are written, so what they count completed before the
boundary), a page flagged "events missed", a marker that could not be
written, a reader that died, a CPU that came or went, a boundary whose
markers did not arrive in time: each makes the boundary report ``lost`` with
the reason, and the next round reads the whole disk.

:class:`TrackedDirtyMap` puts a tracker behind the dirty map's round
interface (freeze, release, trust: see dirtymap.py), which is what the
Sender, continuous sync and the agent drive.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from smsrepl._lazy import np

from smsrepl import faults, kernels
from smsrepl.errors import ConfigError
from smsrepl.blocks import tracefs
from smsrepl.blocks.dirtymap import _popcount, _ranges
from smsrepl.blocks.tracefs import MARKER_MAGIC
from smsrepl.errors import TrackingUnavailable

log = logging.getLogger("smsrepl.tracker")

#: ring buffer per CPU (SMSREPL_TRACE_BUFFER_KB). At 100k writes/s a CPU records about
#: 5.6 MB/s of events; 8 MiB rides out a reader that is kept off its CPU for over a second
BUFFER_KB = 8192
#: a reader that finds its buffer empty waits this long for more (a boundary's request
#: wakes it at once)
IDLE_US = 20000
#: markers not read within this long: the boundary is lost and the tracker starts again
BOUNDARY_TIMEOUT = 10.0
MODES = ("auto", "kernel", "scan")


@dataclass(frozen=True, slots=True)
class Boundary:
    seq: int
    blocks: int  # blocks newly marked since the previous boundary
    lost: str | None  # why writes since the previous boundary may be missing, else None


class KernelTracker:
    """The kernel's record of every write to one block device, as a bitmap of its 4 KiB blocks."""

    def __init__(self, path: str, *, buffer_kb: int = BUFFER_KB, idle_us: int = IDLE_US,
                 root: str | None = None) -> None:
        self.path = path
        self.place = tracefs.disk_place(path)
        self.nblocks = -(-self.place.nsectors // 8)
        self.size = self.place.nsectors * 512
        self.buffer_kb = buffer_kb
        self.idle_us = idle_us
        self._root = root
        self.instance: str | None = None
        self.bitmap = np.zeros(-(-self.nblocks // 64), dtype=np.uint64)
        self._readers: list = []
        self._threads: list[threading.Thread] = []
        self._fds: list[int] = []
        self._seq = 0
        self._cpus: list[int] = []
        self._stats: dict[int, tuple[int, int]] = {}
        self._missed: dict[int, int] = {}
        self._failures: dict[int, int] = {}
        self.broken: str | None = None  # why this tracker can no longer vouch for anything

    # --- start and stop -------------------------------------------------------------
    def start(self) -> "KernelTracker":
        if os.geteuid() != 0:
            raise TrackingUnavailable("kernel change tracking needs root (tracefs instances and "
                                      "block tracepoints are root's)")
        root = self._root or tracefs.find_root()
        for name in tracefs.remove_stale_instances(root):
            log.warning("removed tracing instance %s left by a tracker that was killed", name)
        try:
            self._open(root)
        except BaseException:
            self.close()
            raise
        faults.point("tracker.started")
        return self

    def _open(self, root: str) -> None:
        place = self.place
        events = os.path.join(root, "events")
        event = "block_rq_complete" if place.request_based else "block_bio_complete"
        try:
            fmt = tracefs.read_format(os.path.join(events, "block", event, "format"))
            marker = tracefs.read_format(os.path.join(events, "ftrace", "raw_data", "format"))
            commit_off, commit_size, data_off = tracefs.read_page_header(root)
        except FileNotFoundError as exc:
            raise TrackingUnavailable(f"this kernel's tracefs lacks {exc.filename}") from None
        try:
            f = [fmt.fields[k][0] for k in ("dev", "sector", "nr_sector", "rwbs")]
            marker_off = marker.fields["id"][0]
        except KeyError as exc:
            raise TrackingUnavailable(f"the {event} event has no field {exc}") from None
        rq = f if place.request_based else [0, 0, 0, 0]
        bio = [0, 0, 0, 0] if place.request_based else f
        self.layout = (commit_off, commit_size, data_off,
                       fmt.id if place.request_based else 0, 0 if place.request_based else fmt.id, marker.id,
                       *rq, *bio, marker_off, MARKER_MAGIC)
        self.instance = os.path.join(root, "instances", tracefs.instance_name(place.dev))
        try:
            os.mkdir(self.instance)
        except OSError as exc:
            self.instance = None
            raise TrackingUnavailable(f"cannot create a tracing instance under {root}/instances: {exc.strerror}") from None
        inst = self.instance
        tracefs.write(os.path.join(inst, "tracing_on"), "0")
        tracefs.write(os.path.join(inst, "buffer_size_kb"), str(self.buffer_kb))
        tracefs.write(os.path.join(inst, "options", "overwrite"), "0")  # a full buffer drops new events, never a marker
        try:
            self.page_size = int(open(os.path.join(inst, "buffer_subbuf_size_kb")).read()) * 1024
        except OSError:
            self.page_size = os.sysconf("SC_PAGE_SIZE")
        ev_dir = os.path.join(inst, "events", "block", event)
        major, minor = place.dev >> 20, place.dev & ((1 << 20) - 1)
        flt = f'dev == {place.dev} && nr_sector > 0 && !(rwbs ~ "R*")'
        try:
            tracefs.write(os.path.join(ev_dir, "filter"), flt)
        except OSError:
            # an older filter language: by disk in the kernel, the rest in the reader
            tracefs.write(os.path.join(ev_dir, "filter"), f"dev == {place.dev}")
        tracefs.write(os.path.join(ev_dir, "enable"), "1")
        self._cpus = tracefs.online_cpus()
        allowed = os.sched_getaffinity(0)
        if not set(self._cpus) <= allowed:
            raise TrackingUnavailable(f"this process may not run on CPUs {sorted(set(self._cpus) - allowed)}, "
                                      "where round markers must be written")
        marker_fd = os.open(os.path.join(inst, "trace_marker_raw"), os.O_WRONLY | os.O_CLOEXEC)
        self._fds.append(marker_fd)
        make = kernels.TraceReader
        for cpu in self._cpus:
            fd = os.open(os.path.join(inst, "per_cpu", f"cpu{cpu}", "trace_pipe_raw"),
                         os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            self._fds.append(fd)
            self._readers.append(make(fd, marker_fd, cpu, self.page_size, self.idle_us, self.layout,
                                      place.dev, place.first_sector, place.nsectors, self.bitmap))
            self._stats[cpu] = self._lost_counters(cpu)
            self._missed[cpu] = 0
            self._failures[cpu] = 0
        tracefs.write(os.path.join(inst, "tracing_on"), "1")
        for cpu, reader in zip(self._cpus, self._readers):
            t = threading.Thread(target=self._run, args=(cpu, reader), name=f"tracker-cpu{cpu}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("tracking writes to %s (%s, dev %d:%d, sectors %d+%d) in %s", self.path, event, major, minor,
                 place.first_sector, place.nsectors, inst)

    def _run(self, cpu: int, reader) -> None:
        try:
            reader.run()
        except OSError as exc:
            self.broken = f"the reader of CPU {cpu} stopped: {exc.strerror or exc}"
            log.warning("change tracking of %s: %s", self.path, self.broken)

    def close(self) -> None:
        for reader in self._readers:
            reader.stop()
        for t in self._threads:
            t.join()
        self._readers, self._threads = [], []
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self.instance is not None:
            try:
                tracefs.write(os.path.join(self.instance, "tracing_on"), "0")
            except OSError:
                pass
            tracefs.rmdir_instance(self.instance)
            self.instance = None

    def __enter__(self) -> "KernelTracker":
        return self.start() if self.instance is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- boundaries -------------------------------------------------------------------
    def _lost_counters(self, cpu: int) -> tuple[int, int]:
        assert self.instance is not None, "a tracker's counters are read while it runs"
        st = tracefs.cpu_stats(self.instance, cpu)
        return st.get("overrun", 0), st.get("dropped events", 0)

    def boundary(self, out: np.ndarray, *, timeout: float = BOUNDARY_TIMEOUT) -> Boundary:
        """Close the current round: OR every block written since the last boundary into ``out``
        (uint64 words, as ``bitmap``) and say whether some of those writes may be missing."""
        lost = []
        if self.broken:
            lost.append(self.broken)
        try:
            cpus = tracefs.online_cpus()
        except OSError:
            cpus = self._cpus
        if cpus != self._cpus:
            self.broken = f"online CPUs changed from {self._cpus} to {cpus}"
            lost.append(self.broken)
        # counters first: what they count was dropped before the markers, so it is this round's
        for cpu in self._cpus:
            now = self._lost_counters(cpu)
            before = self._stats[cpu]
            if now != before:
                lost.append(f"ring buffer of CPU {cpu} lost {now[0] - before[0] + now[1] - before[1]} events")
            self._stats[cpu] = now
        self._seq += 1
        seq = self._seq
        faults.point("tracker.boundary")
        for reader in self._readers:
            reader.request(seq)
        deadline = time.monotonic() + timeout
        waiting = list(zip(self._cpus, self._readers))
        while waiting:
            waiting = [(cpu, r) for cpu, r in waiting if r.state()["seen"] < seq]
            if not waiting:
                break
            if self.broken or time.monotonic() > deadline:
                self.broken = self.broken or (f"round markers of CPUs {[c for c, _ in waiting]} did not "
                                              f"arrive within {timeout:g} s")
                lost.append(self.broken)
                break
            time.sleep(0.001)
        for cpu, reader in zip(self._cpus, self._readers):
            st = reader.state()
            if st["seen_missed"] != self._missed[cpu]:
                lost.append(f"CPU {cpu}'s ring buffer reported missed events")
                self._missed[cpu] = st["seen_missed"]
            if st["marker_failures"] != self._failures[cpu]:
                lost.append(f"a round marker could not be written on CPU {cpu} (its buffer was full)")
                self._failures[cpu] = st["marker_failures"]
        taken = kernels.trace_take(self.bitmap, out)
        return Boundary(seq, taken, "; ".join(dict.fromkeys(lost)) or None)

    def live_blocks(self) -> int:
        """Blocks marked since the last boundary (read while readers may be marking more)."""
        return _popcount(self.bitmap.view(np.uint8))

    def counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for reader in self._readers:
            for k, v in reader.state().items():
                if k not in ("seen", "seen_missed", "error"):
                    total[k] = total.get(k, 0) + v
        return total


def buffer_kb_from_env() -> int:
    text = os.environ.get("SMSREPL_TRACE_BUFFER_KB", "").strip()
    if not text:
        return BUFFER_KB
    if not text.isdigit() or not 4 <= int(text) <= 1 << 20:
        raise ConfigError(f"SMSREPL_TRACE_BUFFER_KB={text!r}: expected KiB per CPU between 4 and 1048576")
    return int(text)


class TrackedDirtyMap:
    """A dirty map fed by a :class:`KernelTracker`, with DirtyMap's round interface.

    ``freeze()`` is a tracker boundary: the blocks written since the last one join
    the blocks of a round that has not released yet. The map is trusted only while
    one tracker has run without loss since the freeze of a round that read the whole
    source; anything else (the first round, a lost event, a tracker that had to start
    again) makes the next round read the whole disk, and its ``reason`` says why.
    """

    def __init__(self, path: str, *, buffer_kb: int | None = None, idle_us: int = IDLE_US) -> None:
        self.path = path
        buffer_kb = buffer_kb_from_env() if buffer_kb is None else buffer_kb
        self._buffer_kb, self._idle_us = buffer_kb, idle_us
        self.tracker = self._new_tracker()
        self.size = self.tracker.size
        self.nblocks = self.tracker.nblocks
        self._pending = np.zeros_like(self.tracker.bitmap)
        self._lock = threading.Lock()
        self.trusted = False
        self.reason = "tracking started with this process: writes before it are unknown"
        self.restarts = 0
        self.last_boundary: Boundary | None = None

    def _new_tracker(self) -> KernelTracker:
        return KernelTracker(self.path, buffer_kb=self._buffer_kb, idle_us=self._idle_us).start()

    def freeze(self) -> "FrozenBits":
        with self._lock:
            tracker = self.tracker
            if tracker.broken:
                # a tracker that lost its way cannot say what it missed since: a new one, and a scan
                why = tracker.broken
                tracker.close()
                self.tracker = self._new_tracker()
                self.restarts += 1
                log.warning("change tracking of %s started again (%s)", self.path, why)
                self.trusted, self.reason = False, f"tracking started again: {why}"
            b = self.tracker.boundary(self._pending)
            self.last_boundary = b
            if b.lost is not None:
                self.trusted, self.reason = False, f"change tracking lost events ({b.lost})"
                log.warning("change tracking of %s: %s; the next round reads the whole disk", self.path, b.lost)
            return FrozenBits(self)

    def trust(self) -> None:
        with self._lock:
            self.trusted, self.reason = True, "reconciled by a full round"

    def dirty_blocks(self) -> int:
        """Blocks a round has still to send: an unreleased round's and those marked since."""
        with self._lock:
            return _popcount(self._pending.view(np.uint8)) + self.tracker.live_blocks()

    def ranges(self) -> Iterator[tuple[int, int]]:
        with self._lock:
            snap = self._pending.copy()
        yield from _ranges(snap.view(np.uint8), self.size)

    def _release(self) -> None:
        with self._lock:
            self._pending[:] = 0

    def close(self) -> None:
        self.tracker.close()

    def __enter__(self) -> "TrackedDirtyMap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FrozenBits:
    """One round's blocks (DirtyMap's Frozen): release() once the round is durable on the target."""

    def __init__(self, owner: TrackedDirtyMap) -> None:
        self._owner = owner

    def ranges(self) -> Iterator[tuple[int, int]]:
        yield from _ranges(self._owner._pending.view(np.uint8), self._owner.size)

    def dirty_blocks(self) -> int:
        return _popcount(self._owner._pending.view(np.uint8))

    def release(self) -> None:
        self._owner._release()


def open_tracking(path: str, mode: str = "auto", *, notice=None, **opts) -> TrackedDirtyMap | None:
    """The change tracking a continuous sync of ``path`` uses: ``kernel`` (or an error naming
    what is missing), ``scan`` (None: every round reads the whole source), or ``auto``:
    kernel tracking where it can run, else scan rounds and one line to ``notice``."""
    if mode not in MODES:
        raise TrackingUnavailable(f"--tracking {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "scan":
        return None
    try:
        return TrackedDirtyMap(path, **opts)
    except TrackingUnavailable as exc:
        if mode == "kernel":
            raise
        if notice is not None:
            notice(f"notice: kernel change tracking unavailable ({exc.message}); sync rounds read the whole source")
        return None
