"""The block full copy and sync round on loopback against rsync, ssh and zstd, in one command.

    python benchmarks/loopback.py [--size-gib 1] [--runs 3] [--levels 2,0] [--out benchmarks/results]

Full copy of a disk-like image (lab.testdata: holes, zeros, text, random, mixed), the source
in the page cache, each tool timed until the target's data is durable:
  smsrepl send block     at each --levels level (the first is reported as the default); its
                         receiver makes the data durable before the sender is told the round
                         ended, so the sender's exit is the durable point
  rsync daemon           -z --whole-file and --whole-file, then `sync`
  rsync over ssh         -z --whole-file and --whole-file, then `sync`
  zstd -1 -T2 | ssh | zstd -d, then `sync`
Sync round after 1% random 4 KiB rewrites of the source, each tool from the same pre-change
target: smsrepl by digest scan (no dirty map: it reads the whole source, digests 4 KiB blocks
and sends what differs from the manifest) against `rsync --inplace --no-whole-file -B 4096`
to the daemon, then `sync`.

Every run of every case starts its own servers (the smsrepl receiver, an rsync daemon, an
sshd on a private port with its own host key and authorized key in the temp dir; the system's
sshd is not touched) and waits for all of them, so CPU seconds are the user+sys of every
process of the case, both ends (getrusage(RUSAGE_CHILDREN) before and after), less what the
servers spent starting up until they listened (/proc/PID/stat of each server, read when it
accepts connections). Cases are interleaved run by run; medians of --runs.

rsync 3.5's -z negotiates zstd at level 3 (`-vv`: "Client negotiated compress: zstd (level 3)";
the same bytes on the wire as --compress-level=3).

Wire bytes: smsrepl's --json summary (frame bytes on the TLS stream: TLS adds ~22 bytes per
16 KiB record, 0.13%); rsync's `--stats` "Total bytes sent" (the rsync protocol stream, for the
daemon what goes on the TCP connection); for ssh transports the ssh client's own count of
what it sent ("Transferred: sent N" of `ssh -v`, ciphertext and ssh framing included).

Writes OUT/loopback.md and OUT/loopback.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
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

from smsrepl.codec import DEFAULT_LEVEL  # noqa: E402
from smsrepl.lab.certs import make_bundle, write_certkey  # noqa: E402
from smsrepl.lab.testdata import rewrite_random_blocks, write_image  # noqa: E402

from replication import free_port, receiver_stages  # noqa: E402  (benchmarks/: the script's own directory)

CLI = [sys.executable, "-m", "smsrepl"]
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
TICK = os.sysconf("SC_CLK_TCK")


def wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.025)
    raise RuntimeError(f"{what} did not listen on {port}")


def proc_cpu(pid: int) -> float:
    """User+sys seconds a live process (and the children it reaped) spent so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / TICK  # utime stime cutime cstime


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def machine_busy() -> float:
    """Busy seconds of all the machine's CPUs so far (user, nice, system, irq, softirq), kernel
    threads included: the writeback a buffered writer leaves to them, softirq network work."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:8]]
    return (f[0] + f[1] + f[2] + f[5] + f[6]) / TICK


def stop_server(proc: subprocess.Popen) -> None:
    """Let a forking server reap its connection's children (their CPU then counts in its
    rusage), then stop it and wait."""
    path = f"/proc/{proc.pid}/task/{proc.pid}/children"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(path) as fh:
                if not fh.read().split():
                    break
        except FileNotFoundError:
            break
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def durable_sync() -> None:
    subprocess.run(["sync"], check=True)


class Case:
    """One timed case: servers' startup CPU is taken out, every process is waited for."""

    def __init__(self) -> None:
        self.startup = 0.0
        self.cpu0 = children_cpu()
        self.t0 = 0.0
        self.busy0 = 0.0

    def server_ready(self, proc: subprocess.Popen) -> None:
        self.startup += proc_cpu(proc.pid)

    def go(self) -> None:
        self.t0 = time.perf_counter()
        self.busy0 = machine_busy()

    def wall(self) -> float:
        return time.perf_counter() - self.t0

    def cpu(self) -> float:
        return children_cpu() - self.cpu0 - self.startup

    def machine(self) -> float:
        """The machine's busy CPU seconds from go() to now (every process stopped)."""
        return machine_busy() - self.busy0


