"""File-level replication over loopback against rsync, same run, medians of N.

    python benchmarks/files.py [--files 50000] [--dirs 500] [--runs 3] [--tmp DIR] [--target-fs auto|ext4|tmp]
                               [--receivers once|persistent] [--senders process|continuous]

Targets (both tools') go on a fresh ext4 file system in a loop-mounted image (``--target-fs
ext4``; ``auto``, the default, where this runs as root and may mount): a migration target is
a freshly made file system, and a reused one measures its history instead. On an ext4
without a journal, every inode allocation walks past the inodes freed in the last one to
six minutes (ext4's recently_deleted()): a benchmark right after deleting a tree measured
file creation 10x slower, for both tools. ``tmp`` puts them under --tmp.

Cases (interleaved per run, which tool goes first alternating from run to run):
  initial copy  smsrepl send files (TLS 1.3, zstd level 2 by default) -> receive  vs  rsync -aH to a loopback daemon
  sync round    after 1% of the files were rewritten: smsrepl (second run) vs rsync -aH --delete
Reports wall seconds, files per second and wire bytes. Each smsrepl round goes to a receiver
started for it (``--receivers once``, the default) or to one long-running receiver per target
(``persistent``: how a target helper runs, and what the rsync daemon is to rsync).
``--senders continuous`` runs each target's rounds in one ``send files --continuous``
session, as an agent runs SYNC_LINUX_FILE: the copy is its first round (timed from the
process's start), and each sync round is a SIGUSR1 (the SYNC command), timed from the
signal to the round's summary line, as replication.py times a block sync command.
It implies persistent receivers.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from replication import CLI, RsyncDaemon, free_port  # noqa: E402
from smsrepl.lab.certs import make_bundle, write_certkey  # noqa: E402


def make_tree(root: str, files: int, dirs: int, seed: int = 1) -> int:
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz ") for _ in range(rng.randint(2, 9))) for _ in range(500)]
    total = 0
    for d in range(dirs):
        os.makedirs(os.path.join(root, f"d{d // 50:02}", f"s{d:03}"))
    for i in range(files):
        d = i % dirs
        size = rng.randint(1 << 10, 16 << 10)
        data = b" ".join(rng.choice(words) for _ in range(size // 5))[:size]
        with open(os.path.join(root, f"d{d // 50:02}", f"s{d:03}", f"f{i:06}.txt"), "wb") as fh:
            fh.write(data)
        total += len(data)
    return total


def change(root: str, fraction: float, seed: int = 2) -> int:
    rng = random.Random(seed)
    paths = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs)
    picked = rng.sample(paths, int(len(paths) * fraction))
    for p in picked:
        with open(p, "r+b") as fh:
            fh.seek(rng.randint(0, 500))
            fh.write(b"CHANGED %d" % rng.randint(0, 1 << 30))
    return len(picked)


class SmsTarget:
    """One smsrepl target and its receiver: started for each round (``once``), or once for all."""

    def __init__(self, ck: str, dst: str, state: str, once: bool, continuous: bool = False) -> None:
        self.ck, self.dst, self.state, self.once, self.continuous = ck, dst, state, once, continuous
        self.rx: subprocess.Popen | None = None
        self.tx: subprocess.Popen | None = None  # the continuous session

    def _start(self) -> None:
        self.port = free_port()
        self.rx = subprocess.Popen(CLI + ["receive", "--listen", f"127.0.0.1:{self.port}", "--certkey", self.ck,
                                          "--create", "--target", f"t={self.dst}", "--state-dir", self.state]
                                   + (["--once"] if self.once else []), stderr=subprocess.PIPE)
        line = self.rx.stderr.readline()
        if b"listening" not in line:
            raise RuntimeError(line)
        if not self.once:  # nobody reads its log from here on
            self.rx.stderr.close()

    def _send_args(self, src: str) -> list[str]:
        return CLI + ["send", "files", "--json", src, "--to", f"127.0.0.1:{self.port}", "--target", "t", "--certkey", self.ck]

    def round(self, src: str) -> dict:
        if self.rx is None:
            self._start()
        if self.continuous:
            return self._continuous_round(src)
        t0 = time.perf_counter()
        cp = subprocess.run(self._send_args(src), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if self.once:
            self.rx.wait(60)
            self.rx = None
        if cp.returncode:
            raise RuntimeError(cp.stderr)
        out = json.loads(cp.stdout)
        return {"wall": wall, "wire": out["wire_bytes"], "sent": out["files_sent"]}

    def _continuous_round(self, src: str) -> dict:
        t0 = time.perf_counter()
        if self.tx is None:
            self.tx = subprocess.Popen(self._send_args(src) + ["--continuous", "--interval", "86400"],
                                       stdout=subprocess.PIPE, text=True)
        else:
            self.tx.send_signal(signal.SIGUSR1)
        line = self.tx.stdout.readline()
        wall = time.perf_counter() - t0
        if not line:
            raise RuntimeError(f"continuous sender exited with {self.tx.wait(60)}")
        out = json.loads(line)
        return {"wall": wall, "wire": out["wire_bytes"], "sent": out["files_sent"]}

    def stop(self) -> None:
        if self.tx is not None:
            self.tx.send_signal(signal.SIGTERM)  # the cutover round, then exit
            self.tx.communicate(timeout=120)
            self.tx = None
        if self.rx is not None:
            self.rx.terminate()
            self.rx.wait(30)
            self.rx = None


def rsync(src: str, port: int, name: str, *flags: str) -> dict:
    t0 = time.perf_counter()
    cp = subprocess.run(["rsync", "-aH", *flags, "--stats", f"{src}/", f"rsync://127.0.0.1:{port}/bench/{name}/"],
                        capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    sent = int(next(x for x in cp.stdout.splitlines() if x.startswith("Total bytes sent")).split(":")[1]
               .replace(",", "").split()[0])
    return {"wall": wall, "wire": sent}


class TargetFS:
    """A fresh ext4 file system for the targets, in a sparse image under ``tmp``, mounted
    while the benchmark runs (None where it cannot be made: not root, no loop devices).

    The loop device does direct I/O to its image where it can (``losetup --direct-io=on``),
    as a disk would: a buffered loop device puts every block written through the page cache
    twice and writes it back twice, once to the image and once to the disk under it, which
    is a cost of the benchmark's plumbing, paid only by a tool that makes its writes durable
    during the timed run."""

    def __init__(self, tmp: str, size: int, inodes: int) -> None:
        self.image = os.path.join(tmp, "targets.img")
        self.mount = os.path.join(tmp, "targets")
        os.makedirs(self.mount)
        with open(self.image, "wb") as fh:
            fh.truncate(size)
        # inode tables and journal written now: not by ext4lazyinit in the background of the first runs
        subprocess.run(["mkfs.ext4", "-q", "-F", "-N", str(inodes), "-E", "lazy_itable_init=0,lazy_journal_init=0",
                        self.image], check=True)
        self.device = None
        for dio in ("on", "off"):
            cp = subprocess.run(["losetup", "--find", "--show", f"--direct-io={dio}", self.image],
                                capture_output=True, text=True)
            if cp.returncode == 0:
                self.device, self.direct_io = cp.stdout.strip(), dio == "on"
                break
        if self.device is None:
            raise OSError(f"no loop device for {self.image}: {cp.stderr.strip()}")
        try:
            subprocess.run(["mount", self.device, self.mount], check=True)
        except subprocess.CalledProcessError:
            subprocess.run(["losetup", "-d", self.device], check=False)
            raise

    def describe(self) -> str:
        return f"a fresh ext4 (loop device, direct I/O {'on' if self.direct_io else 'off'})"

    @classmethod
    def make(cls, tmp: str, size: int, inodes: int, want: str) -> "TargetFS | None":
        if want == "tmp" or (want == "auto" and os.geteuid() != 0):
            return None
        try:
            return cls(tmp, size, inodes)
        except (OSError, subprocess.CalledProcessError) as exc:
            if want == "ext4":
                raise
            print(f"targets under --tmp: no loop-mounted ext4 here ({exc})", file=sys.stderr)
            return None

    def close(self) -> None:
        subprocess.run(["umount", self.mount], check=False)
        subprocess.run(["losetup", "-d", self.device], check=False)
        os.unlink(self.image)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--dirs", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--target-fs", choices=["auto", "ext4", "tmp"], default="auto",
                    help="where both tools write: a fresh loop-mounted ext4 (auto: where root can mount), or --tmp")
    ap.add_argument("--receivers", choices=["once", "persistent"], default="once",
                    help="a receiver started for each smsrepl round, or one long-running receiver per target")
    ap.add_argument("--senders", choices=["process", "continuous"], default="process",
                    help="a send files process for each round, or one --continuous session per target whose "
                         "sync rounds are SIGUSR1 (implies persistent receivers)")
    ap.add_argument("--delta-gib", type=float, default=0,
                    help="only the delta case: a file of this size, 100 bytes inserted in the middle, one sync round")
    args = ap.parse_args()
    if args.delta_gib:
        return delta_case(args.delta_gib, args.tmp)
    tmp = tempfile.mkdtemp(prefix="smsrepl-files-", dir=args.tmp)
    try:
        ck = str(write_certkey(os.path.join(tmp, "certs"), make_bundle()))
        src = os.path.join(tmp, "src")
        total = make_tree(src, args.files, args.dirs)
        fs = TargetFS.make(tmp, 2 * args.runs * (total + args.files * 4096) * 5 // 4 + (512 << 20),
                           2 * args.runs * args.files * 5 // 4 + 20_000, args.target_fs)
        out = fs.mount if fs else tmp
        root = os.path.join(out, "rsync-root")
        os.makedirs(root)
        daemon = RsyncDaemon(root, tmp)
        res = {k: [] for k in ("smsrepl copy", "rsync copy", "smsrepl sync", "rsync sync")}
        changed = 0
        continuous = args.senders == "continuous"
        once = args.receivers == "once" and not continuous  # a continuous session needs its receiver to stay
        targets = [SmsTarget(ck, os.path.join(out, f"sms{run}"), os.path.join(tmp, f"st{run}"), once, continuous)
                   for run in range(args.runs)]
        try:
            for case, flags in (("copy", ()), ("sync", ("--delete",))):
                if case == "sync":
                    changed = change(src, 0.01)
                for run in range(args.runs):
                    # which tool goes first alternates from run to run: neither always meets
                    # what the other left behind (writeback, a warmer or colder cache)
                    for tool in (("smsrepl", "rsync") if run % 2 == 0 else ("rsync", "smsrepl")):
                        subprocess.run(["sync"], check=True)
                        res[f"{tool} {case}"].append(targets[run].round(src) if tool == "smsrepl"
                                                     else rsync(src, daemon.port, f"r{run}", *flags))
            # the oracle: rsync finds nothing to change after the last smsrepl round
            oracle = subprocess.run(["rsync", "-aHAXn", "--numeric-ids", "--checksum", "-i", f"{src}/",
                                     os.path.join(out, f"sms{args.runs - 1}") + "/"], capture_output=True, text=True)
            differing = len([x for x in oracle.stdout.splitlines() if x.strip()])
        finally:
            for t in targets:
                t.stop()
            daemon.stop()
            if fs is not None:
                fs.close()
        print(f"targets on {fs.describe() if fs else out}; smsrepl receivers: {'once' if once else 'persistent'}; "
              f"senders: {args.senders}")
        print(f"\ntree: {args.files} files of 1-16 KiB ({total / 1e6:.0f} MB) in {args.dirs} directories; "
              f"sync change: {changed} files rewritten in place; medians of {args.runs}\n")
        print("| case | wall s | files/s | wire MB | each run, s |\n|---|---:|---:|---:|---|")
        med = {}
        for k, rows in res.items():
            wall = statistics.median(r["wall"] for r in rows)
            wire = statistics.median(r["wire"] for r in rows)
            med[k] = wall
            runs = " ".join(f"{r['wall']:.2f}" for r in rows)
            print(f"| {k} | {wall:.2f} | {args.files / wall:.0f} | {wire / 1e6:.2f} | {runs} |")
        print(f"\ninitial copy: smsrepl {med['rsync copy'] / med['smsrepl copy']:.2f}x rsync's files per second")
        print(f"sync round:   smsrepl {med['rsync sync'] / med['smsrepl sync']:.2f}x faster than rsync")
        print(f"rsync -aHAXn --checksum oracle after the last smsrepl round: {differing} lines (0: identical)")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def delta_case(gib: float, tmpdir: str | None) -> int:
    import numpy as np

    tmp = tempfile.mkdtemp(prefix="smsrepl-delta-", dir=tmpdir)
    try:
        ck = str(write_certkey(os.path.join(tmp, "certs"), make_bundle()))
        src = os.path.join(tmp, "src")
        os.makedirs(src)
        size = int(gib * (1 << 30))
        rng = np.random.default_rng(3)
        path = os.path.join(src, "big.bin")
        with open(path, "wb") as fh:
            for _ in range(0, size, 64 << 20):
                fh.write(rng.integers(0, 256, 64 << 20, dtype=np.uint8).tobytes())
        target = SmsTarget(ck, os.path.join(tmp, "dst"), os.path.join(tmp, "st"), once=True)
        target.round(src)
        mid = size // 2 + 4321
        with open(path, "r+b") as fh:  # insert 100 bytes: everything after shifts
            fh.seek(mid)
            tail = fh.read()
            fh.seek(mid)
            fh.write(b"I" * 100 + tail)
        del tail
        subprocess.run(["sync"], check=True)
        r = target.round(src)
        same = subprocess.run(["cmp", path, os.path.join(target.dst, "big.bin")]).returncode == 0
        print(f"| file | sync round s | wire bytes | wire / file size | identical |\n|---|---:|---:|---:|---|\n"
              f"| {gib:g} GiB, 100 bytes inserted | {r['wall']:.2f} | {r['wire']} | {r['wire'] / size:.5%} | {same} |")
        return 0 if same else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
