"""One-shot rounds of a mounted ext4 under a workload, run in a private mount namespace; prints a JSON verdict.

    unshare -m --propagation private python tests/live/oneshot.py CONFIG_JSON

CONFIG: work (a directory of the test's), certkey, and optionally size_mib (128), rounds
(sync rounds while the workload writes, 4), seed, rate (workload operations/s), extra (more
send flags).

A loop device over an image in WORK gets an ext4 that a workload process writes, while
``send block`` runs one round after the other (no --continuous: each run a process of its
own, its sync round a digest scan of the whole device, no tracker); then the workload stops,
the file system is frozen and a last one-shot round runs. The verdict compares what
the receiver wrote with the device as its disk holds it (dd iflag=direct, still frozen),
fsck's the copy and compares every file's sha256 with the copy mounted read-only.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from lab import CLI, direct_copy, judge_copy, loop_device, release, run, sha_tree, start_receiver

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    cfg = json.loads(sys.argv[1])
    work, certkey = cfg["work"], cfg["certkey"]
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    verdict: dict = {"config": {k: v for k, v in cfg.items() if k not in ("work", "certkey")}}
    procs: list[subprocess.Popen] = []
    dev = loop_device(os.path.join(work, "source.img"), int(cfg.get("size_mib", 128)) << 20)
    mounted = frozen = False
    stderr: list[str] = []
    try:
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
        run("mount", dev, mnt)
        mounted = True
        run(sys.executable, "-c", "import os,sys;r=sys.argv[1];[open(os.path.join(r,'base%d'%i),'wb').write(os.urandom(300000)) for i in range(20)]", mnt)
        target = os.path.join(work, "target.img")
        rx, port = start_receiver(work, certkey, target)
        procs.append(rx)

        def one_round() -> dict:
            cp = subprocess.run(CLI + ["-v", "send", "block", "--json", dev, "--to", f"127.0.0.1:{port}",
                                       "--target", "disk0", "--certkey", certkey,
                                       "--state-dir", os.path.join(work, "tx"), *cfg.get("extra", [])],
                                capture_output=True, text=True, timeout=300)
            stderr.append(cp.stderr)
            if cp.returncode:
                raise RuntimeError(f"send block: exit {cp.returncode}: {cp.stderr[-2000:]}")
            return json.loads(cp.stdout.strip().splitlines()[-1])

        rounds = [one_round()]  # the full copy, before the workload
        wl = subprocess.Popen([sys.executable, os.path.join(HERE, "workload.py"), mnt, str(cfg.get("seed", 1)),
                               str(cfg.get("rate", 400))], stdout=subprocess.PIPE, text=True)
        procs.append(wl)
        for _ in range(int(cfg.get("rounds", 4))):
            rounds.append(one_round())
        wl.send_signal(signal.SIGTERM)
        verdict["workload_ops"] = int(wl.communicate(timeout=60)[0].strip() or 0)
        run("fsfreeze", "-f", mnt)
        frozen = True
        rounds.append(one_round())
        snap = os.path.join(work, "source-at-end.img")
        direct_copy(dev, snap)
        src = sha_tree(mnt)
        run("fsfreeze", "-u", mnt)
        frozen = False
        verdict["kinds"] = [r["kind"] for r in rounds]
        verdict["sender_stderr"] = stderr[-1][-2000:]
        rx.terminate()
        rx.wait(30)
        run("umount", mnt)
        mounted = False
        verdict.update(judge_copy(snap, target, src, mnt))
        os.unlink(snap)
        verdict["identical"] = verdict["different_blocks"] == 0 and verdict["fsck_rc"] == 0 and not verdict["files_differ"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        release(mnt, dev, frozen=frozen, mounted=mounted)
    print(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
