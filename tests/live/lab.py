"""What the live drivers share: tools that are not smsrepl, and smsrepl processes on loopback."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

CLI = [sys.executable, "-m", "smsrepl"]
BLOCK = 4096


def run(*cmd, check=True, **kw):
    cp = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if check and cp.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {cp.returncode}: {cp.stderr.strip()}")
    return cp


def sha_tree(root: str) -> dict[str, str]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "lost+found"]
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
            out[os.path.relpath(p, root)] = h.hexdigest()
    return out


def direct_copy(dev: str, dest: str) -> None:
    """The device as its disk holds it: dd with O_DIRECT (a tool that is not smsrepl)."""
    run("dd", f"if={dev}", f"of={dest}", "iflag=direct", "bs=1M", "status=none")


def diff_blocks(a: str, b: str) -> int:
    n = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if not x and not y:
                return n
            if x != y:
                for i in range(0, max(len(x), len(y)), BLOCK):
                    n += x[i:i + BLOCK] != y[i:i + BLOCK]


def judge_copy(snap: str, target: str, source_files: dict[str, str], mnt: str, *,
               replay_journal: bool = False) -> dict:
    """The receiver's image against the source: 4 KiB blocks that differ from ``snap`` (the
    source read with O_DIRECT), e2fsck -fn of the copy (its journal replayed first when asked,
    as its first boot would), and its files (sha256), mounted read-only at ``mnt``, against
    ``source_files``."""
    out: dict = {"different_blocks": diff_blocks(snap, target)}
    if replay_journal:
        run("e2fsck", "-E", "journal_only", "-p", target, check=False)
    fsck = run("e2fsck", "-fn", target, check=False)
    out["fsck_rc"], out["fsck_out"] = fsck.returncode, (fsck.stdout + fsck.stderr)[-1500:]
    loop = loop_device(target, read_only=True)
    try:
        run("mount", "-o", "ro,noload", loop, mnt)
        try:
            copied = sha_tree(mnt)
        finally:
            run("umount", mnt)
    finally:
        run("losetup", "-d", loop, check=False)
    out["files"] = len(source_files)
    out["files_differ"] = sorted(k for k in set(source_files) | set(copied)
                                 if source_files.get(k) != copied.get(k))[:20]
    return out


def release(mnt: str, dev: str, *, frozen: bool, mounted: bool) -> None:
    """After a live scenario, whatever happened: thaw, unmount and detach what it left."""
    if frozen:
        run("fsfreeze", "-u", mnt, check=False)
    if mounted:
        run("umount", "-l", mnt, check=False)
    run("losetup", "-d", dev, check=False)


def stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def frozen(mnt: str) -> bool:
    """True when the file system at mnt is frozen (a freeze of our own is refused with EBUSY)."""
    cp = run("fsfreeze", "-f", mnt, check=False)
    if cp.returncode == 0:
        run("fsfreeze", "-u", mnt)
        return False
    return "busy" in cp.stderr.lower()


def loop_device(image: str, size: int | None = None, *, read_only: bool = False) -> str:
    if size is not None:
        with open(image, "wb") as fh:
            fh.truncate(size)
    return run("losetup", *(["-r"] if read_only else []), "-f", "--show", image).stdout.strip()


def start_receiver(work: str, certkey: str, target: str, *, port: int = 0,
                   faults: str = "") -> tuple[subprocess.Popen, int]:
    rx = subprocess.Popen(CLI + ["receive", "--listen", f"127.0.0.1:{port}", "--certkey", certkey, "--state-dir",
                                 os.path.join(work, "rx"), "--checkpoint-seconds", "0.2", "--create",
                                 "--target", f"disk0={target}"], stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "SMSREPL_FAULTS": faults})
    line = rx.stderr.readline()
    m = re.search(r"listening on [\d.]+:(\d+)", line)
    if m is None:
        rx.kill()
        raise RuntimeError(f"receiver did not start: {line}")
    threading.Thread(target=rx.stderr.read, daemon=True).start()
    return rx, int(m.group(1))


class Continuous:
    """A ``send ... --continuous --json`` process with its summary lines collected as they come."""

    def __init__(self, args: list[str], env: dict | None = None) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.rounds: list[dict] = []
        self.stderr: list[str] = []
        self._cv = threading.Condition()
        self._t = [threading.Thread(target=self._out, daemon=True), threading.Thread(target=self._err, daemon=True)]
        for t in self._t:
            t.start()

    def _out(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                with self._cv:
                    self.rounds.append(json.loads(line))
                    self._cv.notify_all()

    def _err(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait_rounds(self, n: int, timeout: float = 120) -> bool:
        """Until at least n rounds have completed in all."""
        end = time.monotonic() + timeout
        with self._cv:
            while len(self.rounds) < n:
                left = end - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return len(self.rounds) >= n
                self._cv.wait(min(left, 0.5))
        return True

    def finish(self, timeout: float = 180) -> int:
        rc = self.proc.wait(timeout)
        for t in self._t:
            t.join(10)
        return rc

    def round_now(self, timeout: float = 120) -> dict | None:
        """SIGUSR1 (a round now), then that round's summary (None: the sender ended first)."""
        with self._cv:
            n = len(self.rounds)
        self.proc.send_signal(signal.SIGUSR1)
        self.wait_rounds(n + 1, timeout)
        with self._cv:
            return self.rounds[n] if len(self.rounds) > n else None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Sender(Continuous):
    """``send block --continuous`` of ``dev`` to target disk0."""

    def __init__(self, dev: str, port: int, certkey: str, work: str, *flags: str, faults: str = "",
                 env: dict | None = None) -> None:
        super().__init__(CLI + ["send", "block", "--json", dev, "--to", f"127.0.0.1:{port}", "--target", "disk0",
                                "--certkey", certkey, "--state-dir", os.path.join(work, "tx"), "--continuous", *flags],
                         env={**os.environ, **(env or {}), "SMSREPL_FAULTS": faults})
