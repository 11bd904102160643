"""File-level replication over loopback against rsync, same run, medians of N.

    python benchmarks/files.py [--files 50000] [--dirs 500] [--runs 3] [--tmp DIR] [--target-fs auto|ext4|tmp]
                               [--receivers once|persistent]

Targets (both tools') go on a fresh ext4 file system in a loop-mounted image (``--target-fs
ext4``; ``auto``, the default, where this runs as root and may mount): a migration target is
a freshly made file system, and a reused one measures its history instead. On an ext4
without a journal, every inode allocation walks past the inodes freed in the last one to
six minutes (ext4's recently_deleted()): a benchmark right after deleting a tree measured
file creation 10x slower, for both tools. ``tmp`` puts them under --tmp.

Cases (interleaved per run):
  initial copy  smsrepl send files (TLS 1.3, zstd level 2 by default) -> receive  vs  rsync -aH to a loopback daemon
  sync round    after 1% of the files were rewritten: smsrepl (second run) vs rsync -aH --delete
Reports wall seconds, files per second and wire bytes. Each smsrepl round goes to a receiver
started for it (``--receivers once``, the default) or to one long-running receiver per target
(``persistent``: how a target helper runs, and what the rsync daemon is to rsync).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from replication import CLI, RsyncDaemon, free_port  # noqa: E402
from smsrepl.certs import make_bundle, write_certkey  # noqa: E402


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

    def __init__(self, ck: str, dst: str, state: str, once: bool) -> None:
        self.ck, self.dst, self.state, self.once = ck, dst, state, once
        self.rx: subprocess.Popen | None = None

    def _start(self) -> None:
        self.port = free_port()
        self.rx = subprocess.Popen(CLI + ["receive", "--listen", f"127.0.0.1:{self.port}", "--certkey", self.ck,
                                          "--target", f"t={self.dst}", "--state-dir", self.state]
                                   + (["--once"] if self.once else []), stderr=subprocess.PIPE)
        line = self.rx.stderr.readline()
        if b"listening" not in line:
            raise RuntimeError(line)
        if not self.once:  # nobody reads its log from here on
            self.rx.stderr.close()

    def round(self, src: str) -> dict:
        if self.rx is None:
            self._start()
        t0 = time.perf_counter()
        cp = subprocess.run(CLI + ["send", "files", src, "--to", f"127.0.0.1:{self.port}", "--target", "t",
                                   "--certkey", self.ck], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if self.once:
            self.rx.wait(60)
            self.rx = None
        if cp.returncode:
            raise RuntimeError(cp.stderr)
        out = json.loads(cp.stdout)
        return {"wall": wall, "wire": out["wire_bytes"], "sent": out["files_sent"]}

    def stop(self) -> None:
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
    while the benchmark runs (None where it cannot be made: not root, no loop devices)."""

    def __init__(self, tmp: str, size: int, inodes: int) -> None:
        self.image = os.path.join(tmp, "targets.img")
        self.mount = os.path.join(tmp, "targets")
        os.makedirs(self.mount)
        with open(self.image, "wb") as fh:
            fh.truncate(size)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-N", str(inodes), self.image], check=True)
        subprocess.run(["mount", "-o", "loop", self.image, self.mount], check=True)

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
        targets = [SmsTarget(ck, os.path.join(out, f"sms{run}"), os.path.join(tmp, f"st{run}"),
                             args.receivers == "once") for run in range(args.runs)]
        try:
            for run in range(args.runs):
                subprocess.run(["sync"], check=True)
                res["smsrepl copy"].append(targets[run].round(src))
                subprocess.run(["sync"], check=True)
                res["rsync copy"].append(rsync(src, daemon.port, f"r{run}"))
            changed = change(src, 0.01)
            for run in range(args.runs):
                subprocess.run(["sync"], check=True)
                res["smsrepl sync"].append(targets[run].round(src))
                subprocess.run(["sync"], check=True)
                res["rsync sync"].append(rsync(src, daemon.port, f"r{run}", "--delete"))
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
        print(f"targets on {'a fresh ext4 (loop)' if fs else out}; smsrepl receivers: {args.receivers}")
        print(f"\ntree: {args.files} files of 1-16 KiB ({total / 1e6:.0f} MB) in {args.dirs} directories; "
              f"sync change: {changed} files rewritten in place; medians of {args.runs}\n")
        print("| case | wall s | files/s | wire MB |\n|---|---:|---:|---:|")
        med = {}
        for k, rows in res.items():
            wall = statistics.median(r["wall"] for r in rows)
            wire = statistics.median(r["wire"] for r in rows)
            med[k] = wall
            print(f"| {k} | {wall:.2f} | {args.files / wall:.0f} | {wire / 1e6:.2f} |")
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
