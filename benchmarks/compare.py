"""smsrepl against the tools people would otherwise use, and against what this machine can do.

    python benchmarks/compare.py [--size-gib 1] [--runs 3] [--level 2] [--out benchmarks/results]

1. Builds a disk-like image (holes, zeros, text-like, random and mixed 4 MiB stretches).
2. Measures each stage of the data path alone, in this run, on one core: read (page
   cache), 4 KiB digests, zstd compress and decompress at the level used, AES-256-GCM
   encrypt and decrypt in TLS-record-sized pieces (what TLS 1.3 does per byte), and a
   durable write. From the image's composition (what is hole, zero, data, and what
   compresses) it computes the machine's bound: the CPU seconds every source byte costs
   across both endpoints, spread over the available cores, and the write speed.
3. Runs, interleaved, several times: the smsrepl full copy (real `smsrepl receive` and
   `send block` processes, TLS 1.3 on loopback), the rsync daemon with `-z --whole-file`
   and with `--whole-file`, and a `zstd | openssl enc` pipeline (compression and
   encryption alone, nothing sent or written).
4. Writes a Markdown table (stdout and OUT/results.md), OUT/results.json, and, when
   matplotlib is installed (`pip install '.[bench]'`), OUT/throughput.png and OUT/stages.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import numpy as np  # noqa: E402

from replication import RsyncDaemon, rsync, sms_round  # noqa: E402
from smsrepl import kernels  # noqa: E402
from smsrepl.lab.certs import make_bundle, write_certkey  # noqa: E402
from smsrepl.lab.linkemu import LinkEmulator, LinkUnavailable, parse_rate  # noqa: E402
from smsrepl.codec import DEFAULT_LEVEL, Compressor, Decompressor  # noqa: E402
from smsrepl.lab.testdata import write_image  # noqa: E402

CHUNK = 8 << 20
RECORD = 16 << 10  # a TLS record


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / max(seconds, 1e-9)


def stage_rates(src: str, level: int, tmp: str) -> dict:
    """MB/s of each stage alone on one core, plus the image's composition as the data path sees it."""
    size = os.path.getsize(src)
    buf = bytearray(CHUNK)
    fd = os.open(src, os.O_RDONLY)
    try:
        for _ in range(2):  # the second pass is timed: page cache, as the benchmark's transfers read it
            t0 = time.perf_counter()
            alloc = 0
            pos = 0
            while pos < size:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                hole = os.lseek(fd, data, os.SEEK_HOLE)
                pos = data
                while pos < hole:
                    n = os.preadv(fd, [memoryview(buf)[:min(CHUNK, hole - pos)]], pos)
                    alloc += n
                    pos += n
            read_s = time.perf_counter() - t0
        # digest, zero detection and compression over the allocated data, chunk by chunk
        digests = np.empty(CHUNK // 4096, dtype="<u8")
        comp, dec = Compressor(level), Decompressor()
        digest_s = comp_s = dec_s = 0.0
        data_bytes = wire = compressed_in = 0
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            pos = data
            while pos < hole:
                n = os.preadv(fd, [memoryview(buf)[:min(CHUNK, hole - pos)]], pos)
                view = memoryview(buf)[:n]
                t0 = time.perf_counter()
                k = -(-n // 4096)
                kernels.block_digests(view, 4096, digests[:k])
                digest_s += time.perf_counter() - t0
                nonzero = digests[:k] != 0
                if nonzero.any():
                    blocks = np.frombuffer(buf, dtype=np.uint8, count=n // 4096 * 4096).reshape(-1, 4096)
                    payload = blocks[nonzero[:len(blocks)]].tobytes()
                    data_bytes += len(payload)
                    t0 = time.perf_counter()
                    codec, out = comp.encode(payload)
                    comp_s += time.perf_counter() - t0
                    wire += len(out)
                    if codec:
                        compressed_in += len(payload)
                        t0 = time.perf_counter()
                        dec.decode(codec, out, len(payload))
                        dec_s += time.perf_counter() - t0
                pos += n
    finally:
        os.close(fd)
    enc_s, dec_tls_s = _aes_gcm(min(wire, 256 << 20))
    aes_bytes = min(wire, 256 << 20)
    write_s, written = _durable_write(os.path.join(tmp, "write-probe"), 256 << 20)
    return {
        "size": size, "allocated": alloc, "data": data_bytes, "wire_estimate": wire, "compressed_in": compressed_in,
        "MB/s": {
            "read": _rate(alloc, read_s) / 1e6,
            "digest": _rate(alloc, digest_s) / 1e6,
            f"zstd-{level} compress": _rate(data_bytes, comp_s) / 1e6,
            f"zstd-{level} decompress": _rate(compressed_in, dec_s) / 1e6,
            "AES-256-GCM encrypt": _rate(aes_bytes, enc_s) / 1e6,
            "AES-256-GCM decrypt": _rate(aes_bytes, dec_tls_s) / 1e6,
            "durable write": _rate(written, write_s) / 1e6,
        },
    }


def _aes_gcm(nbytes: int) -> tuple[float, float]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(AESGCM.generate_key(256))
    record = os.urandom(RECORD)
    nonce = os.urandom(12)
    n = max(1, nbytes // RECORD)
    t0 = time.perf_counter()
    sealed = [aead.encrypt(nonce, record, None) for _ in range(min(n, 64))]
    for _ in range(n - min(n, 64)):
        aead.encrypt(nonce, record, None)
    enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n):
        aead.decrypt(nonce, sealed[i % len(sealed)], None)
    return enc, time.perf_counter() - t0


def _durable_write(path: str, nbytes: int) -> tuple[float, int]:
    data = os.urandom(CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        for off in range(0, nbytes, CHUNK):
            os.pwrite(fd, data, off)
        os.fdatasync(fd)
        return time.perf_counter() - t0, nbytes
    finally:
        os.close(fd)
        os.unlink(path)


def machine_bound(st: dict, cores: int) -> dict:
    """Source bytes per second the stages allow: CPU seconds per source byte over both
    endpoints (sender: read, digest, compress, encrypt; receiver: decrypt, decompress,
    digest, write's CPU is small) spread over ``cores``, and the durable write speed."""
    r = {k: v * 1e6 for k, v in st["MB/s"].items()}
    comp = next(v for k, v in r.items() if k.endswith("compress") and "de" not in k)
    decomp = next(v for k, v in r.items() if k.endswith("decompress"))
    cpu = {
        "sender read": st["allocated"] / r["read"],
        "sender digest": st["allocated"] / r["digest"],
        "sender compress": st["data"] / comp,
        "sender encrypt": st["wire_estimate"] / r["AES-256-GCM encrypt"],
        "receiver decrypt": st["wire_estimate"] / r["AES-256-GCM decrypt"],
        "receiver decompress": st["compressed_in"] / decomp,
        "receiver digest": st["data"] / r["digest"],
    }
    total = sum(cpu.values())
    cpu_bound = st["size"] / (total / cores)
    io_bound = st["size"] / (st["data"] / r["durable write"]) if st["data"] else float("inf")
    return {"cpu_seconds": cpu, "cpu_total": total, "cpu_bound": cpu_bound, "io_bound": io_bound,
            "bound": min(cpu_bound, io_bound), "cores": cores}


def zstd_openssl(src: str, level: int) -> dict:
    """`zstd -T0 -LEVEL | openssl enc -aes-256-ctr` into /dev/null: compression and encryption
    alone with the standard tools (no network, no write), as a reference."""
    t0 = time.perf_counter()
    cmd = (f"zstd -q -T0 -{level} -c {src} | openssl enc -aes-256-ctr -pbkdf2 -pass pass:bench "
           f"| wc -c")
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, check=True)
    return {"wall": time.perf_counter() - t0, "wire": int(out.stdout.split()[0]), "tx_rss": None, "rx_rss": None}


class Wan:
    """An emulated link (smsrepl.lab.linkemu: two network namespaces joined by TUN devices and
    a forwarder that shapes each way): ``rate`` each way and half the round-trip ``rtt_ms`` of
    delay each way, TCP buffers at the kernel's defaults. Sender side 10.77.0.1, receiver side
    10.77.0.2."""

    TX, RX = "a", "b"

    def __init__(self, rate: str, rtt_ms: float) -> None:
        self.rate, self.rtt_ms = rate, rtt_ms
        self.link = LinkEmulator(parse_rate(rate), rtt_ms / 2, subnet=77)
        try:
            self.link.__enter__()
        except LinkUnavailable as exc:
            raise PermissionError(str(exc)) from exc
        #: what shapes the link
        self.shaper = "lab.linkemu (rate, delay and a one-RTT drop-tail queue each way)"

    def down(self) -> None:
        self.link.__exit__(None, None, None)

    def run_in(self, ns: str, args: list[str], **kw) -> subprocess.Popen:
        return self.link.run_in(ns, args, **kw)


def wan_case(wan: Wan, ck: str, src: str, tmp: str, runs: int, level: int) -> dict:
    """Effective throughput (source bytes per second) of smsrepl and rsync -z over the shaped link."""
    res: dict[str, list[float]] = {"smsrepl send block": [], "rsync -z --whole-file": []}
    root = os.path.join(tmp, "wan-rsync")
    os.makedirs(root, exist_ok=True)
    conf = os.path.join(tmp, "wan-rsyncd.conf")
    with open(conf, "w") as fh:
        fh.write(f"use chroot = false\n[bench]\npath = {root}\nread only = false\nuid = root\ngid = root\n")
    daemon = wan.run_in(wan.RX, ["rsync", "--daemon", "--no-detach", "--address=10.77.0.2", "--port=8730",
                                 f"--config={conf}"])
    try:
        time.sleep(0.5)
        for run in range(runs):
            res["smsrepl send block"].append(_wan_sms_once(wan, ck, src, os.path.join(tmp, f"wan{run}"), level))
            t0 = time.perf_counter()
            cp = wan.run_in(wan.TX, ["rsync", "-z", "--whole-file", src, f"rsync://10.77.0.2:8730/bench/w{run}.img"])
            if cp.wait():
                raise RuntimeError("rsync over the WAN failed")
            res["rsync -z --whole-file"].append(time.perf_counter() - t0)
            os.unlink(os.path.join(root, f"w{run}.img"))
    finally:
        daemon.terminate()
        daemon.wait(10)
    return {k: statistics.median(v) for k, v in res.items()}


def sweep(ck: str, src: str, tmp: str, runs: int, levels: list[int | str], rates: list[str]) -> dict:
    """Throughput and wire bytes of the smsrepl full copy against the zstd level, on loopback
    and over shaped links of several rates (medians of ``runs``)."""
    out: dict = {"loopback": {}, "links": {}}
    for level in levels:
        walls, wires = [], []
        for run in range(runs):
            base = os.path.join(tmp, f"sweep{level}-{run}")
            os.makedirs(base)
            os.sync()
            r = sms_round(ck, src, f"{base}/t.img", f"{base}/rx", f"{base}/tx", "--level", str(level))
            walls.append(r["wall"])
            wires.append(r["wire"])
            shutil.rmtree(base)
        out["loopback"][level] = {"wall": statistics.median(walls), "wire": statistics.median(wires)}
    for rate in rates:
        try:
            wan = Wan(rate, 2.0)
        except PermissionError as exc:
            print(f"link sweep skipped: {exc}")
            break
        try:
            out["links"][rate] = {}
            for level in levels:
                r = _wan_sms(wan, ck, src, tmp, runs, level)
                out["links"][rate][level] = r
        finally:
            wan.down()
    return out


def _wan_sms(wan: "Wan", ck: str, src: str, tmp: str, runs: int, level: int) -> float:
    return statistics.median(_wan_sms_once(wan, ck, src, os.path.join(tmp, f"wsweep{run}"), level)
                             for run in range(runs))


def _wan_sms_once(wan: "Wan", ck: str, src: str, base: str, level: int) -> float:
    """Seconds of one smsrepl full copy over the shaped link (the receiver in the far namespace)."""
    from replication import CLI

    os.makedirs(base)
    rx = wan.run_in(wan.RX, CLI + ["receive", "--listen", "10.77.0.2:8900", "--certkey", ck, "--create", "--target",
                                   f"disk0={base}/t.img", "--state-dir", f"{base}/rx", "--once"],
                    stderr=subprocess.PIPE)
    try:
        if b"listening" not in rx.stderr.readline():
            raise RuntimeError("receiver did not start in its namespace")
        t0 = time.perf_counter()
        tx = wan.run_in(wan.TX, CLI + ["send", "block", "--json", src, "--to", "10.77.0.2:8900", "--target", "disk0",
                                       "--certkey", ck, "--state-dir", f"{base}/tx", "--level", str(level)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = tx.communicate()
        if tx.returncode:
            raise RuntimeError(f"send over the shaped link failed: {err[-500:]!r}")
        wall = time.perf_counter() - t0
        rx.wait(30)
        return wall
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
        shutil.rmtree(base, ignore_errors=True)


def render_sweep(size: int, sw: dict, default_level: int) -> str:
    mb = 1e6
    out = ["## Sweep: zstd level", "", "| link | " + " | ".join(f"level {lv}" for lv in sw["loopback"]) + " |",
           "|---|" + "---:|" * len(sw["loopback"])]
    out.append("| loopback, MB/s of source | " + " | ".join(f"{size / r['wall'] / mb:.0f}"
                                                        for r in sw["loopback"].values()) + " |")
    out.append("| loopback, wire MB | " + " | ".join(f"{r['wire'] / mb:.0f}" for r in sw["loopback"].values()) + " |")
    for rate, per in sw["links"].items():
        out.append(f"| {rate}, MB/s of source | " + " | ".join(f"{size / w / mb:.0f}" for w in per.values()) + " |")
    out.append("")
    for name, walls in [("loopback", {lv: r["wall"] for lv, r in sw["loopback"].items()})] + list(sw["links"].items()):
        best = min(walls, key=walls.get)
        for setting in (default_level, "auto"):
            if setting in walls:
                gap = walls[setting] / walls[best] - 1
                out.append(f"- {name}: best level {best}; {setting} is "
                           f"{'the best' if best == setting else f'{gap:.0%} slower'}")
    out.append("")
    return "\n".join(out)


def plot_sweep(out_dir: str, size: int, sw: dict) -> None:
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    series = [("loopback", {lv: r["wall"] for lv, r in sw["loopback"].items()})] + list(sw["links"].items())
    for name, walls in series:
        levels = [lv for lv in walls if lv != "auto"]
        line, = ax.plot(levels, [size / walls[lv] / 1e6 for lv in levels], "o-", label=name)
        if "auto" in walls:  # auto is not a level: a dashed line at its throughput
            ax.axhline(size / walls["auto"] / 1e6, color=line.get_color(), linestyle="--", linewidth=1)
    ax.set_xlabel("zstd level (0 = none); dashed: --level auto")
    ax.set_ylabel("MB/s of source")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "sweep-level.png"), dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--level", type=int, default=DEFAULT_LEVEL)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--wan", action="append", metavar="RATE:RTT",
                    help="simulated links (lab.linkemu, two network namespaces); default 100mbit:20ms and 1gbit:2ms")
    ap.add_argument("--no-wan", action="store_true", help="skip the simulated links")
    ap.add_argument("--sweep", action="store_true",
                    help="also sweep the zstd level (0 1 2 3 6 auto) on loopback and links of 100mbit, 1gbit")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    size = int(args.size_gib * (1 << 30))
    tmp = tempfile.mkdtemp(prefix="smsrepl-compare-", dir=args.tmp)
    os.makedirs(args.out, exist_ok=True)
    try:
        ck = str(write_certkey(os.path.join(tmp, "certs"), make_bundle()))
        src = os.path.join(tmp, "source.img")
        mix = write_image(src, size, seed=42)
        st = stage_rates(src, args.level, tmp)
        bound = machine_bound(st, cores)
        root = os.path.join(tmp, "rsync-root")
        os.makedirs(root)
        daemon = RsyncDaemon(root, tmp)
        cases = {"smsrepl send block": [], "rsync -z --whole-file": [], "rsync --whole-file": [],
                 f"zstd -{args.level} then openssl enc (no transfer)": []}
        try:
            for run in range(args.runs):
                base = os.path.join(tmp, f"run{run}")
                os.makedirs(base)
                os.sync()
                cases["smsrepl send block"].append(sms_round(ck, src, f"{base}/t.img", f"{base}/rx", f"{base}/tx",
                                                             "--level", str(args.level)))
                shutil.rmtree(base)
                for key, flags in (("rsync -z --whole-file", ["-z"]), ("rsync --whole-file", [])):
                    os.sync()
                    cases[key].append(rsync(src, daemon.port, f"r{run}.img", "--whole-file", *flags))
                    os.unlink(os.path.join(root, f"r{run}.img"))
                cases[f"zstd -{args.level} then openssl enc (no transfer)"].append(zstd_openssl(src, args.level))
        finally:
            daemon.stop()
        rows = {k: {"wall": statistics.median(r["wall"] for r in v), "wire": statistics.median(r["wire"] for r in v),
                    "runs": [r["wall"] for r in v]} for k, v in cases.items()}
        sms_runs = sorted(cases["smsrepl send block"], key=lambda r: r["wall"])
        median_run = sms_runs[len(sms_runs) // 2]
        rows["smsrepl send block"]["stages"] = {"sender": median_run.get("stages", {}),
                                               "receiver": median_run.get("rx_stages", {})}
        wans: dict[str, dict] = {}
        if not args.no_wan:
            for spec in args.wan or ["100mbit:20ms", "1gbit:2ms"]:
                rate, rtt = spec.split(":")
                try:
                    wan = Wan(rate, float(rtt.rstrip("ms")))
                except PermissionError as exc:
                    print(f"simulated links skipped: the link emulator cannot run here ({exc})")
                    break
                try:
                    wans[spec] = wan_case(wan, ck, src, tmp, args.runs, args.level)
                    wans[spec]["shaper"] = wan.shaper
                finally:
                    wan.down()
        report = render(size, mix, st, bound, rows, args, wans)
        if args.sweep:
            sw = sweep(ck, src, tmp, args.runs, [0, 1, 2, 3, 6, "auto"], [] if args.no_wan else ["100mbit", "1gbit"])
            report += "\n" + render_sweep(size, sw, args.level)
            plot_sweep(args.out, size, sw)
        print(report)
        with open(os.path.join(args.out, "results.md"), "w") as fh:
            fh.write(report)
        with open(os.path.join(args.out, "results.json"), "w") as fh:
            json.dump({"size": size, "mix": mix, "stages": st, "bound": bound, "cases": rows, "wan": wans}, fh, indent=1)
        plots(args.out, size, st, bound, rows)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def render(size: int, mix: dict, st: dict, bound: dict, rows: dict, args, wans: dict) -> str:
    mb = 1e6
    out = [f"# smsrepl benchmark: {size / 2**30:.2f} GiB disk-like image, medians of {args.runs}", "",
           f"Machine: {len(os.sched_getaffinity(0))} cores ({os.uname().machine}, {_cpu_model()}), "
           f"Python {sys.version.split()[0]}, backend {kernels.BACKEND}, {time.strftime('%Y-%m-%d')}.", "",
           "Image: " + ", ".join(f"{k} {v / size:.0%}" for k, v in mix.items())
           + f"; data (non-zero blocks) {st['data'] / mb:.0f} MB, zstd-{args.level} to {st['wire_estimate'] / mb:.0f} MB.",
           "", "## Stages alone (one core)", "", "| stage | MB/s | CPU s for this image (both ends) |", "|---|---:|---:|"]
    cpu = bound["cpu_seconds"]
    shares = {"read": ["sender read"], "digest": ["sender digest", "receiver digest"],
              "decompress": ["receiver decompress"], "compress": ["sender compress"],
              "encrypt": ["sender encrypt"], "decrypt": ["receiver decrypt"], "write": []}
    for name, rate in st["MB/s"].items():
        key = next(k for k in shares if k in name)
        secs = sum(cpu[s] for s in shares[key])
        out.append(f"| {name} | {rate:.0f} | {secs:.2f} |")
    out += ["", f"Machine bound: {bound['cpu_total']:.2f} CPU s per copy over {bound['cores']} cores = "
                f"{bound['cpu_bound'] / mb:.0f} MB/s of source; durable write allows {bound['io_bound'] / mb:.0f} MB/s; "
                f"bound {bound['bound'] / mb:.0f} MB/s.", "",
            "## End to end (loopback)", "", "| case | wall s | MB/s of source | wire MB | fraction of the bound |",
            "|---|---:|---:|---:|---:|"]
    for k, r in rows.items():
        thr = size / r["wall"]
        out.append(f"| {k} | {r['wall']:.2f} | {thr / mb:.0f} | {r['wire'] / mb:.1f} | {thr / bound['bound']:.0%} |")
    sms = rows["smsrepl send block"]["wall"]
    stages = rows["smsrepl send block"].get("stages") or {}
    if stages.get("sender") or stages.get("receiver"):
        out += ["", f"Where the smsrepl copy's time went (median run, {sms:.2f} s wall; seconds summed over the "
                    "threads of each stage, so overlapping stages add up to more than the wall time):", "",
                "| endpoint | stage | seconds | share of wall |", "|---|---|---:|---:|"]
        for side in ("sender", "receiver"):
            for name, secs in sorted(stages.get(side, {}).items(), key=lambda kv: -kv[1]):
                out.append(f"| {side} | {name} | {secs:.2f} | {secs / sms:.0%} |")
    out += ["", f"smsrepl vs rsync -z --whole-file: {rows['rsync -z --whole-file']['wall'] / sms:.2f}x; "
                f"vs rsync --whole-file: {rows['rsync --whole-file']['wall'] / sms:.2f}x; "
                f"smsrepl at {size / sms / bound['bound']:.0%} of the machine's bound.", ""]
    if wans:
        out += ["## Simulated links (two network namespaces joined by lab.linkemu, shaped each way)", "",
                "| link (rate, RTT) | smsrepl s | rsync -z s | smsrepl MB/s of source | rsync -z MB/s | smsrepl vs rsync -z |",
                "|---|---:|---:|---:|---:|---:|"]
        for spec, r in wans.items():
            a, b = r["smsrepl send block"], r["rsync -z --whole-file"]
            out.append(f"| {spec} | {a:.1f} | {b:.1f} | {size / a / mb:.0f} | {size / b / mb:.0f} | {b / a:.2f}x |")
        out += ["", "Shaped with " + "; ".join(sorted({r["shaper"] for r in wans.values()})) + ".", ""]
    return "\n".join(out)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _pyplot():
    """matplotlib.pyplot drawing to files, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plots: pip install '.[bench]' for matplotlib)")
        return None
    return plt


def plots(out_dir: str, size: int, st: dict, bound: dict, rows: dict) -> None:
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = list(rows) + ["machine bound"]
    vals = [size / rows[k]["wall"] / 1e6 for k in rows] + [bound["bound"] / 1e6]
    ax.barh(names, vals, color=["C0"] + ["C1"] * (len(rows) - 1) + ["C2"])
    ax.set_xlabel("MB/s of source (higher is better)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "throughput.png"), dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh(list(bound["cpu_seconds"]), list(bound["cpu_seconds"].values()), color="C0")
    ax.set_xlabel("CPU seconds per copy of the image")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "stages.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
