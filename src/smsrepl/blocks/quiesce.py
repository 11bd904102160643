"""The cutover's quiesce: what the source's file systems hold in memory reaches the disk first.

Before the cutover round takes its boundary, every file system mounted from
the source device (its partitions, and devices stacked on it such as LVM or
LUKS, found through /sys/block/*/holders; read from /proc/self/mountinfo) is
synced with ``syncfs``, or, with ``freeze``, frozen with ``FIFREEZE`` and
kept frozen until the cutover round has read the last block. A file system
the operator froze already (``fsfreeze -f``) answers FIFREEZE with EBUSY and
syncfs at once: both are fine, it is already consistent on the disk, and it
is never thawed by smsrepl.

A freeze is always undone. A guard process of its own session makes the
freeze and holds it: it loads nothing and writes nothing once the file
systems are frozen, and thaws them when told to, when the sender goes away
without telling it (killed, crashed: its end of a pipe closes), or when the
freeze has lasted ``timeout`` seconds. The freeze is recorded in
``STATE/frozen.json`` before it is made, and a later run whose recorded
owner is gone thaws what it names (should the guard have died as well).
"""
from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import stat
import subprocess
import sys
import time
from dataclasses import dataclass

from smsrepl.errors import ConfigError
from smsrepl.blocks.tracefs import process_start, unescape_mount_path

log = logging.getLogger("smsrepl.quiesce")

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
#: seconds a freeze may last before the guard thaws it (the cutover round then runs again)
FREEZE_TIMEOUT = 60.0
FROZEN_RECORD = "frozen.json"

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class Mount:
    point: str
    dev: int  # st_dev of the file system
    fstype: str
    writable: bool  # the file system (its superblock) is mounted read-write


