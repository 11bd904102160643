"""A consistency check of a copied tree: ``smsrepl verify files`` (local, and against a receiver)
against ``rsync -an --checksum --delete -i`` on the same pair, in the same run.

    python benchmarks/verify_files.py [--tree python|small] [--files 50000] [--reps 3] [--tmp DIR] [--keep]

``--tree python`` copies ``/usr/lib/python3.11`` (the standard library, about 1,500 entries);
``--tree small`` makes ``--files`` files of 1-16 KiB in ``--files/100`` directories. The copy
is made with ``cp -a``; both trees are read once before measuring (page cache warm). Then
``--reps`` interleaved rounds of: rsync (wall clock of the whole command), ``verify files SRC
DST``, and ``verify files SRC --to`` a receiver on 127.0.0.1 whose target is DST (the
receiver is started once, before the rounds). Every check must report the trees equal.
Printed: each run's seconds, the medians, and rsync's median over each of smsrepl's (above
1 means smsrepl is faster).
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
SRC_PATH = os.path.join(HERE, "..", "src")
CLI = [sys.executable, "-m", "smsrepl"]
ENV = {**os.environ, "PYTHONPATH": SRC_PATH + os.pathsep + os.environ.get("PYTHONPATH", "")}


def make_small_tree(root: str, files: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    dirs = max(1, files // 100)
    for d in range(dirs):
        os.makedirs(os.path.join(root, f"d{d // 50:03d}", f"e{d:05d}"), exist_ok=True)
    for i in range(files):
        d = i % dirs
        with open(os.path.join(root, f"d{d // 50:03d}", f"e{d:05d}", f"f{i:06d}"), "wb") as fh:
            fh.write(rng.randbytes(rng.randint(1024, 16384)))


def warm(root: str) -> None:
    for top, _, names in os.walk(root):
        for n in names:
            p = os.path.join(top, n)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as fh:
                    while fh.read(1 << 20):
                        pass


def timed(cmd: list[str], ok=(0,)) -> tuple[float, str]:
    t = time.perf_counter()
    cp = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    dt = time.perf_counter() - t
    if cp.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd)}: exit {cp.returncode}: {cp.stderr.strip()[-500:]}")
    return dt, cp.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", choices=["python", "small"], default="python")
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="where the trees go (default: a new directory under $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the trees")
    args = ap.parse_args()
    if shutil.which("rsync") is None:
        raise SystemExit("rsync is needed (apt-get install rsync)")
    work = tempfile.mkdtemp(prefix="verify-bench-", dir=args.tmp)
    src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
    rx = None
    try:
        if args.tree == "python":
            subprocess.run(["cp", "-a", "/usr/lib/python3.11", src], check=True)
        else:
            make_small_tree(src, args.files)
        subprocess.run(["cp", "-a", src, dst], check=True)
        warm(src)
        warm(dst)
        certs = os.path.join(work, "certs")
        subprocess.run(CLI + ["certs", "init", certs], check=True, capture_output=True, env=ENV)
        certkey = os.path.join(certs, "certkey.json")
        rx = subprocess.Popen(CLI + ["receive", "--listen", "127.0.0.1:0", "--target", f"tree={dst}", "--certkey",
                                     certkey, "--state-dir", os.path.join(work, "rx-state")],
                              stderr=subprocess.PIPE, text=True, env=ENV)
        line = rx.stderr.readline()
        if "listening on" not in line:
            raise SystemExit(f"receiver did not start: {line}")
        addr = line.split("listening on", 1)[1].strip()
        cmds = {
            "rsync": ["rsync", "-an", "--checksum", "--delete", "-i", src + "/", dst + "/"],
            "verify": CLI + ["verify", "files", src, dst],
            "verify --to": CLI + ["verify", "files", src, "--to", addr, "--target", "tree", "--certkey", certkey],
        }
        times: dict[str, list[float]] = {k: [] for k in cmds}
        for rep in range(args.reps):
            for name, cmd in cmds.items():
                dt, out = timed(cmd)
                if name == "rsync" and out.strip():
                    raise SystemExit(f"rsync finds differences:\n{out[:500]}")
                if name != "rsync" and json.loads(out)["check_result"] != "consistent":
                    raise SystemExit(f"{name} finds differences: {out[:500]}")
                times[name].append(dt)
                print(f"rep {rep + 1} {name:12s} {dt:7.3f} s", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        nfiles = sum(len(f) for _, _, f in os.walk(src))
        print(f"\n{args.tree} tree, {nfiles} files; medians of {args.reps}:")
        for name, m in med.items():
            ratio = med["rsync"] / m
            print(f"  {name:12s} {m:7.3f} s   rsync/this {ratio:5.2f}x")
    finally:
        if rx is not None:
            rx.terminate()
            rx.wait(10)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
