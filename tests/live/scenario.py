"""One live migration of a mounted ext4, run in a private mount namespace; prints a JSON verdict.

    unshare -m --propagation private python tests/live/scenario.py CONFIG_JSON

CONFIG: work (a directory of the test's), certkey, and optionally size_mib
(64), gpt (replicate partition 2 of a GPT disk), tracking (kernel|scan),
cutover (operator: fsfreeze -f, then SIGTERM | freeze: send --freeze | sync:
applications stopped, smsrepl only syncs), seconds of workload (4), interval
(0.3), seed, rate (workload operations/s), faults (SMSREPL_FAULTS of the
first sender), rx_faults (of the first receiver: one killed by them is
started again on the same port, and the sender's next round goes on against
it), extra (more send flags), zram (a bio-based zram disk instead of a loop
device).

A loop device over an image in WORK (partitioned with sgdisk and partx when
gpt) gets an ext4 that a workload process writes while ``send block
--continuous`` replicates it to a receiver's image file; then the cutover.
The verdict compares what the receiver wrote with the source as its disk
holds it (read with dd iflag=direct while the file system is frozen),
fsck's the copy (e2fsck -fn; after a journal replay when only synced), and
compares every file's sha256 with the copy mounted read-only.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from lab import Sender, direct_copy, frozen, judge_copy, loop_device, run, sha_tree, start_receiver, stopped

HERE = os.path.dirname(os.path.abspath(__file__))


class Disk:
    def __init__(self, work: str, size_mib: int, gpt: bool, zram: bool) -> None:
        self.loop = self.zram = None
        if zram:
            n = open("/sys/class/zram-control/hot_add").read().strip()
            self.zram = n
            with open(f"/sys/block/zram{n}/disksize", "w") as fh:
                fh.write(f"{size_mib}M")
            self.whole = self.dev = f"/dev/zram{n}"
            return
        self.loop = self.whole = loop_device(os.path.join(work, "source.img"), size_mib << 20)
        self.dev = self.loop
        if gpt:
            run("sgdisk", "-o", "-n", "1:2048:+8M", "-n", f"2:0:+{size_mib - 12}M", self.loop)
            run("partx", "-a", self.loop)
            self.dev = self.loop + "p2"
            for _ in range(100):
                if os.path.exists(self.dev):
                    break
                time.sleep(0.05)

    def close(self) -> None:
        if self.loop:
            run("partx", "-d", self.loop, check=False)
            run("losetup", "-d", self.loop, check=False)
        if self.zram:
            with open("/sys/class/zram-control/hot_remove", "w") as fh:
                fh.write(self.zram)


def main() -> int:
    cfg = json.loads(sys.argv[1])
    work = cfg["work"]
    certkey = cfg["certkey"]
    tracking = cfg.get("tracking", "kernel")
    cutover = cfg.get("cutover", "operator")
    seconds = float(cfg.get("seconds", 4))
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    verdict: dict = {"config": {k: v for k, v in cfg.items() if k not in ("work", "certkey")}}
    procs: list[subprocess.Popen] = []
    disk = Disk(work, int(cfg.get("size_mib", 64)), bool(cfg.get("gpt")), bool(cfg.get("zram")))
    mounted = False
    try:
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", disk.dev)
        run("mount", "-o", "discard" if cfg.get("discard") else "defaults", disk.dev, mnt)
        mounted = True
        # a base of files before the first copy
        run(sys.executable, "-c", "import os,sys;r=sys.argv[1];[open(os.path.join(r,'base%d'%i),'wb').write(os.urandom(300000)) for i in range(20)]", mnt)

        target = os.path.join(work, "target.img")
        rx, port = start_receiver(work, certkey, target, faults=cfg.get("rx_faults", ""))
        procs.append(rx)
        wl = subprocess.Popen([sys.executable, os.path.join(HERE, "workload.py"), mnt, str(cfg.get("seed", 1)),
                               str(cfg.get("rate", 400))], stdout=subprocess.PIPE, text=True)
        procs.append(wl)
        flags = ["--interval", str(cfg.get("interval", 0.3)), "--tracking", tracking,
                 *(["--freeze"] if cutover == "freeze" else []), *cfg.get("extra", [])]

        def start_sender(faults: str = "") -> Sender:
            if cutover == "freeze":  # it pauses while frozen, for a look at the disk it copied
                faults = ",".join(filter(None, (faults, "stop@cutover.before_thaw")))
            tx = Sender(disk.dev, port, certkey, work, *flags, faults=faults)
            procs.append(tx.proc)
            return tx

        tx = start_sender(cfg.get("faults", ""))
        if cfg.get("rx_faults"):
            # the receiver dies at its fault, mid-round; one started again on the same port
            # recovers the cut round from its state, and the sender's retry goes on against it
            verdict["rx_killed_rc"] = rx.wait(120)
            rounds_before = len(tx.rounds)
            rx, _ = start_receiver(work, certkey, target, port=port)
            procs.append(rx)
            verdict["rounds_after_rx_restart"] = tx.wait_rounds(rounds_before + 2)
        if cfg.get("faults") or cfg.get("kill_after") is not None:
            # a sender killed (by its fault, by SIGKILL at a time, or at its cutover):
            # the next one resumes from the receiver's checkpoint
            if cfg.get("kill_after") is not None:
                time.sleep(cfg["kill_after"])
                tx.kill()
            elif cfg.get("kill_at_cutover"):
                time.sleep(seconds / 2)
                tx.proc.send_signal(signal.SIGTERM)
            verdict["killed_rc"] = tx.finish(120)
            killed = tx.proc.pid
            deadline = time.monotonic() + 5  # the guard thaws once it sees its sender gone
            while frozen(mnt) and time.monotonic() < deadline:
                time.sleep(0.05)
            verdict["frozen_after_kill"] = frozen(mnt)
            tx = start_sender()
            tx.wait_rounds(1)
            # once the next tracker runs, the killed one's instance is gone
            inst = "/sys/kernel/tracing/instances"
            verdict["instances_of_killed"] = [n for n in os.listdir(inst) if n.startswith(f"smsrepl-{killed}-")] \
                if os.path.isdir(inst) else []
        time.sleep(seconds)
        wl.send_signal(signal.SIGTERM)
        verdict["workload_ops"] = int(wl.communicate(timeout=60)[0].strip() or 0)
        snap = os.path.join(work, "source-at-cutover.img")
        if cutover == "operator":
            run("fsfreeze", "-f", mnt)
            tx.proc.send_signal(signal.SIGTERM)
            verdict["sender_rc"] = tx.finish()
            direct_copy(disk.dev, snap)
            verdict["source_files"] = sha_tree(mnt)
            run("fsfreeze", "-u", mnt)
        elif cutover == "freeze":
            tx.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 180
            while not stopped(tx.proc.pid) and tx.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            verdict["frozen_during_cutover"] = frozen(mnt)
            direct_copy(disk.dev, snap)
            verdict["source_files"] = sha_tree(mnt)
            tx.proc.send_signal(signal.SIGCONT)
            verdict["sender_rc"] = tx.finish()
            verdict["frozen_after_cutover"] = frozen(mnt)
        else:
            tx.proc.send_signal(signal.SIGTERM)
            verdict["sender_rc"] = tx.finish()
            direct_copy(disk.dev, snap)
            verdict["source_files"] = sha_tree(mnt)
        verdict["sender_stderr"] = "".join(tx.stderr)[-3000:]
        rounds = tx.rounds
        verdict["rounds"] = len(rounds)
        verdict["round_dirty_blocks"] = [r["dirty_blocks"] for r in rounds]
        verdict["whole_source_rounds"] = sum(r["dirty_blocks"] is None for r in rounds)
        verdict["map_rounds"] = sum(r["dirty_blocks"] is not None for r in rounds)
        verdict["last_round"] = rounds[-1] if rounds else None
        verdict["whole_reasons"] = sorted({r.get("whole_source_because", "") for r in rounds} - {""})
        rx.terminate()
        rx.wait(30)
        run("umount", mnt)
        mounted = False

        # only synced: the copy's journal is replayed first
        verdict.update(judge_copy(snap, target, verdict.pop("source_files"), mnt, replay_journal=cutover == "sync"))
        os.unlink(snap)
        verdict["identical"] = (verdict["different_blocks"] == 0 and verdict["fsck_rc"] == 0
                                and not verdict["files_differ"] and verdict["sender_rc"] == 0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if mounted:
            run("fsfreeze", "-u", mnt, check=False)
            run("umount", "-l", mnt, check=False)
        disk.close()
    print(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
