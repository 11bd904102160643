"""smsrepl against rsync -z over emulated WAN links (smsrepl.lab.linkemu), same run, medians of N.

    python benchmarks/links.py [--size-mib 256] [--runs 3] [--streams 1,4,auto] [--cc cubic,bbr]
                               [--link 100mbit:20ms --link 1gbit:50ms:0.1% ...] [--tcp-buffer-max BYTES]

Each link (RATE:RTT[:LOSS%], the same each way; default the issue's 100mbit:20ms,
1gbit:50ms:0.1% and 1gbit:150ms) with each congestion control is a pair of network namespaces
joined by the emulator, all up at once; each run goes through every link and, on each, a
single TCP stream (lab.linkprobe, the link's ceiling with these buffers), `smsrepl send
block --level 0` of a disk-like image for each --streams value (passed always: the CLI's
default is auto; values other than 1 are skipped when the CLI has no --streams), and
`rsync -z --whole-file` to an rsync daemon. Each copy is compared with its source.

Goodput = the image's data bytes (its non-zero 4 KiB blocks: what a copy must carry) per
second, as a fraction of the link rate; rsync -z can pass 1.0 by compressing. Writes
OUT/links.md and OUT/links.json. Needs root (namespaces, TUN devices); TCP buffers stay at the
kernel's defaults unless --tcp-buffer-max raises them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import numpy as np  # noqa: E402

from smsrepl.lab import linkprobe  # noqa: E402
from smsrepl.lab.certs import make_bundle, write_certkey  # noqa: E402
from smsrepl.lab.linkemu import LinkEmulator, LinkUnavailable, parse_spec, unavailable  # noqa: E402
from smsrepl.lab.testdata import write_image  # noqa: E402

CLI = [sys.executable, "-m", "smsrepl"]
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # as replication.py: let smsrepl use its bytecode
LINKS = ["100mbit:20ms", "1gbit:50ms:0.1%", "1gbit:150ms"]
SMS_PORT, RSYNC_PORT = 8900, 8730


def data_bytes(path: str) -> int:
    """Bytes in the image's non-zero 4 KiB blocks."""
    total = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(16 << 20):
            a = np.frombuffer(chunk, dtype=np.uint8)
            blocks = a[: len(a) // 4096 * 4096].reshape(-1, 4096)
            total += int(blocks.any(axis=1).sum()) * 4096 + (4096 if a[len(a) // 4096 * 4096:].any() else 0)
    return total


def cli_streams() -> bool:
    out = subprocess.run(CLI + ["send", "block", "--help"], capture_output=True, text=True).stdout
    return "--streams" in out


#: whether this smsrepl takes --streams: then every run names its count (its default is auto)
STREAMS_FLAG = cli_streams()


def _wait(p: subprocess.Popen, timeout: float) -> float:
    """Waits for p; returns its CPU seconds (user + system, its waited children included)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return ru.ru_utime + ru.ru_stime
        if time.monotonic() > deadline:
            p.kill()
            p.wait()
            raise RuntimeError(f"{p.args[3:6]} did not finish in {timeout:.0f} s")
        time.sleep(0.01)


def sms_once(link: LinkEmulator, ck: str, src: str, base: str, streams: str) -> dict:
    os.makedirs(base)
    target = f"{base}/t.img"
    rx = link.run_in("b", CLI + ["receive", "--listen", f"{link.addr('b')}:{SMS_PORT}", "--certkey", ck, "--create",
                                 "--target", f"disk0={target}", "--state-dir", f"{base}/rx", "--once"],
                     stderr=subprocess.PIPE)
    try:
        assert rx.stderr is not None
        if b"listening" not in rx.stderr.readline():
            raise RuntimeError("receiver did not start in its namespace")
        os.sync()
        cpu0, t0 = link.forwarder_cpu(), time.perf_counter()
        tx = link.run_in("a", CLI + ["send", "block", "--json", src, "--to", f"{link.addr('b')}:{SMS_PORT}",
                                     "--target", "disk0", "--certkey", ck, "--state-dir", f"{base}/tx", "--level", "0",
                                     "--progress", "none", *(["--streams", streams] if STREAMS_FLAG else [])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = tx.communicate(timeout=3600)
        wall = time.perf_counter() - t0
        if tx.returncode:
            raise RuntimeError(f"smsrepl send failed: {err[-800:]!r}")
        fwd_cpu = link.forwarder_cpu() - cpu0
        rx.stderr.read()
        rx_cpu = _wait(rx, 60)
        summary = json.loads(out.decode().strip().splitlines()[-1])
        if subprocess.run(["cmp", "-s", src, target]).returncode:
            raise RuntimeError("the smsrepl copy differs from its source")
        return {"wall": wall, "round": summary.get("seconds"), "wire": summary.get("wire_bytes"), "fwd_cpu": fwd_cpu,
                "rx_cpu": rx_cpu}
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
        shutil.rmtree(base, ignore_errors=True)


def rsync_once(link: LinkEmulator, src: str, root: str, name: str) -> dict:
    os.sync()
    cpu0, t0 = link.forwarder_cpu(), time.perf_counter()
    cp = link.run_in("a", ["rsync", "-z", "--whole-file", "--stats", src,
                           f"rsync://{link.addr('b')}:{RSYNC_PORT}/bench/{name}"], stdout=subprocess.PIPE, text=True)
    out, _ = cp.communicate(timeout=3600)
    wall = time.perf_counter() - t0
    if cp.returncode:
        raise RuntimeError(f"rsync over the link failed ({cp.returncode})")
    sent = next(line for line in out.splitlines() if line.startswith("Total bytes sent"))
    if subprocess.run(["cmp", "-s", src, os.path.join(root, name)]).returncode:
        raise RuntimeError("the rsync copy differs from its source")
    os.unlink(os.path.join(root, name))
    return {"wall": wall, "wire": int(sent.split(":")[1].replace(",", "").split()[0]),
            "fwd_cpu": link.forwarder_cpu() - cpu0}


class Case:
    """One link with one congestion control: its emulator and an rsync daemon on side b."""

    def __init__(self, spec: str, cc: str, subnet: int, tmp: str, buffer_max: int | None) -> None:
        self.spec, self.cc = spec, cc
        self.link = LinkEmulator.from_spec(spec, cc=cc, subnet=subnet, tcp_buffer_max=buffer_max)
        self.link.__enter__()
        self.root = os.path.join(tmp, f"rsync-{subnet}")
        os.makedirs(self.root)
        conf = os.path.join(tmp, f"rsyncd-{subnet}.conf")
        with open(conf, "w") as fh:
            fh.write(f"use chroot = false\n[bench]\npath = {self.root}\nread only = false\nuid = root\ngid = root\n")
        self.link.run_in("b", ["rsync", "--daemon", "--no-detach", f"--address={self.link.addr('b')}",
                               f"--port={RSYNC_PORT}", f"--config={conf}"])
        self.rows: dict[str, list[dict]] = {}

    def add(self, key: str, row: dict) -> None:
        self.rows.setdefault(key, []).append(row)

    def close(self) -> None:
        self.link.__exit__(None, None, None)


def med(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--link", action="append", metavar="RATE:RTT[:LOSS%]", help="default " + " ".join(LINKS).replace("%", "%%"))
    ap.add_argument("--cc", default="cubic,bbr", help="congestion controls, comma-separated")
    ap.add_argument("--streams", default="1,4,auto", help="smsrepl --streams values, comma-separated")
    ap.add_argument("--tcp-buffer-max", type=int, default=None,
                    help="raise the namespaces' largest TCP buffers to this many bytes (default: kernel defaults)")
    ap.add_argument("--probe-seconds", type=float, default=3.0, help="the single TCP stream's length")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tmp", default=None)
    args = ap.parse_args()
    why = unavailable()
    if why:
        print(f"links benchmark skipped: {why}")
        return 0
    specs = args.link or LINKS
    for s in specs:
        parse_spec(s)
    ccs = []
    for cc in args.cc.split(","):
        why = unavailable(cc)
        if why:
            print(f"congestion control {cc} skipped: {why}")
        else:
            ccs.append(cc)
    streams = args.streams.split(",")
    if not STREAMS_FLAG:
        skipped = [s for s in streams if s != "1"]
        if skipped:
            print(f"--streams {','.join(skipped)} skipped: this smsrepl's `send block` has no --streams")
        streams = [s for s in streams if s == "1"]
    tmp = tempfile.mkdtemp(prefix="smsrepl-links-", dir=args.tmp)
    os.makedirs(args.out, exist_ok=True)
    cases: list[Case] = []
    try:
        ck = str(write_certkey(os.path.join(tmp, "certs"), make_bundle()))
        src = os.path.join(tmp, "source.img")
        size = args.size_mib << 20
        mix = write_image(src, size, seed=42)
        data = data_bytes(src)
        for spec in specs:
            for cc in ccs:
                cases.append(Case(spec, cc, 100 + len(cases), tmp, args.tcp_buffer_max))
        time.sleep(0.5)  # the rsync daemons
        for run in range(args.runs):
            for case in cases:
                t0 = time.perf_counter()
                probe = linkprobe.bulk(case.link, seconds=args.probe_seconds)
                case.add("tcp", {"bps": probe["steady_bps"], "min_rtt_ms": probe["sender"]["min_rtt_us"] / 1e3,
                                 "retrans": probe["sender"]["total_retrans"]})
                for s in streams:
                    case.add(f"smsrepl {s}", sms_once(case.link, ck, src, os.path.join(tmp, f"sms{run}"), s))
                case.add("rsync -z", rsync_once(case.link, src, case.root, f"r{run}.img"))
                print(f"run {run + 1}/{args.runs} {case.spec} {case.cc}: {time.perf_counter() - t0:.0f} s "
                      + " ".join(f"{k} {v[-1].get('wall', 0):.1f}s" for k, v in case.rows.items() if k != "tcp"),
                      flush=True)
        for case in cases:
            case.close()
        result = collect(cases, size, data, mix, args, streams)
    except LinkUnavailable as exc:
        print(f"links benchmark skipped: {exc}")
        return 0
    finally:
        for case in cases:
            case.close()
        shutil.rmtree(tmp, ignore_errors=True)
    report = render(result)
    print(report)
    with open(os.path.join(args.out, "links.md"), "w") as fh:
        fh.write(report)
    with open(os.path.join(args.out, "links.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    plot(result, os.path.join(args.out, "links.png"))
    return 0


def plot(r: dict, path: str) -> None:
    """Goodput against --streams, one panel per link and congestion control, with one TCP
    stream and rsync -z on the same link as lines (matplotlib; nothing without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install '.[bench]' for matplotlib)")
        return
    cases = r["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(3.2 * len(cases), 3.4), sharey=True, squeeze=False)
    for ax, c in zip(axes[0], cases):
        names = [s for s in r["streams"] if f"smsrepl {s}" in c["tools"]]
        ax.bar(range(len(names)), [100 * c["tools"][f"smsrepl {s}"]["fraction"] for s in names], color="tab:blue")
        ax.set_xticks(range(len(names)), [f"{s}" for s in names])
        ax.axhline(100 * c["tcp"]["fraction"], color="tab:gray", linestyle="--", label="one TCP stream")
        if "rsync -z" in c["tools"]:
            ax.axhline(100 * c["tools"]["rsync -z"]["fraction"], color="tab:orange", label="rsync -z")
        ax.set_title(f"{c['link']} {c['cc']}", fontsize=9)
        ax.set_xlabel("--streams")
    axes[0][0].set_ylabel("goodput, % of the link rate")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collect(cases: list[Case], size: int, data: int, mix: dict, args, streams: list[str]) -> dict:
    out: dict = {"size": size, "data_bytes": data, "mix": mix, "runs": args.runs, "streams": streams,
                 "tcp_buffer_max": args.tcp_buffer_max, "machine": f"{os.cpu_count()} cores, {platform.machine()}",
                 "date": time.strftime("%Y-%m-%d"), "cases": []}
    for case in cases:
        rate = parse_spec(case.spec).rate_bps
        row: dict = {"link": case.spec, "cc": case.cc, "rate_bps": rate, "forwarder": case.link.stats, "tools": {}}
        for key, rows in case.rows.items():
            if key == "tcp":
                row["tcp"] = {"bps": med(rows, "bps"), "fraction": med(rows, "bps") / rate,  # type: ignore[operator]
                              "min_rtt_ms": med(rows, "min_rtt_ms"), "retrans": med(rows, "retrans")}
                continue
            wall = med(rows, "wall")
            assert wall is not None
            rnd = med(rows, "round")
            row["tools"][key] = {"wall": wall, "runs": [r["wall"] for r in rows], "wire": med(rows, "wire"),
                                 "round": rnd, "round_fraction": data * 8 / rnd / rate if rnd else None,
                                 "goodput_bps": data * 8 / wall, "fraction": data * 8 / wall / rate,
                                 "fwd_cpu_per_s": statistics.median(r["fwd_cpu"] / r["wall"] for r in rows)}
        out["cases"].append(row)
    return out


def _cell(t: dict) -> str:
    """Goodput over the whole command (process start to exit), and over smsrepl's round alone
    (its own seconds: connecting, TLS, the round's data and its durable end)."""
    out = f"{t['fraction']:.0%} ({t['wall']:.1f} s)"
    if t.get("round_fraction"):
        out += f"; round {t['round_fraction']:.0%} ({t['round']:.1f} s)"
    return out


def render(r: dict) -> str:
    mib = 1 << 20
    buffers = f"largest raised to {r['tcp_buffer_max']} bytes" if r["tcp_buffer_max"] else "the kernel's defaults"
    lines = [f"## Emulated links (lab.linkemu), {r['size'] / mib:.0f} MiB disk-like image, medians of {r['runs']}", "",
             f"Machine: {r['machine']}, {r['date']}. Image data (non-zero 4 KiB blocks): {r['data_bytes'] / 1e6:.0f} MB. "
             f"TCP buffers: {buffers}. "
             "smsrepl at --level 0. Goodput = data bytes per second, as a fraction of the link rate.", ""]
    tools = [f"smsrepl {s}" for s in r["streams"]] + ["rsync -z"]
    head = "| link | cc | one TCP stream | " + " | ".join(
        f"{t.replace('smsrepl ', 'smsrepl --streams ') if t != 'smsrepl 1' else 'smsrepl'}" for t in tools)
    lines += [head + " | smsrepl (auto) vs rsync -z | forwarder CPU |",
              "|---|---|---:|" + "---:|" * len(tools) + "---:|---:|"]
    for c in r["cases"]:
        cells = [_cell(c["tools"][t]) for t in tools if t in c["tools"]]
        sms = c["tools"].get("smsrepl auto") or c["tools"].get("smsrepl 1")
        rs = c["tools"].get("rsync -z")
        ratio = f"{rs['wall'] / sms['wall']:.2f}x" if sms and rs else "-"
        cpu = max(t["fwd_cpu_per_s"] for t in c["tools"].values())
        lines.append(f"| {c['link']} | {c['cc']} | {c['tcp']['fraction']:.0%} (rtt {c['tcp']['min_rtt_ms']:.0f} ms) | "
                     + " | ".join(cells) + f" | {ratio} | {cpu:.0%} |")
    lines += ["", "One TCP stream: lab.linkprobe's bulk transfer (its last two thirds), the ceiling of one connection "
              "with these buffers. smsrepl (auto) vs rsync -z: rsync's seconds over smsrepl's with --streams auto, "
              "or one connection where auto was not run (above 1: smsrepl faster). "
              "Forwarder CPU: the emulator's share of one core during the busiest copy. smsrepl's cells: goodput "
              "over the whole command (process start-up and imports, about 0.3 s here, included), then over its "
              "round (the summary's seconds: connecting, TLS, the extra connections joining, the data and its "
              "durable end).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
