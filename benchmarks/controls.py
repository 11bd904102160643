"""Speed limits, schedule changes, CPU cap, progress reports: measured on real processes.

    python benchmarks/controls.py [--tmp DIR] [--json FILE]

Each case runs `smsrepl receive` and `smsrepl send block` as separate processes
on loopback. Rates are measured on the receiver's side of the connection: the
sender talks to a counting TCP proxy in front of the receiver that timestamps
every chunk it forwards. CPU use is sampled from /proc/PID/stat once a second.

Cases and what they check:
  limit     --speed-limit 80 Mbit/s, a 100 MB incompressible source: wall time
            (10 s expected) and the largest amount carried in any 1 s window
  switch    200 Mbit/s, then the --speed-limit file is rewritten to 40 Mbit/s
            during the transfer: how long until the receiver's 1 s rate is
            within 10% of 40 Mbit/s
  cpu       --config LINUX_CPU_LIMIT 30 on a compressible image: the sender's
            CPU use averaged over every 5 s window after the first 5 s
  reports   every --progress json line of a full copy and a sync round
            validates against 5.4.8; remain_time once progress passed 20%
            against the remaining time actually taken
Exit status 1 when a figure misses its acceptance bound.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from smsrepl.lab.certs import make_bundle, write_certkey  # noqa: E402
from smsrepl.control.progress import validate_report  # noqa: E402
from smsrepl.lab.testdata import write_image  # noqa: E402

CLI = [sys.executable, "-m", "smsrepl"]
TICKS = os.sysconf("SC_CLK_TCK")


class CountingProxy:
    """Forwards one connection to ``port``; records (time, bytes) of every client->server chunk."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.chunks: list[tuple[float, int]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self.upstream))

        def pump(a, b, record):
            try:
                while data := a.recv(1 << 16):
                    if record:
                        self.chunks.append((time.monotonic(), len(data)))
                    b.sendall(data)
            except OSError:
                pass
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pump, args=(server, client, False), daemon=True).start()
        pump(client, server, True)

    def window_rates(self, width: float = 1.0, step: float = 0.1) -> list[tuple[float, float]]:
        """(window start, bytes/s) for sliding windows over the recorded transfer."""
        if not self.chunks:
            return []
        t0, t_end = self.chunks[0][0], self.chunks[-1][0]
        out, i, j, acc = [], 0, 0, 0
        start = t0
        while start + width <= t_end:
            while j < len(self.chunks) and self.chunks[j][0] < start + width:
                acc += self.chunks[j][1]
                j += 1
            while i < j and self.chunks[i][0] < start:
                acc -= self.chunks[i][1]
                i += 1
            out.append((start - t0, acc / width))
            start += step
        return out

    def close(self) -> None:
        self.listener.close()


