"""`smsrepl verify block SRC TGT` against `xxhsum -H3 SRC TGT` on the same image pair.

    python benchmarks/verify_block.py [--size 2G] [--runs 3] [--kind random|disk] [--tmp DIR] [--keep]

Writes SRC (``random``: incompressible data, every block read; ``disk``: the disk-like image of
smsrepl.lab.testdata, with holes) and TGT, a byte-for-byte copy, into a fresh directory under
--tmp; reads both once so the page cache is warm; then runs the two commands interleaved
(the order alternating), --runs times each, whole processes (interpreter start included).
Prints each run's seconds, the medians, the throughput over both files (MB/s) and the ratio
smsrepl/xxhsum of the throughputs (1.0 = as fast as xxhsum). The directory is deleted
afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

CHUNK = 64 << 20


def size_arg(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        n = int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (bytes, or with K, M, G)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return n


def write_random(path: str, size: int) -> None:
    import numpy as np

    rng = np.random.default_rng(7)
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(CHUNK, left)
            fh.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n


def warm(*paths: str) -> None:
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            buf = bytearray(CHUNK)
            while fh.readinto(buf):
                pass


def timed(cmd: list[str], ok: tuple[int, ...] = (0,)) -> float:
    t0 = time.perf_counter()
    cp = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if cp.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd)}: exit {cp.returncode}: {cp.stderr.strip()}")
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=size_arg, default=2 << 30, help="image size (bytes, or 512M, 2G; default 2G)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each command (default 3)")
    ap.add_argument("--kind", choices=["random", "disk"], default="random",
                    help="random: every block data (default); disk: smsrepl.lab.testdata's disk-like image")
    ap.add_argument("--tmp", default=None, help="directory the images are written under (a fresh one inside it)")
    ap.add_argument("--keep", action="store_true", help="keep the images")
    ap.add_argument("--smsrepl-args", default="", help="extra arguments for verify block (e.g. '--progress json')")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if not shutil.which("xxhsum"):
        raise SystemExit("xxhsum not found (apt-get install xxhash)")

    work = tempfile.mkdtemp(prefix="verify-block-", dir=args.tmp)
    try:
        src, tgt = os.path.join(work, "src.img"), os.path.join(work, "tgt.img")
        if args.kind == "random":
            write_random(src, args.size)
        else:
            from smsrepl.lab.testdata import write_image

            write_image(src, args.size)
        shutil.copyfile(src, tgt)
        warm(src, tgt)
        both = 2 * args.size
        cmds = {
            "xxhsum": ["xxhsum", "-H3", src, tgt],
            "smsrepl": [sys.executable, "-m", "smsrepl", "verify", "block", src, tgt, *args.smsrepl_args.split()],
        }
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for i in range(args.runs):
            order = list(cmds) if i % 2 == 0 else list(reversed(cmds))
            for name in order:
                times[name].append(timed(cmds[name]))
            print(f"run {i + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in cmds), flush=True)
        med = {n: statistics.median(t) for n, t in times.items()}
        print(f"\n{args.size / (1 << 30):.2f} GiB pair ({args.kind}), medians of {args.runs} interleaved runs:")
        for n in cmds:
            print(f"  {n:8s} {med[n]:.3f} s  {both / med[n] / 1e6:7.0f} MB/s over both files  "
                  f"(runs: {', '.join(f'{t:.3f}' for t in times[n])})")
        print(f"ratio smsrepl/xxhsum (throughput): {med['xxhsum'] / med['smsrepl']:.2f}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
