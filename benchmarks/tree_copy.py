"""A tree's full copy to a durable target: smsrepl against rsync -aH + sync, wall and CPU seconds.

    python benchmarks/tree_copy.py [--files 50000] [--dirs 500] [--runs 5] [--tmp DIR]
                                   [--target-fs auto|ext4|tmp] [--profile DIR] [--only smsrepl|rsync]
                                   [--build NAME=PYTHON ...]

The tree: --files files of 1-16 KiB (seeded sizes and text-like contents, files.make_tree) in
--dirs directories, read once before the runs (warm in the page cache). Each run copies it to an
empty target on the same file system (a fresh loop-mounted ext4 where this runs as root, as
files.py), both tools in the same run, which goes first alternating from run to run:

  smsrepl  `smsrepl send files` to a `receive --once` on loopback: the receiver makes the round
           durable (syncfs) before its ROUND_DONE, so the copy is durable when the sender exits.
  rsync    `rsync -aH` to a loopback rsync daemon (uid = root, gid = root), then `sync`: rsync
           makes nothing durable by itself.

Wall seconds: from the sender's start to its exit (smsrepl), to the end of `sync` (rsync); the
receiver and the daemon are started before (untimed), one of each per run. CPU seconds: user +
system of every process of both ends (the senders, the receiver, the daemon and the processes it
forks, sync), from this process's children's rusage after each run's processes exited. Between
runs the targets are removed and the file system synced (untimed).

Writes a markdown table to stdout and, with --out (default benchmarks/results/tree-copy.{md,json}),
both files. --profile DIR runs each smsrepl process of the first run under cProfile (DIR/send.prof,
DIR/receive.prof); its figures then include the profiler's cost. --build NAME=PYTHON (repeated) runs
the smsrepl of each of those interpreters (their venvs: a build before a change and one after) in
every run, interleaved with the others and rsync; the ratios are the last build's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from files import TargetFS, make_tree  # noqa: E402
from replication import RsyncDaemon, free_port  # noqa: E402
from smsrepl.lab.certs import make_bundle, write_certkey  # noqa: E402


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def warm(root: str) -> int:
    """Read every file once: the tree is in the page cache for every run."""
    n = 0
    for dp, _, fs in os.walk(root):
        for f in fs:
            with open(os.path.join(dp, f), "rb") as fh:
                n += len(fh.read())
    return n


def py(python: str, prof: str | None, name: str) -> list[str]:
    if prof is None:
        return [python, "-m", "smsrepl"]
    return [python, "-m", "cProfile", "-o", os.path.join(prof, f"{name}.prof"), "-m", "smsrepl"]


def sms_run(python: str, ck: str, src: str, dst: str, state: str, prof: str | None = None) -> dict:
    port = free_port()
    c0 = children_cpu()
    rx = subprocess.Popen(py(python, prof, "receive") + ["receive", "--listen", f"127.0.0.1:{port}", "--certkey", ck,
                                                 "--create", "--target", f"t={dst}", "--state-dir", state, "--once"],
                          stderr=subprocess.PIPE)
    line = rx.stderr.readline()
    if b"listening" not in line:
        rx.kill()
        rx.wait()
        raise RuntimeError(line)
    t0 = time.perf_counter()
    cp = subprocess.run(py(python, prof, "send") + ["send", "files", "--json", src, "--to", f"127.0.0.1:{port}",
                                            "--target", "t", "--certkey", ck], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rx.stderr.read()
    if rx.wait(60) or cp.returncode:
        raise RuntimeError(f"smsrepl: sender {cp.returncode}, receiver {rx.returncode}: {cp.stderr[-2000:]}")
    out = json.loads(cp.stdout.strip().splitlines()[-1])
    return {"wall": wall, "cpu": children_cpu() - c0, "wire": out["wire_bytes"], "files": out["files_sent"]}


def rsync_run(src: str, root: str, name: str, tmp: str) -> dict:
    c0 = children_cpu()
    daemon = RsyncDaemon(root, tmp)  # one per run: its forked children's CPU is ours once it exits
    try:
        t0 = time.perf_counter()
        cp = subprocess.run(["rsync", "-aH", "--stats", f"{src}/", f"rsync://127.0.0.1:{daemon.port}/bench/{name}/"],
                            capture_output=True, text=True)
        subprocess.run(["sync"], check=True)
        wall = time.perf_counter() - t0
    finally:
        daemon.stop()
    if cp.returncode:
        raise RuntimeError(f"rsync: {cp.returncode}: {cp.stderr[-2000:]}")
    sent = int(next(x for x in cp.stdout.splitlines() if x.startswith("Total bytes sent")).split(":")[1]
               .replace(",", "").split()[0])
    return {"wall": wall, "cpu": children_cpu() - c0, "wire": sent}


def identical(src: str, dst: str) -> int:
    """Lines rsync -aHn --checksum reports between the source and a copy (0: identical)."""
    cp = subprocess.run(["rsync", "-aHn", "--numeric-ids", "--checksum", "-i", f"{src}/", f"{dst}/"],
                        capture_output=True, text=True)
    return len([x for x in cp.stdout.splitlines() if x.strip()])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--dirs", type=int, default=500)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--target-fs", choices=["auto", "ext4", "tmp"], default="auto")
    ap.add_argument("--profile", default=None, help="cProfile the smsrepl processes of the first run into this directory")
    ap.add_argument("--only", choices=["smsrepl", "rsync"], default=None)
    ap.add_argument("--build", action="append", default=[], metavar="NAME=PYTHON",
                    help="an smsrepl build to run (its venv's python); repeat to compare builds")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "tree-copy"),
                    help="write OUT.md and OUT.json ('' for none)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="smsrepl-tree-copy-", dir=args.tmp)
    fs = None
    try:
        ck = str(write_certkey(os.path.join(tmp, "certs"), make_bundle()))
        src = os.path.join(tmp, "src")
        total = make_tree(src, args.files, args.dirs)
        # room for two copies at once, with their inodes; targets are removed after each run
        fs = TargetFS.make(tmp, 3 * (total + args.files * 4096) + (512 << 20), 3 * args.files + 20_000,
                           args.target_fs)
        out = fs.mount if fs else tmp
        rsync_root = os.path.join(out, "rsync-root")
        os.makedirs(rsync_root)
        warm(src)
        builds = dict(b.split("=", 1) for b in args.build) or {"smsrepl": sys.executable}
        tools = [t for t in (*builds, "rsync") if args.only in (None, t) or (args.only == "smsrepl" and t in builds)]
        res: dict[str, list[dict]] = {t: [] for t in tools}
        differing = {}
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
        for run in range(args.runs):
            for tool in (tools if run % 2 == 0 else tools[::-1]):
                dst = os.path.join(out, "sms") if tool in builds else os.path.join(rsync_root, "r")
                subprocess.run(["sync"], check=True)
                if tool in builds:
                    state = os.path.join(tmp, "state")
                    shutil.rmtree(state, ignore_errors=True)
                    r = sms_run(builds[tool], ck, src, dst, state, args.profile if run == 0 else None)
                else:
                    r = rsync_run(src, rsync_root, "r", tmp)
                res[tool].append(r)
                print(f"run {run} {tool}: {r['wall']:.2f} s, CPU {r['cpu']:.2f} s", file=sys.stderr, flush=True)
                if run == 0:
                    differing[tool] = identical(src, dst)
                shutil.rmtree(dst)
        subprocess.run(["sync"], check=True)
        where = fs.describe() if fs else out
    finally:
        if fs is not None:
            fs.close()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {t: {k: statistics.median(r[k] for r in rows) for k in ("wall", "cpu", "wire")} for t, rows in res.items()}
    lines = [f"tree: {args.files} files of 1-16 KiB ({total / 1e6:.0f} MB) in {args.dirs} directories, warm; "
             f"targets on {where}, emptied between runs; medians of {args.runs} interleaved runs\n",
             "| tool | wall s | CPU s (both ends) | files/s | wire MB | each run: wall s / CPU s |",
             "|---|---:|---:|---:|---:|---|"]
    for t, rows in res.items():
        m = med[t]
        each = " ".join(f"{r['wall']:.2f}/{r['cpu']:.2f}" for r in rows)
        lines.append(f"| {t + ' send files' if t in builds else 'rsync -aH + sync'} | {m['wall']:.2f} | "
                     f"{m['cpu']:.2f} | {args.files / m['wall']:.0f} | {m['wire'] / 1e6:.1f} | {each} |")
    ratios = {}
    last = [t for t in res if t != "rsync"][-1:]
    if "rsync" in res and last:
        sms = med[last[0]]
        ratios = {"speed": med["rsync"]["wall"] / sms["wall"], "cpu": sms["cpu"] / med["rsync"]["cpu"]}
        lines.append(f"\n{last[0]} is {ratios['speed']:.2f}x as fast as rsync -aH + sync, with "
                     f"{ratios['cpu']:.2f}x its CPU seconds")
    lines.append(f"rsync -aHn --checksum after the first run's copies, lines (0: identical): {differing}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out + ".md", "w") as fh:
            fh.write(text + "\n")
        with open(args.out + ".json", "w") as fh:
            json.dump({"files": args.files, "dirs": args.dirs, "bytes": total, "runs": args.runs, "targets": where,
                       "median": med, "ratios": ratios, "each": res, "differing": differing}, fh, indent=1)
    return 0 if not any(differing.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
