"""One-shot rounds of a mounted ext4, run in a private mount namespace; prints a JSON verdict.

    unshare -m --propagation private python tests/live/oneshot.py CONFIG_JSON

CONFIG: work (a directory of the test's), certkey, and optionally source ("device", or "image":
the rounds send the loop device's image file, not the device), size_mib (128), rounds
(sync rounds while the workload writes, 4), seed, rate (workload operations/s), extra (more
send flags), and end:

* "operator" (the default): the workload stops, the operator freezes the file system
  (fsfreeze -f) and a last one-shot round runs;
* "freeze": the last round is ``send block --freeze`` while the workload still writes; the
  sender stops itself (stop@oneshot.before_thaw) once the receiver made the round durable,
  for a look at the disk it froze; ``hold`` seconds (0) on the first look outlast its
  ``freeze_timeout`` (--freeze-timeout), so that round runs again under a new freeze (with
  ``hold_all``, on every look: the command gives up, and the verdict says how);
* "state_on_source": one ``send block --freeze`` whose state directory is on the file system it
  would freeze (refused; its exit code, stderr, the freeze and the target in the verdict);
* "recent": no workload and no sync rounds: files written a moment before, never synced, and
  one one-shot copy of the still-mounted file system; then one more file, never synced, and
  ``verify block`` of the device against the receiver (its exit code and stderr in the verdict).

A loop device over an image in WORK gets an ext4 that a workload process writes, while
``send block`` runs one round after the other (no --continuous: each run a process of its
own, its sync round a digest scan of the whole device, no tracker). The verdict compares what
the receiver wrote with the device as its disk holds it (dd iflag=direct, while frozen), fsck's
the copy and compares every file's sha256 with the copy mounted read-only.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from lab import CLI, direct_copy, frozen, judge_copy, loop_device, release, run, sha_tree, start_receiver, stopped

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    cfg = json.loads(sys.argv[1])
    work, certkey = cfg["work"], cfg["certkey"]
    end = cfg.get("end", "operator")
    mnt = os.path.join(work, "mnt")
    snap = os.path.join(work, "source-at-end.img")
    os.makedirs(mnt, exist_ok=True)
    verdict: dict = {"config": {k: v for k, v in cfg.items() if k not in ("work", "certkey")}}
    procs: list[subprocess.Popen] = []
    dev = loop_device(os.path.join(work, "source.img"), int(cfg.get("size_mib", 128)) << 20)
    mounted = is_frozen = False
    stderr: list[str] = []
    src: dict[str, str] = {}
    try:
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
        run("mount", dev, mnt)
        mounted = True
        run(sys.executable, "-c", "import os,sys;r=sys.argv[1];[open(os.path.join(r,'base%d'%i),'wb').write(os.urandom(300000)) for i in range(20)]", mnt)
        target = os.path.join(work, "target.img")
        rx, port = start_receiver(work, certkey, target)
        procs.append(rx)

        def look(proc: subprocess.Popen) -> None:
            """Each time the sender stops before its thaw: the disk as it is frozen; the first
            time held for ``hold`` seconds."""
            looks = 0
            while proc.poll() is None:
                if not stopped(proc.pid):
                    time.sleep(0.01)
                    continue
                looks += 1
                verdict["frozen_during_round"] = frozen(mnt)
                direct_copy(dev, snap)
                src.clear()
                src.update(sha_tree(mnt))
                if looks == 1 or cfg.get("hold_all"):
                    time.sleep(float(cfg.get("hold", 0)))
                proc.send_signal(signal.SIGCONT)
            verdict["looks"] = looks

        def one_round(*flags: str, stop_before_thaw: bool = False, may_fail: bool = False) -> dict:
            env = {**os.environ, "SMSREPL_FAULTS": "stop@oneshot.before_thaw" if stop_before_thaw else ""}
            source = os.path.join(work, "source.img") if cfg.get("source") == "image" else dev
            proc = subprocess.Popen(CLI + ["-v", "send", "block", "--json", source, "--to", f"127.0.0.1:{port}",
                                           "--target", "disk0", "--certkey", certkey,
                                           "--state-dir", os.path.join(work, "tx"), *flags, *cfg.get("extra", [])],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            procs.append(proc)
            if stop_before_thaw:
                look(proc)
            out, err = proc.communicate(timeout=300)
            stderr.append(err)
            verdict["last_rc"] = proc.returncode
            if proc.returncode:
                if may_fail:
                    return {"kind": f"exit {proc.returncode}"}
                raise RuntimeError(f"send block: exit {proc.returncode}: {err[-2000:]}")
            return json.loads(out.strip().splitlines()[-1])

        if end == "state_on_source":
            cp = run(*CLI, "send", "block", dev, "--to", f"127.0.0.1:{port}", "--target", "disk0", "--certkey",
                     certkey, "--state-dir", os.path.join(mnt, "state"), "--freeze", check=False)
            verdict.update(rc=cp.returncode, stderr=cp.stderr[-2000:], frozen_after=frozen(mnt),
                           target_made=os.path.exists(target))
            print(json.dumps(verdict))
            return 0
        if end == "recent":
            # written a moment ago and not synced: in the page cache, not yet on the disk
            run(sys.executable, "-c", "import os,sys;r=sys.argv[1];[open(os.path.join(r,'recent%d'%i),'wb').write(os.urandom(1<<20)) for i in range(8)]", mnt)
            src = sha_tree(mnt)
            rounds = [one_round()]
            direct_copy(dev, snap)
            verdict["workload_ops"] = 0
            run(sys.executable, "-c", "import os,sys;open(os.path.join(sys.argv[1],'later'),'wb').write(os.urandom(1<<20))", mnt)
            check = run(*CLI, "verify", "block", dev, "--to", f"127.0.0.1:{port}", "--target", "disk0",
                        "--certkey", certkey, check=False)
            verdict["verify_rc"], verdict["verify_stderr"] = check.returncode, check.stderr[-2000:]
        else:
            rounds = [one_round()]  # the full copy, before the workload
            wl = subprocess.Popen([sys.executable, os.path.join(HERE, "workload.py"), mnt, str(cfg.get("seed", 1)),
                                   str(cfg.get("rate", 400))], stdout=subprocess.PIPE, text=True)
            procs.append(wl)
            for _ in range(int(cfg.get("rounds", 4))):
                rounds.append(one_round())
            if end == "freeze":
                timeout = ["--freeze-timeout", str(cfg["freeze_timeout"])] if "freeze_timeout" in cfg else []
                rounds.append(one_round("--freeze", *timeout, stop_before_thaw=True, may_fail=bool(cfg.get("hold_all"))))
                verdict["frozen_after_round"] = frozen(mnt)
            wl.send_signal(signal.SIGTERM)
            verdict["workload_ops"] = int(wl.communicate(timeout=60)[0].strip() or 0)
            if end == "operator":
                run("fsfreeze", "-f", mnt)
                is_frozen = True
                rounds.append(one_round())
                direct_copy(dev, snap)
                src = sha_tree(mnt)
                run("fsfreeze", "-u", mnt)
                is_frozen = False
        verdict["kinds"] = [r["kind"] for r in rounds]
        verdict["last_round"] = rounds[-1]
        verdict["sender_stderr"] = stderr[-1][-2000:]
        rx.terminate()
        rx.wait(30)
        run("umount", mnt)
        mounted = False
        # only synced ("recent"): the copy's journal is replayed first, as its first mount would
        verdict.update(judge_copy(snap, target, src, mnt, replay_journal=end == "recent"))
        os.unlink(snap)
        verdict["identical"] = verdict["different_blocks"] == 0 and verdict["fsck_rc"] == 0 and not verdict["files_differ"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        release(mnt, dev, frozen=is_frozen, mounted=mounted)
    print(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