# --- smsrepl -------------------------------------------------------------------------------
def sms_round(ck: str, src: str, base: str, *extra: str, build: str | None = None) -> dict:
    """One `send block` round into BASE/t.img (state in BASE/rx, BASE/tx); ``build``: the
    source tree of another smsrepl build to run instead (its C kernels built in place)."""
    build = build or NEW_BUILD
    env = dict(os.environ, PYTHONPATH=build) if build else None
    case = Case()
    port = free_port()
    rx = subprocess.Popen(CLI + ["receive", "--listen", f"127.0.0.1:{port}", "--certkey", ck, "--create",
                                 "--target", f"disk0={base}/t.img", "--state-dir", f"{base}/rx", "--once"],
                          stderr=subprocess.PIPE, env=env)
    try:
        line = rx.stderr.readline()
        if b"listening" not in line:
            raise RuntimeError(f"receiver did not start: {line!r}")
        case.server_ready(rx)
        case.go()
        tx = subprocess.run(CLI + ["send", "block", "--json", src, "--to", f"127.0.0.1:{port}", "--target", "disk0",
                                   "--certkey", ck, "--state-dir", f"{base}/tx", *extra],
                            capture_output=True, env=env)
        wall = case.wall()
        if tx.returncode:
            raise RuntimeError(f"send failed: {tx.stderr[-2000:]!r}")
        rx_err = rx.stderr.read().decode(errors="replace")
        rx.wait(30)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    summary = json.loads(tx.stdout.decode().strip().splitlines()[-1])
    return {"wall": wall, "cpu": case.cpu(), "mcpu": case.machine(), "wire": summary["wire_bytes"], "kind": summary["kind"],
            "stages": summary.get("stages") or {}, "rx_stages": receiver_stages(rx_err)}


# --- rsync daemon ----------------------------------------------------------------------------
def rsync_daemon(tmp: str, root: str, src: str, name: str, *flags: str) -> dict:
    case = Case()
    port = free_port()
    conf = os.path.join(tmp, "rsyncd.conf")
    with open(conf, "w") as fh:
        fh.write(f"use chroot = false\n[bench]\npath = {root}\nread only = false\nuid = root\ngid = root\n")
    daemon = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--port={port}", f"--config={conf}"])
    try:
        wait_port(port, daemon, "rsync daemon")
        time.sleep(0.05)  # the probe connection's child must be gone before startup is read
        stop_children_of_probe(daemon)
        case.server_ready(daemon)
        case.go()
        cp = subprocess.run(["rsync", *flags, "--stats", src, f"rsync://127.0.0.1:{port}/bench/{name}"],
                            capture_output=True, text=True)
        if cp.returncode:
            raise RuntimeError(f"rsync failed: {cp.stderr[-2000:]}")
        durable_sync()
        wall = case.wall()
    finally:
        stop_server(daemon)
    return {"wall": wall, "cpu": case.cpu(), "mcpu": case.machine(), "wire": stats_sent(cp.stdout), "rsync_sent": stats_sent(cp.stdout)}


def stop_children_of_probe(proc: subprocess.Popen) -> None:
    """Wait (briefly) until the port probe's forked child of a server is reaped."""
    path = f"/proc/{proc.pid}/task/{proc.pid}/children"
    for _ in range(100):
        try:
            with open(path) as fh:
                if not fh.read().split():
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)


def stats_sent(text: str) -> int:
    line = next(ln for ln in text.splitlines() if ln.startswith("Total bytes sent"))
    return int(line.split(":")[1].replace(",", "").split()[0])