class Receiver:
    def __init__(self, ck: str, target: str, state: str) -> None:
        self.proc = subprocess.Popen(CLI + ["receive", "--listen", "127.0.0.1:0", "--certkey", ck, "--create", "--target",
                                            f"disk0={target}", "--state-dir", state, "--once"],
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        self.port = int(line.rsplit(":", 1)[1])

    def wait(self) -> None:
        self.proc.wait(120)


def send(ck: str, src: str, port: int, state: str, *extra: str, on_line=None) -> tuple[float, list[dict]]:
    t0 = time.monotonic()
    proc = subprocess.Popen(CLI + ["send", "block", "--json", src, "--to", f"127.0.0.1:{port}", "--target", "disk0",
                                   "--certkey", ck, "--state-dir", state, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reports = []
    for line in proc.stdout:
        if line.startswith("{") and '"progress"' in line:
            reports.append((time.monotonic(), json.loads(line)))
            if on_line:
                on_line(proc, reports)
    err = proc.stderr.read()
    proc.wait()
    if proc.returncode:
        raise RuntimeError(f"send failed ({proc.returncode}): {err}")
    return time.monotonic() - t0, reports


def limit_case(ck: str, tmp: str) -> dict:
    src = os.path.join(tmp, "limit.img")
    with open(src, "wb") as fh:
        fh.write(os.urandom(100_000_000))
    rules = os.path.join(tmp, "limit80.json")
    with open(rules, "w") as fh:
        json.dump({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 80}]}, fh)
    rx = Receiver(ck, os.path.join(tmp, "limit-t.img"), os.path.join(tmp, "limit-rx"))
    proxy = CountingProxy(rx.port)
    wall, reports = send(ck, src, proxy.port, os.path.join(tmp, "limit-tx"), "--speed-limit", rules,
                         "--level", "0", "--progress", "json")
    rx.wait()
    proxy.close()
    t0, t1 = proxy.chunks[0][0], proxy.chunks[-1][0]
    rates = proxy.window_rates()
    peak = max(r for _, r in rates)
    limit_bps = 80e6 / 8
    # remain_time once progress passed 20%, against the time the copy still took
    end = reports[-1][0]
    errs = []
    for t, rep in reports:
        validate_report(rep)
        if 20 <= rep["progress"] < 100 and rep["remain_time"] > 0:
            errs.append(abs(rep["remain_time"] - (end - t)) / max(end - t, 1e-9))
    return {
        "transfer_s": t1 - t0, "sender_wall_s": wall, "bytes": sum(n for _, n in proxy.chunks),
        "peak_1s_over_limit": peak / limit_bps, "reports": len(reports),
        "remain_time_worst_error": max(errs) if errs else None,
        "remain_time_median_error": sorted(errs)[len(errs) // 2] if errs else None,
    }


def switch_case(ck: str, tmp: str) -> dict:
    src = os.path.join(tmp, "switch.img")
    with open(src, "wb") as fh:
        fh.write(os.urandom(90_000_000))  # 2.5 s at 200 Mbit/s, then ~6 s at 40
    rules = os.path.join(tmp, "switch.json")

    def write(speed):
        with open(rules + ".new", "w") as fh:
            json.dump({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": speed}]}, fh)
        os.replace(rules + ".new", rules)

    write(200)
    rx = Receiver(ck, os.path.join(tmp, "switch-t.img"), os.path.join(tmp, "switch-rx"))
    proxy = CountingProxy(rx.port)
    switched = []

    def flip():
        time.sleep(2.5)
        write(40)
        switched.append(time.monotonic())

    threading.Thread(target=flip, daemon=True).start()
    send(ck, src, proxy.port, os.path.join(tmp, "switch-tx"), "--speed-limit", rules, "--level", "0")
    rx.wait()
    proxy.close()
    t0 = proxy.chunks[0][0]
    at = switched[0] - t0
    target = 40e6 / 8
    before = [r for s, r in proxy.window_rates() if 0.5 <= s and s + 1 <= at]
    settle = None
    for s, r in proxy.window_rates():
        if s + 1.0 > at and r <= 1.1 * target:  # the 1 s window ending at s + 1
            settle = s + 1.0 - at
            break
    return {"rate_before_mbit": (sum(before) / len(before) * 8 / 1e6) if before else None,
            "seconds_to_40_mbit": settle}


def cpu_case(ck: str, tmp: str) -> dict:
    src = os.path.join(tmp, "cpu.img")
    write_image(src, 320 << 20, seed=5, mix={"text": 0.8, "random": 0.2})
    conf = os.path.join(tmp, "cpu.json")
    with open(conf, "w") as fh:
        json.dump({"configurations": [{"config_key": "LINUX_CPU_LIMIT", "config_value": "30"}]}, fh)
    rx = Receiver(ck, os.path.join(tmp, "cpu-t.img"), os.path.join(tmp, "cpu-rx"))
    proc = subprocess.Popen(CLI + ["send", "block", "--json", src, "--to", f"127.0.0.1:{rx.port}", "--target", "disk0",
                                   "--certkey", ck, "--state-dir", os.path.join(tmp, "cpu-tx"), "--config", conf],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    samples = []  # (seconds since start, CPU seconds used)
    t0 = time.monotonic()
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            samples.append((time.monotonic() - t0, (int(fields[11]) + int(fields[12])) / TICKS))
        except (OSError, IndexError):
            pass
        time.sleep(1.0)
    proc.wait()
    rx.wait()
    if proc.returncode:
        raise RuntimeError(f"capped send failed: {proc.stderr.read()!r}")
    windows = []
    for i, (t, c) in enumerate(samples):
        if t < 5:
            continue
        for t2, c2 in samples[i + 1:]:
            if t2 - t >= 5:
                windows.append(100 * (c2 - c) / (t2 - t))
                break
    return {"seconds": time.monotonic() - t0, "windows": len(windows),
            "max_5s_cpu_percent": max(windows) if windows else None,
            "mean_cpu_percent": 100 * samples[-1][1] / samples[-1][0] if samples else None}


def sync_reports_case(ck: str, tmp: str) -> dict:
    src = os.path.join(tmp, "rep.img")
    write_image(src, 96 << 20, seed=6)
    counts = {}
    for kind in ("full", "sync"):
        if kind == "sync":
            with open(src, "r+b") as fh:
                fh.seek(3 << 20)
                fh.write(os.urandom(1 << 20))
        rx = Receiver(ck, os.path.join(tmp, "rep-t.img"), os.path.join(tmp, "rep-rx"))
        _, reports = send(ck, src, rx.port, os.path.join(tmp, "rep-tx"), "--progress", "json")
        rx.wait()
        last = -1
        for _, rep in reports:
            validate_report(rep)
            assert rep["progress"] >= last, "progress went backwards"
            last = rep["progress"]
        assert last == 100, f"the {kind} round's last report says {last}%"
        counts[kind] = len(reports)
    return {"validated_reports": counts}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tmp")
    ap.add_argument("--json")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="smsrepl-controls-", dir=args.tmp)
    try:
        ck = str(write_certkey(os.path.join(tmp, "certs"), make_bundle()))
        res = {"limit": limit_case(ck, tmp), "switch": switch_case(ck, tmp), "cpu": cpu_case(ck, tmp),
               "reports": sync_reports_case(ck, tmp)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=1))
    lim, sw, cpu = res["limit"], res["switch"], res["cpu"]
    checks = {
        "100 MB at 80 Mbit/s takes 10 s within 5%": abs(lim["transfer_s"] - 10) <= 0.5,
        "no 1 s window above 1.1x the limit": lim["peak_1s_over_limit"] <= 1.1,
        "remain_time after 20% within 25%": lim["remain_time_worst_error"] is not None
        and lim["remain_time_worst_error"] <= 0.25,
        "200 -> 40 Mbit/s seen within 2 s": sw["seconds_to_40_mbit"] is not None and sw["seconds_to_40_mbit"] <= 2,
        "CPU cap 30: every 5 s window after 5 s <= 30%": cpu["max_5s_cpu_percent"] is not None
        and cpu["max_5s_cpu_percent"] <= 30,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"figures": res, "checks": checks}, fh, indent=1)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