def stacked_devices(path: str) -> set[int]:
    """The device ``path`` names (or, for an image file, the loop devices it backs), its
    partitions, and every device stacked on them (holders)."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        roots = [st.st_rdev]
    elif stat.S_ISREG(st.st_mode):
        from smsrepl.blocks.loops import loop_devices_of

        roots = [dev for _, dev in loop_devices_of(path)]
    else:
        return set()
    found: set[int] = set()
    todo = [os.path.realpath(f"/sys/dev/block/{os.major(r)}:{os.minor(r)}") for r in roots]
    while todo:
        d = todo.pop()
        try:
            with open(os.path.join(d, "dev")) as fh:
                major, minor = (int(x) for x in fh.read().split(":"))
        except OSError:
            continue
        dev = os.makedev(major, minor)
        if dev in found:
            continue
        found.add(dev)
        name = os.path.basename(d)
        try:
            entries = os.listdir(d)
        except OSError:
            entries = []
        todo += [os.path.join(d, e) for e in entries if e.startswith(name) and os.path.exists(os.path.join(d, e, "partition"))]
        holders = os.path.join(d, "holders")
        try:
            todo += [os.path.realpath(os.path.join(holders, h)) for h in os.listdir(holders)]
        except OSError:
            pass
    return found


def mounts_of(devs: set[int]) -> list[Mount]:
    """One mount of each file system on ``devs`` (a bind mount shares its superblock)."""
    seen: dict[int, Mount] = {}
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            left, _, right = line.partition(b" - ")
            f = left.split(b" ")
            major, minor = (int(x) for x in f[2].split(b":"))
            dev = os.makedev(major, minor)
            if dev in devs and dev not in seen and f[3] == b"/":
                fstype, _source, options = (right.rstrip(b"\n").split(b" ") + [b"", b""])[:3]
                seen[dev] = Mount(unescape_mount_path(f[4]), dev, os.fsdecode(fstype),
                                  options.split(b",")[0] != b"ro")
    return list(seen.values())


def _open_mount(m: Mount) -> int | None:
    """A descriptor of the mount's root, or None when another mount now covers its path."""
    try:
        fd = os.open(m.point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("cannot open %s to sync it: %s", m.point, exc.strerror)
        return None
    if os.fstat(fd).st_dev != m.dev:
        os.close(fd)
        log.warning("%s is covered by another mount: its file system cannot be synced from here", m.point)
        return None
    return fd


#: the guard: freezes the file systems it is given (one result letter each: F frozen, B frozen
#: already, X not freezable), then thaws those it froze when told to ("t"), when the sender's
#: end of its stdin closes, or at the timeout (then it says "T"). It loads nothing once they are frozen.
_GUARD = r"""
import fcntl, os, select, sys, time
paths, timeout = sys.argv[1:-1], float(sys.argv[-1])
mine, out = [], b""
for p in paths:
    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, 0xC0045877, 0)
        mine.append(fd)
        out += b"F"
    except OSError as exc:
        out += b"B" if exc.errno == 16 else b"X"
os.write(1, out + b"\n")
deadline = time.monotonic() + timeout
while True:
    r, _, _ = select.select([0], [], [], max(0.0, deadline - time.monotonic()) if mine else None)
    if not r:
        for fd in mine:
            try:
                fcntl.ioctl(fd, 0xC0045878, 0)
            except OSError:
                pass
        mine = []
        os.write(1, b"T")
        continue
    data = os.read(0, 64)
    if not data or b"t" in data:
        break
for fd in mine:
    try:
        fcntl.ioctl(fd, 0xC0045878, 0)
    except OSError:
        pass
"""


class FreezeGuard:
    """The process that freezes ``points`` and thaws them (see _GUARD and the module doc)."""

    def __init__(self, points: list[str], timeout: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "-c", _GUARD, *points, repr(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True, close_fds=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None  # both are pipes
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        line = self.stdout.readline().strip()
        if len(line) != len(points):
            self.proc.kill()
            self.proc.wait()
            raise ConfigError("the freeze guard could not open the file systems to freeze")
        #: point -> "frozen", "frozen already" (the operator's: never thawed here) or "not freezable"
        self.results = {p: {"F": "frozen", "B": "frozen already", "X": "not freezable"}[chr(c)]
                        for p, c in zip(points, line)}

    def thaw(self) -> bool:
        """Thaw what the guard froze; True unless its timeout had thawed it already."""
        try:
            self.stdin.write(b"t")
            self.stdin.close()
        except OSError:
            pass
        out = self.stdout.read()
        self.proc.wait()
        return b"T" not in out


class Quiesce:
    """syncfs (or freeze) of the file systems on the source disks for the cutover round, and the
    thaw after it (a file system spanning two disks, as LVM makes them, is treated once)."""

    def __init__(self, sources: str | list[str], *, freeze: bool = False, timeout: float = FREEZE_TIMEOUT,
                 state_dir: str | None = None) -> None:
        if not 1 <= timeout <= 3600:
            raise ConfigError(f"--freeze-timeout {timeout:g}: must be between 1 and 3600 seconds")
        self.sources = [sources] if isinstance(sources, str) else list(sources)
        self.freeze = freeze
        self.timeout = timeout
        self.state_dir = state_dir
        self._guard: FreezeGuard | None = None
        #: what begin() did to each file system, for the round's summary
        self.done: dict[str, str] = {}
        if state_dir is not None:
            thaw_left_behind(state_dir)

    def mounts(self) -> list[Mount]:
        devs: set[int] = set()
        for source in self.sources:
            if os.path.exists(source):
                devs |= stacked_devices(source)
        return mounts_of(devs)

    def check(self) -> None:
        """Refuse a freeze that would stop this process: its own state must stay writable."""
        if not self.freeze or self.state_dir is None:
            return
        os.makedirs(self.state_dir, exist_ok=True)
        state_dev = os.stat(self.state_dir).st_dev
        for m in self.mounts():
            if m.dev == state_dev:
                raise ConfigError(f"--freeze would freeze {m.point}, which holds the state directory "
                                  f"{self.state_dir}: give a --state-dir on another disk (or sync without --freeze)")

    def begin(self) -> dict[str, str]:
        """Make what the source's file systems hold in memory durable on it; freeze them if asked."""
        self.done = {}
        mounts = self.mounts()
        if not mounts:
            return self.done
        sys.dont_write_bytecode = True  # an import must not write to a frozen file system
        if self.freeze:
            self._freeze(mounts)
        for m in mounts:
            if m.point in self.done:
                continue
            fd = _open_mount(m)
            if fd is None:
                self.done[m.point] = "unreachable"
                continue
            t0 = time.monotonic()
            try:
                if _libc.syncfs(fd) != 0:
                    err = ctypes.get_errno()
                    log.warning("syncfs %s: %s", m.point, os.strerror(err))
                    self.done[m.point] = f"syncfs failed: {os.strerror(err)}"
                else:
                    self.done[m.point] = "synced"
                    log.info("synced %s in %.3f s", m.point, time.monotonic() - t0)
            finally:
                os.close(fd)
        return self.done

    def _freeze(self, mounts: list[Mount]) -> None:
        points = []
        for m in mounts:
            fd = _open_mount(m)  # a covered mount point would freeze the wrong file system
            if fd is not None:
                os.close(fd)
                points.append(m.point)
        if not points:
            return
        if self.state_dir is not None:
            _write_record(os.path.join(self.state_dir, FROZEN_RECORD), points)
        self._guard = FreezeGuard(points, self.timeout)
        for point, what in self._guard.results.items():
            self.done[point] = what
            if what == "not freezable":
                log.warning("%s cannot be frozen; synced instead", point)
                del self.done[point]

    def end(self) -> bool:
        """Thaw what begin() froze. False when the guard had thawed it already (the freeze
        outlasted its timeout: the round may have read blocks written after the thaw)."""
        held = True
        if self._guard is not None:
            held = self._guard.thaw()
            self._guard = None
            if not held:
                log.warning("the freeze outlasted --freeze-timeout %g s and was thawed by its guard", self.timeout)
        if self.state_dir is not None:
            try:
                os.unlink(os.path.join(self.state_dir, FROZEN_RECORD))
            except FileNotFoundError:
                pass
        return held


def _write_record(path: str, points: list[str]) -> None:
    pid = os.getpid()
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"pid": pid, "start": process_start(pid), "points": points}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def thaw_left_behind(state_dir: str) -> list[str]:
    """Thaw the file systems a killed sender froze (should its guard have died too)."""
    path = os.path.join(state_dir, FROZEN_RECORD)
    try:
        with open(path) as fh:
            rec = json.load(fh)
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        rec = {}
    if rec.get("pid") and process_start(int(rec["pid"])) == rec.get("start"):
        return []  # its sender still runs
    thawed = []
    for point in rec.get("points", []):
        try:
            fd = os.open(point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.ioctl(fd, FITHAW, 0)
            thawed.append(point)
            log.warning("thawed %s, frozen by a sender that was killed", point)
        except OSError:
            pass  # not frozen
        finally:
            os.close(fd)
    os.unlink(path)
    return thawed
