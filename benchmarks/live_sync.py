"""A SYNC round of a continuous sync against rsync on the same change.

    python benchmarks/live_sync.py [--size-gib 1] [--runs 5] [--fraction 0.01] [--tracking kernel|scan] [--tmp DIR]

Needs root and tracefs. A loop device over a disk-like image (testdata.write_image)
is replicated by ``send block --continuous --tracking kernel`` (or ``scan``: each round
reads the whole device and sends the blocks whose digests changed) to a receiver on
loopback; rsync's target is a copy of the image. Each run, another process
rewrites ``fraction`` of the device's 4 KiB blocks (distinct, random) with
O_DIRECT through the loop device, no library call; then, in alternating order:

* smsrepl: SIGUSR1 to the sender, timed until its round's summary line (the
  receiver has made the round durable by then);
* rsync: ``rsync --inplace --no-whole-file --ignore-times -B 4096 --stats`` of the
  image to its copy (local, both ends in the page cache; --ignore-times: a disk has
  no mtime to skip it by, and the loop device's writes may leave the image's mtime
  in the same second), then ``sync`` of the copy.

Reports medians: seconds, bytes on the wire against the changed bytes, and the
ratio rsync / smsrepl. Ends by comparing both targets with the source (read with
O_DIRECT for the device).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from smsrepl.lab.certs import make_bundle, write_certkey  # noqa: E402
from smsrepl.lab.testdata import write_image  # noqa: E402

CLI = [sys.executable, "-m", "smsrepl"]
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

REWRITE = r"""
import mmap, os, random, sys
dev, fraction, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
n = os.lseek(fd, 0, os.SEEK_END) // 4096
rnd = random.Random(seed)
buf = mmap.mmap(-1, 4096)
picked = rnd.sample(range(n), int(n * fraction))
for b in picked:
    buf[:] = rnd.randbytes(4096)
    os.pwrite(fd, buf, b * 4096)
print(len(picked))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--tracking", choices=("kernel", "scan"), default="kernel",
                    help="how the sender finds changed blocks: the kernel's write events, or a digest scan")
    ap.add_argument("--tmp", default=None)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="smsrepl-livesync-", dir=args.tmp)
    size = int(args.size_gib * (1 << 30))
    procs, loop = [], None
    try:
        certkey = str(write_certkey(os.path.join(tmp, "certs"), make_bundle()))
        img = os.path.join(tmp, "source.img")
        write_image(img, size, seed=3)
        loop = subprocess.run(["losetup", "-f", "--show", img], capture_output=True, text=True,
                              check=True).stdout.strip()
        target = os.path.join(tmp, "target.img")
        rx = subprocess.Popen(CLI + ["receive", "--listen", "127.0.0.1:0", "--certkey", certkey, "--state-dir",
                                     os.path.join(tmp, "rx"), "--create", "--target", f"disk0={target}"],
                              stderr=subprocess.PIPE, text=True)
        procs.append(rx)
        port = int(re.search(r":(\d+)", rx.stderr.readline()).group(1))
        rx_log: list[str] = []
        threading.Thread(target=lambda: rx_log.extend(rx.stderr), daemon=True).start()
        tx = subprocess.Popen(CLI + ["send", "block", "--json", loop, "--to", f"127.0.0.1:{port}", "--target", "disk0",
                                     "--certkey", certkey, "--state-dir", os.path.join(tmp, "tx"), "--continuous",
                                     "--interval", "86400", "--tracking", args.tracking],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(tx)
        threading.Thread(target=tx.stderr.read, daemon=True).start()
        first = json.loads(tx.stdout.readline())
        print(f"full copy: {first['seconds']} s", flush=True)
        copy = os.path.join(tmp, "rsync-target.img")
        shutil.copyfile(img, copy)
        subprocess.run(["sync"], check=True)
        rows = []
        for i in range(args.runs):
            changed = int(subprocess.run([sys.executable, "-c", REWRITE, loop, str(args.fraction), str(100 + i)],
                                         capture_output=True, text=True, check=True).stdout) * 4096
            got = {}
            for tool in (("smsrepl", "rsync") if i % 2 == 0 else ("rsync", "smsrepl")):
                t0 = time.perf_counter()
                if tool == "smsrepl":
                    tx.send_signal(signal.SIGUSR1)
                    summary = json.loads(tx.stdout.readline())
                    got["smsrepl"] = {"seconds": time.perf_counter() - t0, "wire": summary["wire_bytes"],
                                      "data": summary["data_bytes"], "dirty_blocks": summary["dirty_blocks"],
                                      "round_seconds": summary["seconds"], "stages": summary["stages"]}
                else:
                    out = subprocess.run(["rsync", "--inplace", "--no-whole-file", "--ignore-times", "-B", "4096", "--stats", img, copy],
                                         capture_output=True, text=True, check=True).stdout
                    t1 = time.perf_counter()
                    subprocess.run(["sync", copy], check=True)
                    sent = int(re.search(r"Total bytes sent: ([\d,]+)", out).group(1).replace(",", ""))
                    got["rsync"] = {"seconds": time.perf_counter() - t0, "seconds_no_sync": t1 - t0, "wire": sent}
            got["changed"] = changed
            got["receiver"] = rx_log[-1].strip() if rx_log else ""
            got["ratio"] = got["rsync"]["seconds"] / got["smsrepl"]["seconds"]
            rows.append(got)
            print(f"run {i + 1}: changed {changed} B; smsrepl {got['smsrepl']['seconds']:.3f} s, wire "
                  f"{got['smsrepl']['wire'] / changed:.3f}x (round {got['smsrepl']['round_seconds']} s, stages "
                  f"{got['smsrepl']['stages']}); rsync {got['rsync']['seconds']:.3f} s "
                  f"({got['rsync']['seconds_no_sync']:.3f} s before sync); ratio {got['ratio']:.1f}x\n  {got['receiver']}", flush=True)
        tx.send_signal(signal.SIGTERM)
        tx.wait(300)
        rx.terminate()
        rx.wait(30)
        snap = os.path.join(tmp, "direct.img")
        subprocess.run(["dd", f"if={loop}", f"of={snap}", "iflag=direct", "bs=4M", "status=none"], check=True)
        same = subprocess.run(["cmp", "-s", snap, target]).returncode == 0
        rsync_same = subprocess.run(["cmp", "-s", img, copy]).returncode == 0
        med = statistics.median
        print(json.dumps({
            "size_bytes": size, "fraction": args.fraction, "runs": args.runs, "tracking": args.tracking,
            "smsrepl_seconds_median": round(med(r["smsrepl"]["seconds"] for r in rows), 4),
            "rsync_seconds_median": round(med(r["rsync"]["seconds"] for r in rows), 4),
            "ratio_median": round(med(r["ratio"] for r in rows), 2),
            "ratio_min": round(min(r["ratio"] for r in rows), 2),
            "smsrepl_wire_over_changed_median": round(med(r["smsrepl"]["wire"] / r["changed"] for r in rows), 4),
            "smsrepl_wire_over_changed_max": round(max(r["smsrepl"]["wire"] / r["changed"] for r in rows), 4),
            "rsync_wire_over_changed_median": round(med(r["rsync"]["wire"] / r["changed"] for r in rows), 4),
            "target_identical": same, "rsync_target_identical": rsync_same,
        }, indent=1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if loop:
            subprocess.run(["losetup", "-d", loop])
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
