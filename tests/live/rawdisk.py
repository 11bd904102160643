"""Tracking tests on a raw loop device, run in a private mount namespace; prints a JSON verdict.

    unshare -m --propagation private python tests/live/rawdisk.py CONFIG_JSON

CONFIG: work, certkey, mode, and optionally size_mib (32), seed.

* ``inflight``: the loop device's backing file lies on an ext4 of its own
  loop device, which is frozen while a writer in another blkio cgroup (so
  that the loop driver serves it on a worker of its own) writes blocks: the
  writes stay in flight across round boundaries while the rounds' reads
  return the old data; then the file system is thawed and the writes
  complete. A tracker marking at queue time would let those rounds send the
  old data and forget the blocks.
* ``overrun``: a tiny ring buffer (SMSREPL_TRACE_BUFFER_KB=16) and the
  sender paused (SIGSTOP) while another process writes thousands of blocks:
  the tracker must report the loss and the next round read the whole disk.

Both end with the cutover and a comparison with the disk read with O_DIRECT.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from lab import Sender, diff_blocks, direct_copy, loop_device, run, start_receiver

HERE = os.path.dirname(os.path.abspath(__file__))


def writer(dev: str, count: int, seed: int, cgroup: str | None = None) -> subprocess.Popen:
    pre = None
    if cgroup is not None:
        def pre():
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as fh:
                fh.write(str(os.getpid()))
    return subprocess.Popen([sys.executable, os.path.join(HERE, "rawwrite.py"), dev, str(count), str(seed)],
                            stdout=subprocess.PIPE, text=True, preexec_fn=pre)


def main() -> int:
    cfg = json.loads(sys.argv[1])
    work, certkey, mode = cfg["work"], cfg["certkey"], cfg["mode"]
    seed = int(cfg.get("seed", 1))
    size = int(cfg.get("size_mib", 32)) << 20
    verdict: dict = {"mode": mode, "seed": seed}
    loops: list[str] = []
    procs: list[subprocess.Popen] = []
    outer = os.path.join(work, "outer")
    mounted = frozen_fs = False
    cgroup = None
    try:
        if mode == "inflight":
            loops.append(loop_device(os.path.join(work, "outer.img"), size + (48 << 20)))
            run("mkfs.ext4", "-q", "-F", loops[0])
            os.makedirs(outer, exist_ok=True)
            run("mount", loops[0], outer)
            mounted = True
            backing = os.path.join(outer, "inner.img")
            cgroup = f"/sys/fs/cgroup/blkio/smsrepl-inflight-{os.getpid()}"
            os.mkdir(cgroup)
        else:
            backing = os.path.join(work, "inner.img")
        dev = loop_device(backing, size)
        loops.append(dev)
        w = writer(dev, 3000, seed)  # something to copy
        w.wait()
        rx, port = start_receiver(work, certkey, os.path.join(work, "target.img"))
        procs.append(rx)
        env = {"SMSREPL_TRACE_BUFFER_KB": "16"} if mode == "overrun" else {}
        tx = Sender(dev, port, certkey, work, "--interval", "0.2", "--tracking", "kernel", env=env)
        procs.append(tx.proc)
        assert tx.wait_rounds(2), "".join(tx.stderr)
        if mode == "inflight":
            run("fsfreeze", "-f", outer)
            frozen_fs = True
            w = writer(dev, 8, seed + 1, cgroup)
            procs.append(w)
            n = len(tx.rounds)
            verdict["rounds_while_in_flight"] = tx.wait_rounds(n + 3) and len(tx.rounds) - n
            verdict["writer_done_while_frozen"] = w.poll() is not None
            run("fsfreeze", "-u", outer)
            frozen_fs = False
            w.wait(60)
        else:
            os.kill(tx.proc.pid, signal.SIGSTOP)
            w = writer(dev, 6000, seed + 1)
            procs.append(w)
            w.wait(120)
            st = open(os.path.join("/sys/kernel/tracing/instances", next(
                n for n in os.listdir("/sys/kernel/tracing/instances") if n.startswith(f"smsrepl-{tx.proc.pid}-")),
                "per_cpu", "cpu0", "stats")).read()
            verdict["cpu0_stats"] = st.replace("\n", "; ")
            os.kill(tx.proc.pid, signal.SIGCONT)
        n = len(tx.rounds)
        tx.wait_rounds(n + 3)
        tx.proc.send_signal(signal.SIGTERM)
        verdict["sender_rc"] = tx.finish()
        snap = os.path.join(work, "source.img")
        direct_copy(dev, snap)
        rx.terminate()
        rx.wait(30)
        verdict["different_blocks"] = diff_blocks(snap, os.path.join(work, "target.img"))
        verdict["rounds"] = len(tx.rounds)
        verdict["whole_reasons"] = [r.get("whole_source_because") for r in tx.rounds if r.get("whole_source_because")]
        verdict["map_rounds"] = sum(r["dirty_blocks"] is not None for r in tx.rounds)
        verdict["stderr"] = "".join(tx.stderr)[-2000:]
        verdict["identical"] = verdict["different_blocks"] == 0 and verdict["sender_rc"] == 0
    finally:
        for p in procs:
            if p.poll() is None:
                if p.returncode is None:
                    try:
                        os.kill(p.pid, signal.SIGCONT)
                    except OSError:
                        pass
                p.kill()
                p.wait()
        if frozen_fs:
            run("fsfreeze", "-u", outer, check=False)
        for dev in reversed(loops[1:]):
            run("losetup", "-d", dev, check=False)
        if mounted:
            run("umount", outer, check=False)
        if loops:
            run("losetup", "-d", loops[0], check=False)
        if cgroup is not None:
            try:
                os.rmdir(cgroup)
            except OSError:
                pass
    print(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
