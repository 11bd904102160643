"""tracefs for the change tracker: where it is, our instances, event formats, a disk's place.

Everything here reads or writes files under tracefs or /sys; nothing parses
events (see _pure/trace.py and _native/traceread.c). Instances are named
``smsrepl-<pid>-<start>-<major>_<minor>``, ``start`` being the process's start
time in clock ticks (/proc/PID/stat field 22): a killed tracker's instance
keeps recording and holds its ring buffer, and the next tracker removes every
instance whose process is gone (or whose pid now belongs to a later process).
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
from dataclasses import dataclass

from smsrepl.errors import TrackingUnavailable

INSTANCE_PREFIX = "smsrepl-"
_INSTANCE = re.compile(r"smsrepl-(\d+)-(\d+)-(\d+)_(\d+)$")
#: the ids our round markers carry in trace_marker_raw ("SMSR")
MARKER_MAGIC = 0x534D5352


def find_root(*, mount: bool = True) -> str:
    """The tracefs mount point, mounting it at /sys/kernel/tracing when root may and it is absent."""
    for path in _mounted_tracefs():
        if os.path.exists(os.path.join(path, "instances")):
            return path
    target = "/sys/kernel/tracing"
    if not mount:
        raise TrackingUnavailable("tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)")
    if os.geteuid() != 0:
        raise TrackingUnavailable("tracefs is not mounted and only root may mount it "
                                  "(mount -t tracefs nodev /sys/kernel/tracing)")
    if not os.path.isdir(target):
        raise TrackingUnavailable(f"this kernel has no {target} (tracefs is not built in)")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"nodev", target.encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise TrackingUnavailable(f"tracefs cannot be mounted at {target}: {os.strerror(err)}")
    return target


def _mounted_tracefs() -> list[str]:
    found = []
    try:
        with open("/proc/self/mountinfo", "rb") as fh:
            for line in fh:
                left, _, right = line.partition(b" - ")
                if right.split(b" ", 1)[0] == b"tracefs":
                    found.append(unescape_mount_path(left.split(b" ")[4]))
    except OSError:
        pass
    return found


def unescape_mount_path(field: bytes) -> str:
    """A mountinfo path field (spaces and the like written as octal escapes) as a str."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field))


def process_start(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2:].split()[19])


def instance_name(kernel_dev: int) -> str:
    pid = os.getpid()
    return f"{INSTANCE_PREFIX}{pid}-{process_start(pid)}-{kernel_dev >> 20}_{kernel_dev & 0xFFFFF}"


def remove_stale_instances(root: str) -> list[str]:
    """Remove the instances of trackers whose process is gone; returns their names."""
    removed: list[str] = []
    base = os.path.join(root, "instances")
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        m = _INSTANCE.match(name)
        if m is None:
            continue
        pid, start = int(m.group(1)), int(m.group(2))
        if process_start(pid) == start:
            continue  # a live tracker (this process's or another's)
        try:
            os.rmdir(os.path.join(base, name))
            removed.append(name)
        except OSError:
            pass  # held open by someone; the next start tries again
    return removed


def write(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


@dataclass(frozen=True, slots=True)
class EventFormat:
    id: int
    fields: dict  # name -> (offset, size)


def read_format(path: str) -> EventFormat:
    """Parse an event's ``format`` file (its id and every field's offset and size)."""
    with open(path) as fh:
        text = fh.read()
    m = re.search(r"^ID:\s*(\d+)", text, re.M)
    if m is None:
        raise TrackingUnavailable(f"{path} names no event ID")
    fields = {}
    for fm in re.finditer(r"field:([^;]*);\s*offset:(\d+);\s*size:(\d+);", text):
        decl = fm.group(1).strip()
        name = re.sub(r"\[.*\]$", "", decl.split()[-1])
        fields[name] = (int(fm.group(2)), int(fm.group(3)))
    return EventFormat(int(m.group(1)), fields)


def read_page_header(root: str) -> tuple[int, int, int]:
    """(commit offset, commit size, data offset) of a ring-buffer page, from events/header_page."""
    fields = {}
    with open(os.path.join(root, "events", "header_page")) as fh:
        for fm in re.finditer(r"field:\s*([^;]*);\s*offset:(\d+);\s*size:(\d+);", fh.read()):
            fields[fm.group(1).split()[-1]] = (int(fm.group(2)), int(fm.group(3)))
    try:
        (c_off, c_size), (d_off, _) = fields["commit"], fields["data"]
    except KeyError:
        raise TrackingUnavailable("tracefs's events/header_page lacks commit or data") from None
    return c_off, c_size, d_off


@dataclass(frozen=True, slots=True)
class DiskPlace:
    """Where a source device lies on its disk, in the terms block events use."""

    path: str
    disk: str  # the whole disk's name in /sys/block
    dev: int  # the whole disk's kernel dev_t (major << 20 | minor), as events carry it
    first_sector: int  # 512-byte sectors
    nsectors: int
    request_based: bool  # blk-mq: block_rq_complete; else block_bio_complete


def disk_place(path: str) -> DiskPlace:
    """Find a block device's whole disk, its start on it, and the kind of queue it has."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise TrackingUnavailable(f"source {path!r}: {exc.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise TrackingUnavailable(f"source {path!r} is not a block device: kernel tracking follows "
                                  "block devices (an image file's writes go through its file system)")
    sys_dir = os.path.realpath(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    if not os.path.isdir(sys_dir):
        raise TrackingUnavailable(f"source {path!r}: {sys_dir} is missing")
    if os.path.exists(os.path.join(sys_dir, "partition")):
        disk_dir = os.path.dirname(sys_dir)
        first = int(_read(os.path.join(sys_dir, "start")))
    else:
        disk_dir, first = sys_dir, 0
    nsectors = int(_read(os.path.join(sys_dir, "size")))
    major, minor = (int(x) for x in _read(os.path.join(disk_dir, "dev")).split(":"))
    return DiskPlace(path, os.path.basename(disk_dir), (major << 20) | minor, first, nsectors,
                     os.path.isdir(os.path.join(disk_dir, "mq")))


def online_cpus() -> list[int]:
    """The online CPUs (/sys/devices/system/cpu/online, e.g. ``0-3,6``)."""
    text = _read("/sys/devices/system/cpu/online")
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def cpu_stats(instance: str, cpu: int) -> dict[str, int]:
    """A CPU's ring-buffer counters (per_cpu/cpuN/stats): overrun, dropped events, ..."""
    out = {}
    with open(os.path.join(instance, "per_cpu", f"cpu{cpu}", "stats")) as fh:
        for line in fh:
            key, sep, value = line.partition(":")
            value = value.strip()
            if sep and value.isdigit():
                out[key.strip()] = int(value)
    return out


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read().strip()


def rmdir_instance(path: str) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
