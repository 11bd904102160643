"""Manifest figures for the foundation issue, through the real code paths.

    python benchmarks/manifest_table.py [--size-gib 2] [--runs 3] [--tmp DIR] [--skip-tib]

1. fine manifest build (smsrepl.blocks.sourcescan.build: SEEK_DATA/SEEK_HOLE, preadv,
   native 4 KiB XXH3 + zero detection) of a disk-like image in the page cache,
   against `xxhsum -H3 FILE` on the same file, interleaved, medians.
2. bytes read building the manifest of a half-hole image (only the data half may be read).
3. diff of two synthetic 1 TiB manifests, in a child process: wall time and peak RSS.
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

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

import smsrepl  # noqa: E402
from smsrepl.blocks.source import BlockSource  # noqa: E402
from smsrepl.blocks.manifest import ManifestFile
from smsrepl.blocks.sourcescan import build
from smsrepl.kernels import FINE_BLOCK  # noqa: E402
from smsrepl.lab.testdata import write_image  # noqa: E402


class Counting(BlockSource):
    read = 0

    def readinto(self, buf, offset):
        n = super().readinto(buf, offset)
        self.read += n
        return n


DIFF_CHILD = r"""
import resource, sys, time
from smsrepl.blocks.manifest import ManifestFile, diff_runs
a = ManifestFile.open(sys.argv[1]); b = ManifestFile.open(sys.argv[2])
t = time.perf_counter()
runs = blocks = 0
for starts, counts in diff_runs(a, b):
    runs += len(starts); blocks += int(counts.sum())
wall = time.perf_counter() - t
print(wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, runs, blocks)
"""


def make_tib_pair(tmp: str, size: int, changed_fraction: float, group_fraction: float | None) -> tuple[str, str]:
    rng = np.random.default_rng(5)
    a = ManifestFile.create(f"{tmp}/a.man", size)
    b = ManifestFile.create(f"{tmp}/b.man", size)
    step = 1 << 24  # 16 Mi digests = 128 MiB per write
    for first in range(0, a.nblocks, step):
        n = min(step, a.nblocks - first)
        fa = rng.integers(1, 2**63, n, dtype=np.uint64)
        a.write_fine(first, fa)
        fb = fa.copy()
        if group_fraction is None:
            idx = rng.choice(n, int(n * changed_fraction), replace=False)
        else:
            groups = rng.choice(n // 256, max(1, int(n // 256 * group_fraction)), replace=False)
            idx = groups * 256 + rng.integers(0, 256, len(groups))
        fb[idx] ^= 0x5A
        b.write_fine(first, fb)
    a.commit()
    b.commit()
    a.close()
    b.close()
    return f"{tmp}/a.man", f"{tmp}/b.man"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--skip-tib", action="store_true")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="smsrepl-man-", dir=args.tmp)
    size = int(args.size_gib * (1 << 30))
    print(f"backend: {smsrepl.backend}")
    try:
        img = f"{tmp}/disk.img"
        write_image(img, size, seed=3)
        subprocess.run(["cat", img], stdout=subprocess.DEVNULL, check=True)
        ours, ref = [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            with BlockSource(img) as src:
                build(src, f"{tmp}/m").close()
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            subprocess.run(["xxhsum", "-H3", img], stdout=subprocess.DEVNULL, check=True)
            ref.append(time.perf_counter() - t)
        mo, mr = statistics.median(ours), statistics.median(ref)
        print("\n| case | median s | GB/s of image | ratio |\n|---|---:|---:|---:|")
        print(f"| manifest build (4 KiB XXH3 + zero map) | {mo:.3f} | {size / mo / 1e9:.2f} | {mr / mo:.2f}x of xxhsum |")
        print(f"| xxhsum -H3 | {mr:.3f} | {size / mr / 1e9:.2f} | 1.00 |")

        half = f"{tmp}/half.img"
        with open(half, "wb") as fh:
            fh.truncate(size)
            chunk = np.random.default_rng(1).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
            for off in range(0, size, 8 << 20):
                fh.seek(off)
                fh.write(chunk)
        with Counting(half) as src:
            build(src, f"{tmp}/mh").close()
        print(f"\nhalf-hole image of {size >> 20} MiB: manifest build read {src.read >> 20} MiB "
              f"(data half: {size >> 21} MiB)")
        os.unlink(half)
        os.unlink(img)

        if not args.skip_tib:
            tib = 1 << 40
            for label, frac, gfrac in (("1% random 4 KiB blocks differ (every group differs)", 0.01, None),
                                       ("0.1% of 1 MiB groups differ", None, 0.001)):
                t = time.perf_counter()
                pa, pb = make_tib_pair(tmp, tib, frac, gfrac)
                made = time.perf_counter() - t
                out = subprocess.run([sys.executable, "-c", DIFF_CHILD, pa, pb], capture_output=True, text=True, check=True)
                wall, rss, runs, blocks = out.stdout.split()
                print(f"\n1 TiB manifests ({label}; built in {made:.0f} s): diff {float(wall):.2f} s, "
                      f"peak RSS {int(rss) / 1024:.0f} MiB, {runs} runs, {blocks} blocks")
                os.unlink(pa)
                os.unlink(pb)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
