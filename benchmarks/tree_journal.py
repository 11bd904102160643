"""A sync round of a large tree: the change journal's round against a whole-tree round of
smsrepl and against rsync's round, on the same kind of change, in the same run.

    python benchmarks/tree_journal.py [--files 1000000] [--dirs 10000] [--changed-dirs 100]
                                      [--reps 3] [--tmp DIR] [--keep]

Needs root (loop devices, mounts, fanotify), mkfs.ext4 and rsync. Runs itself in a private
mount namespace. Two loop-mounted ext4 file systems (inline_data: the files' few bytes
live in their inodes, so the run measures what a round does per entry, not data
transfer): the source holds ``--files`` files in ``--dirs`` directories (two levels), the
target gets them by a full round of ``send files``. Then, ``--reps`` times, each on a
fresh change of 0.1% of the files (``--changed-dirs`` directories, the files spread
over them, each appended to):

* journal: ``send files --continuous`` (the fanotify journal; SIGUSR1 asks for a round);
* whole: a one-shot ``send files`` (walks both trees whole);
* rsync: ``rsync -aHAX --delete --numeric-ids SRC/ DST/`` (local, no ssh: rsync at its fastest).

The continuous sender's round after the others is a whole-tree one (the receiver saw
rounds its journal did not follow); it is run, not measured. Reported: each round's
seconds (smsrepl's from its summary, rsync's wall clock), medians, and the ratios
whole/journal and rsync/journal; the run ends with the oracle (rsync -n --checksum).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC_PATH = os.path.join(HERE, "..", "src")
CLI = [sys.executable, "-m", "smsrepl"]
ENV = {**os.environ, "PYTHONPATH": SRC_PATH + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(*cmd, **kw):
    return subprocess.run(list(cmd), check=True, capture_output=True, text=True, **kw)


def make_fs(image: str, mnt: str, inodes: int) -> str:
    with open(image, "wb") as fh:
        fh.truncate(max(2 << 30, inodes * 1024))
    run("mkfs.ext4", "-q", "-F", "-O", "inline_data", "-I", "256", "-N", str(inodes), image)
    dev = run("losetup", "-f", "--show", image).stdout.strip()
    os.makedirs(mnt, exist_ok=True)
    run("mount", dev, mnt)
    return dev


def populate(root: str, files: int, dirs: int) -> list[str]:
    top = max(1, int(dirs ** 0.5))
    per_top = dirs // top
    per_dir = files // dirs
    out = []
    for i in range(top):
        for j in range(per_top):
            d = os.path.join(root, f"d{i:03d}", f"e{j:03d}")
            os.makedirs(d)
            out.append(d)
            for k in range(per_dir):
                fd = os.open(os.path.join(d, f"f{k:04d}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, f"{i} {j} {k}\n".encode())
                os.close(fd)
    return out


def change(dirs: list[str], n_dirs: int, n_files: int, rng: random.Random) -> None:
    per = n_files // n_dirs
    for d in rng.sample(dirs, n_dirs):
        names = sorted(os.listdir(d))
        for name in rng.sample(names, min(per, len(names))):
            with open(os.path.join(d, name), "ab") as fh:
                fh.write(b"+")


class Continuous:
    def __init__(self, src: str, address: str, certkey: str) -> None:
        self.proc = subprocess.Popen(CLI + ["send", "files", "--json", src, "--to", address, "--target", "t", "--certkey", certkey,
                                            "--continuous", "--interval", "86400", "--whole-tree-every", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.q.put(json.loads(line))

    def round(self, timeout: float = 3600) -> tuple[dict, float]:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGUSR1)
        s = self.q.get(timeout=timeout)
        return s, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--dirs", type=int, default=10_000)
    ap.add_argument("--changed-dirs", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tmp", default="/var/tmp")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if os.environ.get("_TREE_JOURNAL_NS") != "1":
        os.execvpe("unshare", ["unshare", "-m", "--propagation", "private", sys.executable, *sys.argv],
                   {**os.environ, "_TREE_JOURNAL_NS": "1"})
    rng = random.Random(a.seed)
    work = tempfile.mkdtemp(prefix="tree-journal-", dir=a.tmp)
    devs, rx, cont = [], None, None
    changed = a.files // 1000 // a.changed_dirs * a.changed_dirs  # the same number in each directory
    try:
        src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
        for name, mnt in (("src", src), ("dst", dst)):
            devs.append(make_fs(os.path.join(work, name + ".img"), mnt, a.files + a.dirs + 100_000))
        t = time.monotonic()
        dirs = populate(src, a.files, a.dirs)
        print(f"populated {a.files} files in {len(dirs)} directories: {time.monotonic() - t:.1f} s", flush=True)
        run(*CLI, "certs", "init", os.path.join(work, "certs"), env=ENV)
        certkey = os.path.join(work, "certs", "certkey.json")
        rx = subprocess.Popen(CLI + ["receive", "--listen", "127.0.0.1:0", "--certkey", certkey, "--state-dir",
                                     os.path.join(work, "rx"), "--target", f"t={dst}"],
                              stderr=subprocess.PIPE, text=True, env=ENV)
        line = rx.stderr.readline()
        address = "127.0.0.1:" + line.rsplit(":", 1)[1].split()[0]
        threading.Thread(target=lambda: [None for _ in rx.stderr], daemon=True).start()
        one_shot = CLI + ["send", "files", "--json", src, "--to", address, "--target", "t", "--certkey", certkey]
        t = time.monotonic()
        full = json.loads(run(*one_shot, env=ENV).stdout.strip().splitlines()[-1])
        print(f"full copy: {full['seconds']} s ({full['files_sent']} files)", flush=True)
        cont = Continuous(src, address, certkey)
        first = cont.q.get(timeout=3600)  # the journal's first round walks the whole tree
        print(f"the journal's first round: {first['scope']} {first['seconds']} s", flush=True)
        rows = []
        for rep in range(a.reps):
            change(dirs, a.changed_dirs, changed, rng)
            j, j_wall = cont.round()
            assert j["scope"] == "journal" and j["files_sent"] == changed, j
            change(dirs, a.changed_dirs, changed, rng)
            t = time.monotonic()
            w = json.loads(run(*one_shot, env=ENV).stdout.strip().splitlines()[-1])
            w_wall = time.monotonic() - t
            assert w["scope"] == "whole" and w["files_sent"] == changed, w
            change(dirs, a.changed_dirs, changed, rng)
            t = time.monotonic()
            run("rsync", "-aHAX", "--delete", "--numeric-ids", f"{src}/", f"{dst}/")
            r_wall = time.monotonic() - t
            back, _ = cont.round()  # whole: the receiver saw rounds the journal did not follow
            assert back["scope"] == "whole", back
            row = {"rep": rep, "journal_s": j["seconds"], "journal_wall_s": round(j_wall, 3), "journal_dirs": j["dirs"],
                   "whole_s": w["seconds"], "whole_wall_s": round(w_wall, 3), "rsync_wall_s": round(r_wall, 3),
                   "whole_over_journal": round(w["seconds"] / j["seconds"], 1),
                   "rsync_over_journal": round(r_wall / j["seconds"], 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        change(dirs, a.changed_dirs, changed, rng)
        last, _ = cont.round()
        oracle = run("rsync", "-aHAXn", "--delete", "--numeric-ids", "--checksum", "-i", f"{src}/", f"{dst}/").stdout
        med = {k: statistics.median(r[k] for r in rows) for k in ("journal_s", "whole_s", "rsync_wall_s")}
        summary = {"files": a.files, "dirs": len(dirs), "changed_files": changed, "changed_dirs": a.changed_dirs,
                   "reps": a.reps, **{f"median_{k}": v for k, v in med.items()},
                   "whole_over_journal": round(med["whole_s"] / med["journal_s"], 1),
                   "rsync_over_journal": round(med["rsync_wall_s"] / med["journal_s"], 1),
                   "last_round_scope": last["scope"], "oracle_lines": len(oracle.splitlines())}
        print(json.dumps(summary), flush=True)
        return 0 if not oracle else 1
    finally:
        if cont is not None:
            cont.proc.kill()
        if rx is not None:
            rx.kill()
        for mnt in ("src", "dst"):
            subprocess.run(["umount", "-l", os.path.join(work, mnt)], capture_output=True)
        for dev in devs:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