# --- sshd on a private port -----------------------------------------------------------------
class Sshd:
    """Keys and config of a private sshd; start() runs one per case (its CPU is waited for)."""

    def __init__(self, tmp: str) -> None:
        self.dir = os.path.join(tmp, "ssh")
        os.makedirs(self.dir, mode=0o700)
        self.hostkey = os.path.join(self.dir, "host_ed25519")
        self.key = os.path.join(self.dir, "client_ed25519")
        for path in (self.hostkey, self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)
        shutil.copy(self.key + ".pub", os.path.join(self.dir, "authorized_keys"))
        self.conf = os.path.join(self.dir, "sshd_config")
        self.made_run_dir = False
        if not os.path.isdir("/run/sshd"):  # sshd's privilege separation directory
            os.makedirs("/run/sshd", mode=0o755)
            self.made_run_dir = True

    def start(self, case: Case) -> tuple[subprocess.Popen, int]:
        port = free_port()
        with open(self.conf, "w") as fh:
            fh.write(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {self.hostkey}\nPidFile none\n"
                     f"AuthorizedKeysFile {self.dir}/authorized_keys\nStrictModes no\nUsePAM no\n"
                     f"PermitRootLogin yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                     f"LogLevel ERROR\n")
        proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", self.conf], stderr=subprocess.DEVNULL)
        wait_port(port, proc, "sshd")
        stop_children_of_probe(proc)
        case.server_ready(proc)
        return proc, port

    def ssh(self, port: int) -> list[str]:
        return ["ssh", "-v", "-i", self.key, "-p", str(port), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=VERBOSE"]

    def close(self) -> None:
        if self.made_run_dir:
            shutil.rmtree("/run/sshd", ignore_errors=True)


def ssh_sent(stderr: str) -> int:
    """What the ssh client sent, by its own count ("Transferred: sent N, received M bytes")."""
    for line in reversed(stderr.splitlines()):
        if "Transferred: sent" in line:
            return int(line.split("sent", 1)[1].split(",")[0].strip())
    raise RuntimeError(f"no transfer count in ssh's output: {stderr[-500:]}")


def rsync_ssh(sshd: Sshd, src: str, dst: str, *flags: str) -> dict:
    case = Case()
    proc, port = sshd.start(case)
    try:
        case.go()
        rsh = " ".join(sshd.ssh(port))
        cp = subprocess.run(["rsync", *flags, "--stats", "-e", rsh, src, f"root@127.0.0.1:{dst}"],
                            capture_output=True, text=True)
        if cp.returncode:
            raise RuntimeError(f"rsync over ssh failed: {cp.stderr[-2000:]}")
        durable_sync()
        wall = case.wall()
    finally:
        stop_server(proc)
    return {"wall": wall, "cpu": case.cpu(), "mcpu": case.machine(), "wire": ssh_sent(cp.stderr), "rsync_sent": stats_sent(cp.stdout)}


def zstd_ssh(sshd: Sshd, src: str, dst: str) -> dict:
    case = Case()
    proc, port = sshd.start(case)
    try:
        case.go()
        ssh = " ".join(sshd.ssh(port))
        cmd = f"zstd -q -1 -T2 -c {src} | {ssh} root@127.0.0.1 'zstd -q -d -f -o {dst}'"
        cp = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True)
        if cp.returncode:
            raise RuntimeError(f"zstd over ssh failed: {cp.stderr[-2000:]}")
        durable_sync()
        wall = case.wall()
    finally:
        stop_server(proc)
    return {"wall": wall, "cpu": case.cpu(), "mcpu": case.machine(), "wire": ssh_sent(cp.stderr)}


# --- the run ------------------------------------------------------------------------------------
def same(a: str, b: str) -> None:
    if subprocess.run(["cmp", "-s", a, b]).returncode:
        raise RuntimeError(f"{b} differs from {a}")


def full_copies(tmp: str, ck: str, src: str, sshd: Sshd, levels: list[str], runs: int, rows: dict,
                old: str | None, only_sms: bool = False) -> None:
    root = os.path.join(tmp, "rsync-root")
    os.makedirs(root, exist_ok=True)
    for run in range(runs):
        for level in levels:
            for build in ([None, old] if old else [None]):
                base = os.path.join(tmp, f"sms{run}-{level}")
                os.makedirs(base)
                os.sync()
                r = sms_round(ck, src, base, "--level", level, build=build)
                if run == 0:
                    same(src, f"{base}/t.img")
                rows[sms_name(level, levels) + (OLD if build else "")].append(r)
                shutil.rmtree(base)
        if only_sms:
            print(f"full copies: run {run + 1} of {runs} done", file=sys.stderr)
            continue
        for key, flags in (("rsync daemon -z --whole-file", ["-z"]), ("rsync daemon --whole-file", [])):
            os.sync()
            rows[key].append(rsync_daemon(tmp, root, src, "t.img", "--whole-file", *flags))
            if run == 0:
                same(src, f"{root}/t.img")
            os.unlink(f"{root}/t.img")
        for key, flags in (("rsync -z --whole-file over ssh", ["-z"]), ("rsync --whole-file over ssh", [])):
            os.sync()
            rows[key].append(rsync_ssh(sshd, src, f"{root}/t.img", "--whole-file", *flags))
            if run == 0:
                same(src, f"{root}/t.img")
            os.unlink(f"{root}/t.img")
        os.sync()
        rows["zstd -1 -T2 | ssh | zstd -d"].append(zstd_ssh(sshd, src, f"{root}/t.img"))
        if run == 0:
            same(src, f"{root}/t.img")
        os.unlink(f"{root}/t.img")
        print(f"full copies: run {run + 1} of {runs} done", file=sys.stderr)


#: rows of the build given by --old
OLD = " [old build]"
#: --new: the source tree the main rows run (None: the smsrepl this Python imports)
NEW_BUILD: str | None = None


def sms_name(level: str, levels: list[str]) -> str:
    if level == levels[0]:
        return f"smsrepl send block (default, level {level})"
    return f"smsrepl send block --level {level}"


def sync_rounds(tmp: str, ck: str, src: str, runs: int, rows: dict, fraction: float, old: str | None,
                only_sms: bool = False) -> int:
    """Both tools from the same pre-change target, after the same change of the source."""
    pristine = os.path.join(tmp, "pristine.img")
    subprocess.run(["cp", "--sparse=always", src, pristine], check=True)
    sms_base = os.path.join(tmp, "sms-base")
    os.makedirs(sms_base)
    sms_round(ck, src, sms_base)  # the full copy a sync round follows
    changed = rewrite_random_blocks(src, fraction, seed=9)
    subprocess.run(["cat", src], stdout=subprocess.DEVNULL, check=True)
    root = os.path.join(tmp, "rsync-root")
    os.makedirs(root, exist_ok=True)
    for run in range(runs):
        for build in ([None, old] if old else [None]):
            work = os.path.join(tmp, f"sync{run}")
            subprocess.run(["cp", "-a", "--sparse=always", sms_base, work], check=True)
            os.sync()
            r = sms_round(ck, src, work, build=build)
            if r["kind"] != "sync":
                raise RuntimeError(f"smsrepl ran a {r['kind']} round, not a sync round")
            if run == 0:
                same(src, f"{work}/t.img")
            rows["smsrepl sync round (digest scan)" + (OLD if build else "")].append(r)
            shutil.rmtree(work)
        if only_sms:
            print(f"sync rounds: run {run + 1} of {runs} done", file=sys.stderr)
            continue
        subprocess.run(["cp", "--sparse=always", pristine, f"{root}/s.img"], check=True)
        os.sync()
        rows["rsync daemon --inplace -B 4096"].append(
            rsync_daemon(tmp, root, src, "s.img", "--inplace", "--no-whole-file", "-B", "4096"))
        if run == 0:
            same(src, f"{root}/s.img")
        os.unlink(f"{root}/s.img")
        print(f"sync rounds: run {run + 1} of {runs} done", file=sys.stderr)
    return changed


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def render(size: int, mix: dict, runs: int, table: dict, changed: int, levels: list[str]) -> str:
    sync_keys = [k for k in table if k.startswith("smsrepl sync round")] + ["rsync daemon --inplace -B 4096"]
    full = [k for k in table if k not in sync_keys]
    zd, zs = table["rsync daemon -z --whole-file"], table["rsync -z --whole-file over ssh"]
    out = [f"Loopback, {size / 2**30:.2f} GiB disk-like image "
           f"({', '.join(f'{k} {v / size:.0%}' for k, v in mix.items())}), source in the page cache, "
           f"medians of {runs} interleaved runs; seconds until the target's data is durable; CPU s = "
           f"user+sys of every process of both ends (servers' startup excluded); machine CPU s = the busy "
           f"seconds of all CPUs meanwhile (kernel threads too: the writeback buffered writes leave to them).", "",
           "| tool | seconds to durable | CPU s (both ends) | machine CPU s | wire MB | time vs rsync -z daemon | "
           "time vs rsync -z ssh | CPU vs rsync -z daemon |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k in full:
        t = table[k]
        mcpu = f"{t['mcpu']:.1f}" if "mcpu" in t else "-"  # not in results written before it was measured
        out.append(f"| {k.replace('|', chr(92) + '|')} | {t['wall']:.2f} | {t['cpu']:.1f} | {mcpu} | "
                   f"{t['wire'] / 1e6:.1f} | {zd['wall'] / t['wall']:.2f}x | {zs['wall'] / t['wall']:.2f}x | "
                   f"{t['cpu'] / zd['cpu']:.2f} |")
    sd = table["smsrepl sync round (digest scan)"]
    rs = table["rsync daemon --inplace -B 4096"]
    out += ["", f"Sync round after {changed / 2**20:.1f} MiB of random 4 KiB rewrites (1%), from the same "
                f"pre-change target:", "",
            "| tool | seconds to durable | CPU s (both ends) | wire MB | speed-up vs rsync |",
            "|---|---:|---:|---:|---:|"]
    for k, t in ((k, table[k]) for k in sync_keys):
        out.append(f"| {k} | {t['wall']:.2f} | {t['cpu']:.2f} | {t['wire'] / 1e6:.1f} | {rs['wall'] / t['wall']:.2f}x |")
    d = table[sms_name(levels[0], levels)]
    out += ["", "Acceptance (issue 26):", ""]
    checks = [
        (f"default vs rsync -z daemon >= 1.5x: {zd['wall'] / d['wall']:.2f}x", zd["wall"] / d["wall"] >= 1.5),
        (f"default vs rsync -z ssh >= 2.5x: {zs['wall'] / d['wall']:.2f}x", zs["wall"] / d["wall"] >= 2.5),
        (f"default wire <= rsync -z's ({zd['wire'] / 1e6:.1f} MB): {d['wire'] / 1e6:.1f} MB", d["wire"] <= zd["wire"]),
        (f"default CPU <= 0.8x rsync -z daemon's: {d['cpu'] / zd['cpu']:.2f}x", d["cpu"] <= 0.8 * zd["cpu"]),
        (f"sync round vs rsync --inplace -B 4096 >= 3x: {rs['wall'] / sd['wall']:.2f}x", rs["wall"] / sd["wall"] >= 3),
    ]
    l0 = "smsrepl send block --level 0"
    if l0 in table:
        p = table["rsync daemon --whole-file"]
        checks.insert(3, (f"level 0 within 1.1x of the plaintext daemon: {table[l0]['wall'] / p['wall']:.2f}x",
                          table[l0]["wall"] <= 1.1 * p["wall"]))
    out += [f"- [{'x' if ok else ' '}] {text}" for text, ok in checks]
    stages = d["runs"][len(d["runs"]) // 2]
    out += ["", f"smsrepl default, one run's stage seconds: sender {stages['stages']}; "
                f"receiver {stages['rx_stages']}", ""]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--levels", default=f"{DEFAULT_LEVEL},0",
                    help="smsrepl --level values, comma-separated; the first is the default's row")
    ap.add_argument("--fraction", type=float, default=0.01, help="share of 4 KiB blocks rewritten for the sync round")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--no-sync", action="store_true", help="only the full copies")
    ap.add_argument("--no-full", action="store_true", help="only the sync round")
    ap.add_argument("--old", metavar="SRC", help="also run the smsrepl rows with the build in this source tree "
                    "(a checkout's src/ with its C kernels built in place), interleaved: before/after figures")
    ap.add_argument("--new", metavar="SRC", help="run the main smsrepl rows with this source tree too (a snapshot, "
                    "so the checkout can change while the benchmark runs)")
    ap.add_argument("--no-others", action="store_true", help="only smsrepl's rows (with --old: an A/B of builds)")
    ap.add_argument("--render", metavar="JSON", help="only write the Markdown again from an earlier loopback.json")
    args = ap.parse_args()
    if args.render:
        with open(args.render) as fh:
            saved = json.load(fh)
        text = render(saved["size"], saved["mix"], saved["runs"], saved["table"], saved["changed"], saved["levels"])
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "loopback.md"), "w") as fh:
            fh.write(text + "\n")
        print(text)
        return 0
    levels = args.levels.split(",")
    size = int(args.size_gib * (1 << 30))
    tmp = tempfile.mkdtemp(prefix="smsrepl-loopback-", dir=args.tmp)
    sshd = None
    try:
        ck = str(write_certkey(os.path.join(tmp, "certs"), make_bundle()))
        src = os.path.join(tmp, "source.img")
        mix = write_image(src, size, seed=42)
        subprocess.run(["cat", src], stdout=subprocess.DEVNULL, check=True)  # the page cache
        sshd = Sshd(tmp)
        old = os.path.abspath(args.old) if args.old else None
        global NEW_BUILD
        NEW_BUILD = os.path.abspath(args.new) if args.new else None
        keys = [sms_name(lv, levels) + sfx for lv in levels for sfx in ([""] + ([OLD] if old else []))] + [
            "rsync daemon -z --whole-file", "rsync daemon --whole-file", "rsync -z --whole-file over ssh",
            "rsync --whole-file over ssh", "zstd -1 -T2 | ssh | zstd -d",
            "smsrepl sync round (digest scan)", "smsrepl sync round (digest scan)" + OLD,
            "rsync daemon --inplace -B 4096"]
        rows: dict[str, list[dict]] = {k: [] for k in keys}
        if not args.no_full:
            full_copies(tmp, ck, src, sshd, levels, args.runs, rows, old, args.no_others)
        changed = 0
        if not args.no_sync:
            changed = sync_rounds(tmp, ck, src, args.runs, rows, args.fraction, old, args.no_others)
        table = {k: {"wall": med(v, "wall"), "cpu": med(v, "cpu"), "mcpu": med(v, "mcpu"), "wire": med(v, "wire"),
                     "runs": v}
                 for k, v in rows.items() if v}
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "loopback.json"), "w") as fh:
            json.dump({"size": size, "mix": mix, "runs": args.runs, "levels": levels, "changed": changed,
                       "cpus": len(os.sched_getaffinity(0)), "table": table}, fh, indent=1)
        if not (args.no_full or args.no_sync or args.no_others):
            text = render(size, mix, args.runs, table, changed, levels)
        else:
            text = "\n".join(["| case | seconds | CPU s | machine CPU s | wire MB |", "|---|---:|---:|---:|---:|"] +
                             [f"| {k} | {t['wall']:.2f} | {t['cpu']:.2f} | {t['mcpu']:.2f} | {t['wire'] / 1e6:.1f} |"
                              for k, t in table.items()])
        with open(os.path.join(args.out, "loopback.md"), "w") as fh:
            fh.write(text + "\n")
        print(text)
        return 0
    finally:
        if sshd is not None:
            sshd.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
