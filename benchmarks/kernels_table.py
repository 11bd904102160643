#!/usr/bin/env python3
"""Kernel benchmark table (Markdown): medians of 3 interleaved runs, same process.

1. Manifest hashing: `xxhsum -H3 IMAGE` vs readinto(8 MiB) + block_digests(4096)
   over a disk-like image (zero regions, text, random data, holes), page-cached.
2. zero_map (native) vs the best of several numpy expressions, 256 MiB mixed buffer.
3. delta_search: native on a 256 MiB random file with 100 random inserts/deletes
   (1 B .. 4 KiB); native and pure on a 16 MiB sample with the same edit density;
   literal totals vs `rsync --no-whole-file --stats` ("Literal data").

Usage: PYTHONPATH=src python benchmarks/kernels_table.py [--size-gib 2] [--tmp /tmp]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time

import numpy as np

from smsrepl import _pure, kernels

MiB = 1 << 20
CHUNK = 8 * MiB


def timed(fn):
    t = time.perf_counter()
    r = fn()
    return time.perf_counter() - t, r


def make_image(path: str, size: int, rng: np.random.Generator) -> dict:
    """Disk-like image built of 1 MiB regions: holes, written zeros, text, random."""
    pool_rand = rng.integers(0, 256, 32 * MiB, dtype=np.uint8).tobytes()
    letters = np.frombuffer(b"etaoin shrdlu\ncmfwyp,.ETAOIN=:/0123456789", dtype=np.uint8)
    pool_text = letters[rng.integers(0, len(letters), 32 * MiB)].tobytes()
    kinds = rng.choice(4, size // MiB, p=[0.30, 0.15, 0.25, 0.30])
    zero = bytes(MiB)
    with open(path, "wb") as f:
        for k in kinds.tolist():
            off = int(rng.integers(0, 31 * MiB))
            if k == 0:
                f.seek(MiB, os.SEEK_CUR)
            elif k == 1:
                f.write(zero)
            elif k == 2:
                f.write(pool_text[off : off + MiB])
            else:
                f.write(pool_rand[off : off + MiB])
        f.truncate(size)
    return {n: int((kinds == i).sum()) for i, n in enumerate(["hole", "zero", "text", "random"])}


def warm(path: str) -> None:
    buf = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def manifest_pass(path: str) -> int:
    buf = bytearray(CHUNK)
    out = np.empty(CHUNK // 4096, dtype=np.uint64)
    mv = memoryview(buf)
    nonzero = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            nonzero += kernels.block_digests(mv[:n], 4096, out)
    return nonzero


def mixed_buffer(size: int, rng: np.random.Generator) -> np.ndarray:
    """Runs of 1..64 4-KiB blocks: zero, random or text-like, a third each."""
    a = np.zeros(size, dtype=np.uint8)
    bs = 4096
    i, nb = 0, size // bs
    while i < nb:
        run = int(rng.integers(1, 65))
        kind = int(rng.integers(0, 3))
        j = min(nb, i + run)
        if kind == 1:
            a[i * bs : j * bs] = rng.integers(0, 256, (j - i) * bs, dtype=np.uint8)
        elif kind == 2:
            a[i * bs : j * bs] = rng.integers(32, 127, (j - i) * bs, dtype=np.uint8)
        i = j
    return a


NUMPY_ZERO_MAPS = {
    "~any(axis=1)": lambda v: ~v.any(axis=1),
    "max(axis=1)==0": lambda v: v.max(axis=1) == 0,
    "count_nonzero(axis=1)==0": lambda v: np.count_nonzero(v, axis=1) == 0,
    "bitwise_or.reduce(axis=1)==0": lambda v: np.bitwise_or.reduce(v, axis=1) == 0,
}


def edit(old: bytes, rng: np.random.Generator, nedits: int) -> bytes:
    offs = np.sort(rng.integers(0, len(old), nedits)).tolist()
    parts, last = [], 0
    for o in offs:
        if o < last:
            continue
        parts.append(old[last:o])
        n = int(rng.integers(1, 4097))
        if rng.random() < 0.5:
            parts.append(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            last = o
        else:
            last = min(len(old), o + n)
    parts.append(old[last:])
    return b"".join(parts)


def signature(impl, old: bytes, bs: int):
    nb = -(-len(old) // bs)
    w, s = np.zeros(nb, np.uint32), np.zeros(nb, np.uint64)
    impl.file_signature(old, bs, w, s)
    return w, s


def rsync_literal(tmp: str, old_path: str, new_path: str) -> tuple[int, float]:
    dst = os.path.join(tmp, "rsync-dst")
    shutil.copyfile(old_path, dst)
    dt, p = timed(lambda: subprocess.run(
        ["rsync", "--no-whole-file", "--stats", new_path, dst],
        check=True, capture_output=True, text=True))
    m = re.search(r"Literal data: ([\d,.]+)", p.stdout)
    os.unlink(dst)
    return int(re.sub(r"[,.]", "", m.group(1))), dt


def med(xs):
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=2.0, help="disk image size (default 2)")
    ap.add_argument("--tmp", default="/tmp", help="scratch directory (default /tmp)")
    ap.add_argument("--delta-mib", type=int, default=256, help="delta file size (default 256)")
    ap.add_argument("--pure-mib", type=int, default=16, help="pure delta sample (default 16)")
    args = ap.parse_args()
    rng = np.random.default_rng(2024)
    t_start = time.perf_counter()
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="smsrepl-bench-") as tmp:
        # --- 1. manifest hashing vs xxhsum ----------------------------------------
        size = int(args.size_gib * (1 << 30)) // MiB * MiB
        img = os.path.join(tmp, "disk.img")
        mix = make_image(img, size, rng)
        warm(img)
        t_x, t_k = [], []
        for _ in range(3):
            t_x.append(timed(lambda: subprocess.run(
                ["xxhsum", "-H3", img], check=True, capture_output=True))[0])
            t_k.append(timed(lambda: manifest_pass(img))[0])
        gbs = lambda t: size / t / 1e9  # noqa: E731
        rows += [
            ("`xxhsum -H3` image (GB/s)", f"{gbs(med(t_x)):.2f}", f"{med(t_x):.3f} s"),
            ("readinto 8 MiB + block_digests(4096) (GB/s)", f"{gbs(med(t_k)):.2f}",
             f"{med(t_k):.3f} s; **{med(t_x) / med(t_k):.2f}x xxhsum** (target >= 0.7x)"),
        ]
        os.unlink(img)

        # --- 2. zero_map vs numpy ----------------------------------------------
        zsize = 256 * MiB
        a = mixed_buffer(zsize, rng)
        v = a.view(np.uint64).reshape(-1, 4096 // 8)
        out = np.empty(zsize // 4096, dtype=np.uint8)
        ref = kernels.zero_map(a, 4096, out)
        times = {name: [] for name in NUMPY_ZERO_MAPS}
        t_z = []
        for _ in range(3):
            t_z.append(timed(lambda: kernels.zero_map(a, 4096, out))[0])
            for name, fn in NUMPY_ZERO_MAPS.items():
                dt, r = timed(lambda: fn(v))
                assert int(r.sum()) == ref, name
                times[name].append(dt)
        best = min(times, key=lambda k: med(times[k]))
        for name in NUMPY_ZERO_MAPS:
            rows.append((f"numpy zero map `{name}` (GB/s)", f"{zsize / med(times[name]) / 1e9:.2f}",
                         f"{med(times[name]) * 1e3:.1f} ms" + (" (best numpy)" if name == best else "")))
        rows.append((f"zero_map native, 256 MiB mixed ({ref} zero of {zsize // 4096}) (GB/s)",
                     f"{zsize / med(t_z) / 1e9:.2f}",
                     f"{med(t_z) * 1e3:.1f} ms; **{med(times[best]) / med(t_z):.1f}x best numpy** (target >= 3x)"))
        del a, v

        # --- 3. delta search ---------------------------------------------------
        dsize = args.delta_mib * MiB
        old = rng.integers(0, 256, dsize, dtype=np.uint8).tobytes()
        new = edit(old, rng, 100)
        old_p, new_p = os.path.join(tmp, "old.bin"), os.path.join(tmp, "new.bin")
        for p, d in ((old_p, old), (new_p, new)):
            with open(p, "wb") as f:
                f.write(d)
        bs = kernels.delta_block_size(dsize)
        psize = args.pure_mib * MiB
        p_old = old[:psize]
        # the "100 random inserts and deletes", compared on a 16 MiB sample;
        # a density-scaled sample (6 edits) is reported too: pure Python is fast on
        # long matching stretches, so the ratio depends on the edit count
        p_new = edit(p_old, rng, 100)
        s_new = edit(p_old, rng, max(1, round(100 * psize / dsize)))
        p_bs = kernels.delta_block_size(psize)
        t_sig, t_d, t_dn16, t_p, t_sn, t_sp = [], [], [], [], [], []
        for _ in range(3):
            dt, (w, s) = timed(lambda: signature(kernels, old, bs))
            t_sig.append(dt)
            dt, r = timed(lambda: kernels.delta_search(w, s, bs, dsize, new))
            t_d.append(dt)
            pw, ps = signature(_pure, p_old, p_bs)
            dt, rn16 = timed(lambda: kernels.delta_search(pw, ps, p_bs, psize, p_new))
            t_dn16.append(dt)
            dt, rp = timed(lambda: _pure.delta_search(pw, ps, p_bs, psize, p_new))
            t_p.append(dt)
            t_sn.append(timed(lambda: kernels.delta_search(pw, ps, p_bs, psize, s_new))[0])
            t_sp.append(timed(lambda: _pure.delta_search(pw, ps, p_bs, psize, s_new))[0])
        assert kernels.apply_delta(old, r, bs, new) == new
        assert rp.tolist() == rn16.tolist()
        lit = int(r[r[:, 0] == 0, 2].sum())
        r_lit, r_t = rsync_literal(tmp, old_p, new_p)
        mbs = lambda n, t: n / t / 1e6  # noqa: E731
        d_mbs, n16, p16 = mbs(len(new), med(t_d)), mbs(len(p_new), med(t_dn16)), mbs(len(p_new), med(t_p))
        rows += [
            (f"file_signature native, {args.delta_mib} MiB, bs {bs} (MB/s)",
             f"{mbs(dsize, med(t_sig)):.0f}", f"{med(t_sig):.3f} s"),
            (f"delta_search native, {args.delta_mib} MiB, 100 edits (MB/s of new data)",
             f"{d_mbs:.0f}", f"{med(t_d):.3f} s (target >= 300 MB/s)"),
            (f"delta_search native, {args.pure_mib} MiB sample, 100 edits (MB/s)", f"{n16:.0f}",
             f"{med(t_dn16) * 1e3:.1f} ms"),
            (f"delta_search pure, same {args.pure_mib} MiB sample, 100 edits (MB/s)", f"{p16:.1f}",
             f"{med(t_p):.3f} s; native/pure **{n16 / p16:.0f}x** (target >= 50x)"),
            (f"delta_search native / pure, {args.pure_mib} MiB, density-scaled "
             f"{max(1, round(100 * psize / dsize))} edits", f"{med(t_sp) / med(t_sn):.0f}x",
             f"native {mbs(len(s_new), med(t_sn)):.0f} MB/s, pure {mbs(len(s_new), med(t_sp)):.0f} MB/s"),
            ("literal data: smsrepl delta_search (bytes)", f"{lit}",
             f"{len(r)} rows; **{lit / max(1, r_lit):.2f}x rsync** (target <= 2x)"),
            ("literal data: `rsync --no-whole-file --stats` (bytes)", f"{r_lit}",
             f"rsync wall {r_t:.2f} s incl. checksum pass"),
        ]
    print(f"\nImage {size / (1 << 30):.2f} GiB, 1 MiB regions: {mix}; host: {os.cpu_count()} CPUs; "
          f"backend {kernels.BACKEND}; medians of 3 interleaved runs; "
          f"total {time.perf_counter() - t_start:.0f} s\n")
    print("| measurement | value | notes |")
    print("| --- | ---: | --- |")
    for name, val, note in rows:
        print(f"| {name} | {val} | {note} |")


if __name__ == "__main__":
    main()
