"""What kernel change tracking costs a busy disk: fio 4 KiB random writes with the tracker on and off.

    python benchmarks/tracker_cost.py [--pairs 5] [--seconds 5] [--rate 100000] [--disk loop|zram] [--tmp DIR]

Needs root, tracefs and fio. The disk is a loop device over a file in --tmp
(request-based: block_rq_complete; default /dev/shm: a loop over tmpfs sustains
about 150k writes/s here, one over the ext4 of /work about 45-75k) or a zram
device (bio-based: block_bio_complete; where the kernel has zram). Each pair runs
fio twice, adjacent, the order alternating: once alone, once while a tracker
process (blocks.tracker.TrackedDirtyMap, a boundary every second as continuous
rounds take them) records every write. Reported, medians over the pairs:

* the workload's IOPS with the tracker over without (unthrottled fio: the cost
  the kernel's tracepoints and our readers put on the writer);
* at ``--rate`` IOPS (fio throttled to it): the tracker process's CPU as a
  percentage of one core (utime + stime from /proc), and the events it lost
  (any boundary reporting loss, and the ring buffers' counters).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

TRACKER = r"""
import json, os, signal, sys, time
from smsrepl.blocks.tracker import TrackedDirtyMap
m = TrackedDirtyMap(sys.argv[1])
stop = False
signal.signal(signal.SIGTERM, lambda *a: globals().__setitem__("stop", True))
m.freeze(); m.freeze().release()
print("ready", flush=True)
lost, blocks, rounds = [], 0, 0
while not stop:
    time.sleep(1.0)
    f = m.freeze()
    b = m.last_boundary
    rounds += 1
    blocks += b.blocks
    if b.lost:
        lost.append(b.lost)
    f.release()
counts = m.tracker.counters()
m.close()
print(json.dumps({"lost": lost, "blocks": blocks, "rounds": rounds, "counters": counts}), flush=True)
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def fio(dev: str, seconds: float, rate: int | None) -> float:
    args = ["fio", "--name=w", f"--filename={dev}", "--rw=randwrite", "--bs=4k", "--iodepth=16",
            "--ioengine=libaio", "--direct=1", "--numjobs=2", "--group_reporting", f"--runtime={seconds}",
            "--time_based", "--output-format=json", "--randrepeat=0"]
    if rate:
        args.append(f"--rate_iops={rate // 2}")  # per job
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out)["jobs"][0]["write"]["iops"]


def with_tracker(dev: str, seconds: float, rate: int | None) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": os.path.join(HERE, "..", "src")}
    p = subprocess.Popen([sys.executable, "-c", TRACKER, dev], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "ready"
    c0, t0 = cpu_seconds(p.pid), time.monotonic()
    iops = fio(dev, seconds, rate)
    c1, t1 = cpu_seconds(p.pid), time.monotonic()
    p.terminate()
    rep = json.loads(p.stdout.read().strip().splitlines()[-1])
    p.wait()
    rep["cpu_pct_of_core"] = 100 * (c1 - c0) / (t1 - t0)
    return iops, rep


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rate", type=int, default=100_000)
    ap.add_argument("--disk", choices=["loop", "zram"], default="loop")
    ap.add_argument("--tmp", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where the loop device's backing file goes (default /dev/shm)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="smsrepl-tracker-", dir=args.tmp)
    zram = loop = None
    try:
        if args.disk == "zram":
            zram = open("/sys/class/zram-control/hot_add").read().strip()
            with open(f"/sys/block/zram{zram}/disksize", "w") as fh:
                fh.write("1G")
            dev = f"/dev/zram{zram}"
        else:
            img = os.path.join(tmp, "disk.img")
            with open(img, "wb") as fh:
                fh.truncate(1 << 30)
            loop = dev = subprocess.run(["losetup", "-f", "--show", img], capture_output=True, text=True,
                                        check=True).stdout.strip()
        subprocess.run(["dd", "if=/dev/zero", f"of={dev}", "bs=1M", "count=1024", "oflag=direct", "status=none"],
                       check=True)
        ratios, off_iops, on_iops, cpu, lost, events = [], [], [], [], [], 0
        for i in range(args.pairs):
            order = (False, True) if i % 2 == 0 else (True, False)
            got = {}
            for on in order:
                got[on] = with_tracker(dev, args.seconds, None)[0] if on else fio(dev, args.seconds, None)
            off_iops.append(got[False])
            on_iops.append(got[True])
            ratios.append(got[True] / got[False])
            iops, rep = with_tracker(dev, args.seconds, args.rate)
            cpu.append(rep["cpu_pct_of_core"])
            lost += rep["lost"]
            events += rep["counters"].get("events", 0)
            print(f"pair {i + 1}: off {got[False]:.0f} on {got[True]:.0f} IOPS ({got[True] / got[False]:.3f}); "
                  f"at {iops:.0f} IOPS the tracker took {rep['cpu_pct_of_core']:.2f}% of a core, "
                  f"{rep['counters'].get('events', 0)} events, lost: {rep['lost'] or 'none'}", flush=True)
        print(json.dumps({
            "disk": args.disk, "pairs": args.pairs, "seconds": args.seconds,
            "iops_off_median": statistics.median(off_iops), "iops_on_median": statistics.median(on_iops),
            "iops_ratio_median": round(statistics.median(ratios), 3),
            "rate": args.rate, "tracker_cpu_pct_median": round(statistics.median(cpu), 2),
            "tracker_cpu_pct_max": round(max(cpu), 2), "events_at_rate": events, "lost": lost,
        }, indent=1))
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop])
        if zram:
            with open("/sys/class/zram-control/hot_remove", "w") as fh:
                fh.write(zram)
        os.rmdir(tmp) if not os.listdir(tmp) else subprocess.run(["rm", "-rf", tmp])
    return 0


if __name__ == "__main__":
    sys.exit(main())
