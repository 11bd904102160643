"""Block replication over loopback against rsync, same run, medians of N.

    python benchmarks/replication.py [--size-gib 2] [--runs 3] [--tmp DIR]

Cases (each run interleaved so machine noise hits all alike):
  full copy     smsrepl send block (TLS 1.3, zstd level 2 by default)  vs  rsync daemon on loopback
                with --whole-file, with and without -z
  sync round    after 1% random 4 KiB rewrites: smsrepl (no change tracking)  vs
                rsync --inplace --no-whole-file (default block size, and -B 4096)
  netcheck      smsrepl netcheck against a receiver, after each full copy
Reports wall seconds, MB/s of source size, bytes on the wire, peak RSS of each side.
Setup copies are flushed (sync) before each timed case: smsrepl's receiver makes
its writes durable, rsync does not, and neither should pay for the setup's writeback.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from smsrepl.lab.certs import make_bundle, write_certkey  # noqa: E402
from smsrepl.blocks.dirtymap import DirtyMap  # noqa: E402
from smsrepl.lab.testdata import rewrite_random_blocks, write_image  # noqa: E402

CLI = [sys.executable, "-m", "smsrepl"]
# an installed smsrepl has its bytecode compiled (pip does it); a checkout run with
# PYTHONDONTWRITEBYTECODE would compile every module at each start (0.2 s per process)
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Measured:
    """A child process whose peak RSS is read by GNU time (a forked Python child would
    otherwise report the parent's RSS, inherited before exec)."""

    def __init__(self, args: list[str]) -> None:
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(["/usr/bin/time", "-f", "PEAK_RSS_KIB %M", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def wait(self) -> tuple[float, int, bytes, bytes]:
        out = self.proc.stdout.read()
        err = self.proc.stderr.read()
        self.proc.wait()
        wall = time.perf_counter() - self.t0
        if self.proc.returncode != 0:
            raise RuntimeError(f"{self.proc.args[3:7]} failed ({self.proc.returncode}): {err[-2000:]!r}")
        rss = int(err.decode().rsplit("PEAK_RSS_KIB", 1)[1].split()[0])
        return wall, rss, out, err


class SmsReceiver:
    def __init__(self, ck: str, target: str, state: str) -> None:
        self.port = free_port()
        self.m = Measured(CLI + ["receive", "--listen", f"127.0.0.1:{self.port}", "--certkey", ck,
                                 "--create", "--target", f"disk0={target}", "--state-dir", state, "--once"])
        line = self.m.proc.stderr.readline()
        if b"listening" not in line:
            raise RuntimeError(line)


def sms_round(ck: str, src: str, target: str, rx_state: str, tx_state: str, *extra: str) -> dict:
    rx = SmsReceiver(ck, target, rx_state)
    tx = Measured(CLI + ["send", "block", "--json", src, "--to", f"127.0.0.1:{rx.port}", "--target", "disk0",
                         "--certkey", ck, "--state-dir", tx_state, *extra])
    wall, tx_rss, out, _ = tx.wait()
    _, rx_rss, _, rx_err = rx.m.wait()
    summary = json.loads(out.decode().strip().splitlines()[-1])
    return {"wall": wall, "wire": summary["wire_bytes"], "tx_rss": tx_rss, "rx_rss": rx_rss, "kind": summary["kind"],
            "dirty_blocks": summary.get("dirty_blocks"), "round_s": summary["seconds"],
            "stages": summary.get("stages") or {}, "rx_stages": receiver_stages(rx_err.decode(errors="replace"))}


def receiver_stages(stderr: str) -> dict:
    """The receiver's stage seconds from its per-round line ("... stage seconds: receive 0.23 write 0.04 ...")."""
    out: dict = {}
    for line in stderr.splitlines():
        if "stage seconds:" in line:
            words = line.split("stage seconds:", 1)[1].split()
            out = {words[i]: float(words[i + 1]) for i in range(0, len(words) - 1, 2)}
    return out


def sms_sync_command(ck: str, pristine: str, base: str, work: str, size: int) -> dict:
    """A SYNC command (SIGUSR1) to a running `send block --continuous` session: seconds from
    the command to the round's summary line. The workload's 1% change is made while the
    session runs, marked in its dirty map as an agent would."""
    subprocess.run(["cp", "-a", "--sparse=always", base, work], check=True)
    src = f"{work}/src.img"
    subprocess.run(["cp", "--sparse=always", pristine, src], check=True)  # what the target holds
    port = free_port()
    rx = subprocess.Popen(CLI + ["receive", "--listen", f"127.0.0.1:{port}", "--certkey", ck,
                                 "--create", "--target", f"disk0={work}/t.img", "--state-dir", f"{work}/rx"],
                          stderr=subprocess.PIPE)
    try:
        if b"listening" not in rx.stderr.readline():
            raise RuntimeError("receiver did not start")
        tx = subprocess.Popen(CLI + ["send", "block", "--json", src, "--to", f"127.0.0.1:{port}", "--target", "disk0",
                                     "--certkey", ck, "--state-dir", f"{work}/tx", "--dirty-map",
                                     f"{work}/dirty.map", "--continuous", "--interval", "86400"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            json.loads(tx.stdout.readline())  # the session's first round: nothing changed yet
            with DirtyMap.open(f"{work}/dirty.map", size) as dm:
                rewrite_random_blocks(src, 0.01, seed=9, dirty=dm)
            os.sync()
            t0 = time.perf_counter()
            tx.send_signal(signal.SIGUSR1)
            line = tx.stdout.readline()
            wall = time.perf_counter() - t0
            summary = json.loads(line)
            tx.send_signal(signal.SIGTERM)  # cutover round, then exit
            if tx.wait(60) != 0:
                raise RuntimeError(f"continuous sender exited with {tx.returncode}")
        finally:
            if tx.poll() is None:
                tx.kill()
                tx.wait()
    finally:
        rx.terminate()
        rx.wait(10)
        rx.stderr.close()
    if subprocess.run(["cmp", "-s", src, f"{work}/t.img"]).returncode != 0:
        raise RuntimeError("target differs from the source after the cutover round")
    return {"wall": wall, "wire": summary["wire_bytes"], "tx_rss": None, "rx_rss": None, "kind": summary["kind"],
            "dirty_blocks": summary.get("dirty_blocks"), "round_s": summary["seconds"]}


class RsyncDaemon:
    def __init__(self, root: str, tmp: str) -> None:
        self.port = free_port()
        conf = os.path.join(tmp, "rsyncd.conf")
        with open(conf, "w") as fh:
            fh.write(f"use chroot = false\nlog file = {tmp}/rsyncd.log\n[bench]\npath = {root}\nread only = false\nuid = root\ngid = root\n")
        self.proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--port={self.port}", f"--config={conf}"])
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("rsync daemon did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def netcheck(ck: str, tmp: str) -> dict:
    rx = SmsReceiver(ck, os.path.join(tmp, "netcheck.img"), os.path.join(tmp, "netcheck-rx"))
    cp = subprocess.run(CLI + ["netcheck", "--to", f"127.0.0.1:{rx.port}", "--certkey", ck],
                        capture_output=True, text=True, check=True)
    rx.m.wait()
    return json.loads(cp.stdout)


def rsync(src: str, port: int, name: str, *flags: str) -> dict:
    m = Measured(["rsync", *flags, "--stats", src, f"rsync://127.0.0.1:{port}/bench/{name}"])
    wall, rss, out, _ = m.wait()
    text = out.decode()
    sent = int(next(l for l in text.splitlines() if l.startswith("Total bytes sent")).split(":")[1].replace(",", "").split()[0])
    return {"wall": wall, "wire": sent, "tx_rss": rss, "rx_rss": None}


def med(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--dirty-scaling", action="store_true",
                    help="only smsrepl: dirty-map sync rounds of 2 GiB and 8 GiB sparse images, same dirty blocks")
    ap.add_argument("--full-only", action="store_true", help="only the full-copy cases (quicker)")
    ap.add_argument("--level", default=None, help="smsrepl's --level for its compressed full copy (default: its default)")
    ap.add_argument("--rss-scaling", action="store_true",
                    help="only smsrepl: peak RSS of each side for 1 GiB and 4 GiB images (full copy and sync round)")
    args = ap.parse_args()
    if args.rss_scaling:
        return rss_scaling(args.tmp)
    if args.dirty_scaling:
        return dirty_scaling(args.tmp, args.runs)
    tmp = tempfile.mkdtemp(prefix="smsrepl-bench-", dir=args.tmp)
    size = int(args.size_gib * (1 << 30))
    try:
        ck = str(write_certkey(os.path.join(tmp, "certs"), make_bundle()))
        src = os.path.join(tmp, "source.img")
        mix = write_image(src, size, seed=42)
        subprocess.run(["cat", src], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        dst_root = os.path.join(tmp, "rsync-root")
        os.makedirs(dst_root)
        daemon = RsyncDaemon(dst_root, tmp)
        keys = ["smsrepl full", "smsrepl full --level 0", "rsync -z --whole-file", "rsync --whole-file"]
        if not args.full_only:
            keys += ["smsrepl sync", "smsrepl sync (dirty map)", "smsrepl SYNC command (continuous, dirty map)", "rsync --inplace sync", "rsync --inplace -B4096 sync"]
        res: dict[str, list[dict]] = {k: [] for k in keys}
        changed = 0
        checks: list[dict] = []
        try:
            for run in range(args.runs):
                base = os.path.join(tmp, f"run{run}")
                os.makedirs(base)
                os.sync()  # earlier runs' writeback must not land in this one
                # full copies
                r = sms_round(ck, src, f"{base}/t.img", f"{base}/rx", f"{base}/tx",
                              *(["--level", args.level] if args.level else []))
                res["smsrepl full"].append(r)
                checks.append(netcheck(ck, base))
                os.unlink(f"{base}/t.img")
                shutil.rmtree(f"{base}/rx")
                shutil.rmtree(f"{base}/tx")
                os.sync()
                res["smsrepl full --level 0"].append(
                    sms_round(ck, src, f"{base}/t.img", f"{base}/rx", f"{base}/tx", "--level", "0"))
                for key, flags in (("rsync -z --whole-file", ["-z"]), ("rsync --whole-file", [])):
                    name = f"full{run}.img"
                    res[key].append(rsync(src, daemon.port, name, "--whole-file", *flags))
                    os.unlink(os.path.join(dst_root, name))
                os.unlink(f"{base}/t.img")
                shutil.rmtree(f"{base}/rx")
                shutil.rmtree(f"{base}/tx")
            if not args.full_only:
                # sync rounds: the same 1% change for every tool, each starting from the pre-change target
                pristine = os.path.join(tmp, "pristine.img")
                subprocess.run(["cp", "--sparse=always", src, pristine], check=True)
                sms_base = os.path.join(tmp, "sms-base")
                os.makedirs(sms_base)
                dm_path = f"{sms_base}/dirty.map"
                sms_round(ck, src, f"{sms_base}/t.img", f"{sms_base}/rx", f"{sms_base}/tx", "--dirty-map", dm_path)
                with DirtyMap.open(dm_path, size) as dm:  # the agent marks the workload's writes
                    changed = rewrite_random_blocks(src, 0.01, seed=9, dirty=dm)
                for run in range(args.runs):
                    work = os.path.join(tmp, f"sync{run}")
                    subprocess.run(["cp", "-a", "--sparse=always", sms_base, work], check=True)
                    os.sync()  # the copy's writeback belongs to the setup, not to the round's fsyncs
                    r = sms_round(ck, src, f"{work}/t.img", f"{work}/rx", f"{work}/tx")
                    assert r["kind"] == "sync", r
                    res["smsrepl sync"].append(r)
                    shutil.rmtree(work)
                    subprocess.run(["cp", "-a", "--sparse=always", sms_base, work], check=True)
                    os.sync()
                    r = sms_round(ck, src, f"{work}/t.img", f"{work}/rx", f"{work}/tx", "--dirty-map", f"{work}/dirty.map")
                    assert r["kind"] == "sync" and r["dirty_blocks"], r
                    res["smsrepl sync (dirty map)"].append(r)
                    shutil.rmtree(work)
                    os.sync()
                    r = sms_sync_command(ck, pristine, sms_base, work, size)
                    assert r["kind"] == "sync" and r["dirty_blocks"], r
                    res["smsrepl SYNC command (continuous, dirty map)"].append(r)
                    shutil.rmtree(work)
                    for key, flags in (("rsync --inplace sync", []), ("rsync --inplace -B4096 sync", ["-B", "4096"])):
                        name = f"sync{run}.img"
                        subprocess.run(["cp", "--sparse=always", pristine, os.path.join(dst_root, name)], check=True)
                        os.sync()
                        res[key].append(rsync(src, daemon.port, name, "--inplace", "--no-whole-file", *flags))
                        os.unlink(os.path.join(dst_root, name))
        finally:
            daemon.stop()
        print(f"\nsource: {size / 2**30:.2f} GiB disk-like image ({', '.join(f'{k} {v / size:.0%}' for k, v in mix.items())}); "
              f"sync change: {changed} bytes in random 4 KiB blocks; medians of {args.runs}\n")
        print("| case | wall s | MB/s of source | wire MB | sender RSS MiB | receiver RSS MiB |")
        print("|---|---:|---:|---:|---:|---:|")
        table = {}
        for key, rows in res.items():
            wall, wire = med(rows, "wall"), med(rows, "wire")
            tx, rx = med(rows, "tx_rss"), med(rows, "rx_rss")
            if not rows:
                continue
            table[key] = {"wall": wall, "wire": wire, "tx_rss_kib": tx, "rx_rss_kib": rx, "runs": rows}
            print(f"| {key} | {wall:.2f} | {size / wall / 1e6:.0f} | {wire / 1e6:.2f} | "
                  f"{'-' if tx is None else f'{tx / 1024:.0f}'} | "
                  f"{'-' if rx is None else f'{rx / 1024:.0f}'} |")
        f = table["smsrepl full"]["wall"]
        f0 = table["smsrepl full --level 0"]["wall"]
        print()
        print(f"full copy speed-up vs rsync -z --whole-file: {table['rsync -z --whole-file']['wall'] / f:.2f}x "
              f"(wire {table['smsrepl full']['wire'] / table['rsync -z --whole-file']['wire']:.3f}x of rsync's)")
        print(f"full copy speed-up vs rsync --whole-file:    {table['rsync --whole-file']['wall'] / f:.2f}x "
              f"compressed, {table['rsync --whole-file']['wall'] / f0:.2f}x with --level 0")
        if not args.full_only:
            s = table["smsrepl sync"]["wall"]
            print(f"sync round vs rsync --inplace (default -B):  {table['rsync --inplace sync']['wall'] / s:.2f}x")
            print(f"sync round vs rsync --inplace -B 4096:       {table['rsync --inplace -B4096 sync']['wall'] / s:.2f}x")
            d = table["smsrepl sync (dirty map)"]["wall"]
            d_round = med(res["smsrepl sync (dirty map)"], "round_s")
            b4096 = table["rsync --inplace -B4096 sync"]["wall"]
            print(f"dirty-map sync vs rsync --inplace -B 4096:   {b4096 / d:.2f}x as separate processes; "
                  f"{b4096 / d_round:.2f}x for the round itself ({d_round:.3f} s: connect, TLS, round, "
                  f"receiver's durable end; what each round of --continuous costs) "
                  f"(wire {table['smsrepl sync (dirty map)']['wire'] / changed:.3f}x of rewritten bytes)")
            c = table["smsrepl SYNC command (continuous, dirty map)"]["wall"]
            print(f"SYNC command to a continuous session vs rsync --inplace -B 4096: {b4096 / c:.2f}x "
                  f"({c:.3f} s from the command to the round's summary; wire "
                  f"{table['smsrepl SYNC command (continuous, dirty map)']['wire'] / changed:.3f}x of rewritten bytes)")
            print(f"sync wire bytes / rewritten bytes: {table['smsrepl sync']['wire'] / changed:.3f} "
                  f"(budget 1.1 + 0.05% of disk = {(1.1 * changed + 0.0005 * size) / changed:.3f})")
        delay = statistics.median(c["network_delay"] for c in checks)
        bw = statistics.median(c["migration_speed"] for c in checks)
        full_mbit = size / f * 8 / 1e6
        print(f"netcheck on loopback: delay {delay:.2f} ms, bandwidth {bw:.0f} Mbit/s = "
              f"{bw / full_mbit:.2f}x the full copy's {full_mbit:.0f} Mbit/s of source "
              f"(grades {sorted(set(c['evaluation_result'] for c in checks))})")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"size": size, "changed": changed, "table": table, "netcheck": checks}, fh, indent=1)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def dirty_scaling(tmpdir: str | None, runs: int) -> int:
    """The same 5000 dirty 4 KiB blocks on a 2 GiB and an 8 GiB sparse image: the round should not care."""
    tmp = tempfile.mkdtemp(prefix="smsrepl-dirty-", dir=tmpdir)
    try:
        ck = str(write_certkey(os.path.join(tmp, "certs"), make_bundle()))
        print("| image | dirty blocks | wall s (median) | round s (median) | wire MB |\n|---|---:|---:|---:|---:|")
        for gib in (2, 8):
            size = gib << 30
            src = os.path.join(tmp, f"src{gib}.img")
            write_image(src, size, seed=gib, mix={"hole": 0.9, "text": 0.05, "random": 0.05})
            base = os.path.join(tmp, f"b{gib}")
            os.makedirs(base)
            sms_round(ck, src, f"{base}/t.img", f"{base}/rx", f"{base}/tx", "--dirty-map", f"{base}/dirty.map")
            with DirtyMap.open(f"{base}/dirty.map", size) as dm:
                rewrite_random_blocks(src, 5000 / (size // 4096), seed=7, dirty=dm)
            rows = []
            for run in range(runs):
                work = os.path.join(tmp, f"w{gib}")
                subprocess.run(["cp", "-a", "--sparse=always", base, work], check=True)
                os.sync()
                rows.append(sms_round(ck, src, f"{work}/t.img", f"{work}/rx", f"{work}/tx", "--dirty-map",
                                      f"{work}/dirty.map"))
                shutil.rmtree(work)
            print(f"| {gib} GiB | {rows[0]['dirty_blocks']} | {med(rows, 'wall'):.3f} | {med(rows, 'round_s'):.3f} | "
                  f"{med(rows, 'wire') / 1e6:.2f} |")
            shutil.rmtree(base)
            os.unlink(src)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rss_scaling(tmpdir: str | None) -> int:
    tmp = tempfile.mkdtemp(prefix="smsrepl-rss-", dir=tmpdir)
    try:
        ck = str(write_certkey(os.path.join(tmp, "certs"), make_bundle()))
        print("| image | round | wall s | sender RSS MiB | receiver RSS MiB |\n|---|---|---:|---:|---:|")
        for gib in (1, 4):
            src = os.path.join(tmp, f"src{gib}.img")
            write_image(src, gib << 30, seed=gib)
            base = os.path.join(tmp, f"b{gib}")
            os.makedirs(base)
            for kind in ("full", "sync"):
                if kind == "sync":
                    rewrite_random_blocks(src, 0.01, seed=gib)
                r = sms_round(ck, src, f"{base}/t.img", f"{base}/rx", f"{base}/tx")
                print(f"| {gib} GiB | {r['kind']} | {r['wall']:.2f} | {r['tx_rss'] / 1024:.0f} | {r['rx_rss'] / 1024:.0f} |")
            shutil.rmtree(base)
            os.unlink(src)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
