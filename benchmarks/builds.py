"""Two builds of smsrepl on the same work, interleaved: did a change move the figures?

    python benchmarks/builds.py --old /path/old/.venv/bin/smsrepl --new .venv/bin/smsrepl --runs 5

Each run of each build, on loopback with a fresh receiver: a block full copy of a 1 GiB
disk-like image (smsrepl.lab.testdata) and a sync round of it, a file full copy of a tree of
20,000 files (0-8 KB, 200 directories) and a sync round of it, then `verify files` of the copy.
After one uncounted run, runs alternate old, new, old, new... so the machine's load falls on both alike; the table gives
each case's median, range and new/old. A block copy that differs from its source fails the run.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

CASES = ("block_full", "block_sync", "files_full", "files_sync", "verify_files")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _make_inputs(work: str) -> None:
    from smsrepl.lab.testdata import write_image

    write_image(os.path.join(work, "img"), 1 << 30, seed=7)
    rng = random.Random(5)
    for d in range(200):
        os.makedirs(os.path.join(work, "tree", f"d{d}"))
        for f in range(100):
            with open(os.path.join(work, "tree", f"d{d}", f"f{f}"), "wb") as fh:
                fh.write(rng.randbytes(rng.randint(0, 8000)))


def one_run(cli: str, work: str) -> dict[str, float]:
    rx, st = os.path.join(work, "rx"), os.path.join(work, "st")
    shutil.rmtree(rx, ignore_errors=True)
    shutil.rmtree(st, ignore_errors=True)
    os.makedirs(rx)
    os.sync()  # the last run's writeback must not fall on this one
    port = _free_port()
    key = os.path.join(work, "lab", "certkey.json")
    log = os.path.join(work, "receiver.log")
    with open(log, "w") as fh:
        receiver = subprocess.Popen([cli, "receive", "--listen", f"127.0.0.1:{port}", "--certkey", key,
                                     "--state-dir", os.path.join(st, "rx"), "--root", rx, "--create"],
                                    stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "listening" not in open(log).read():
            if receiver.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{cli}: the receiver did not start: {open(log).read()[-500:]}")
            time.sleep(0.05)
        to = ["--to", f"127.0.0.1:{port}", "--certkey", key]
        block = [cli, "send", "block", os.path.join(work, "img"), "--target", "disk", *to,
                 "--state-dir", os.path.join(st, "tx")]
        files = [cli, "send", "files", os.path.join(work, "tree"), "--target", "home", *to]
        out = {"block_full": _timed(block), "block_sync": _timed(block),
               "files_full": _timed(files), "files_sync": _timed(files)}
    finally:
        receiver.terminate()
        receiver.wait(30)
    out["verify_files"] = _timed([cli, "verify", "files", os.path.join(work, "tree"), os.path.join(rx, "home")])
    if not filecmp.cmp(os.path.join(work, "img"), os.path.join(rx, "disk"), shallow=False):
        raise SystemExit(f"{cli}: the block copy differs from its source")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="the old build's smsrepl executable")
    ap.add_argument("--new", required=True, help="the new build's smsrepl executable")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tmp", default=None, help="where the inputs go (about 1.2 GiB)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="smsrepl-builds-", dir=args.tmp)
    try:
        _make_inputs(work)
        subprocess.run([args.new, "certs", "init", os.path.join(work, "lab")], check=True, stdout=subprocess.DEVNULL)
        one_run(args.new, work)  # not counted: the first run after making the inputs is an outlier
        results: dict[str, dict[str, list[float]]] = {"old": {c: [] for c in CASES}, "new": {c: [] for c in CASES}}
        for i in range(args.runs):
            for name in ("old", "new"):
                for case, secs in one_run(getattr(args, name), work).items():
                    results[name][case].append(secs)
            print(f"run {i + 1}/{args.runs} done", file=sys.stderr)
        print(f"{'case':14s} {'old':>9s} {'new':>9s} {'new/old':>8s}   old range      new range")
        for case in CASES:
            o, n = results["old"][case], results["new"][case]
            mo, mn = statistics.median(o), statistics.median(n)
            print(f"{case:14s} {mo:8.3f}s {mn:8.3f}s {mn / mo:8.3f}   {min(o):.3f}-{max(o):.3f}  {min(n):.3f}-{max(n):.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
