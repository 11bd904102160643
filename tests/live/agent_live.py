"""The reference agent migrating a mounted ext4 under a workload; prints a JSON verdict.

    unshare -m --propagation private python tests/live/agent_live.py CONFIG_JSON

CONFIG: work, and optionally seconds (3) and seed. The operator freezes the file
system (fsfreeze -f) before asking for the cutover, as the README says.
A syncing MIGRATE_BLOCK task in the fake control plane, a receiver on loopback,
the agent with kernel tracking: START, rounds while the workload writes, then
the cutover; the verdict compares the target with the disk read with O_DIRECT,
fsck's it and carries the consistency result and the last report's trace.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from lab import diff_blocks, direct_copy, loop_device, release, run

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = "live-agent-token-0123456789"


def main() -> int:
    from smsrepl.agent.client import ControlPlane
    from smsrepl.lab.fakecp import FakeControlPlane
    from smsrepl.agent.loop import Agent
    from smsrepl.lab.certs import make_bundle
    from smsrepl.transport.receiver import Receiver
    from smsrepl.transport.tls import server_context

    cfg = json.loads(sys.argv[1])
    work = cfg["work"]
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    verdict: dict = {}
    dev = loop_device(os.path.join(work, "source.img"), 64 << 20)
    mounted = frozen = False
    fake = rx = wl = None
    try:
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
        run("mount", dev, mnt)
        mounted = True
        bundle = make_bundle()
        target = os.path.join(work, "target.img")
        rx = Receiver({"vda": target}, server_context(bundle), os.path.join(work, "rx"), create=True)
        _, port = rx.start("127.0.0.1", 0)
        fake = FakeControlPlane(TOKEN, os.path.join(work, "cp"))
        url = fake.start()
        fake.add_task("t", {"id": "t", "name": "live", "type": "MIGRATE_BLOCK", "os_type": "LINUX",
                            "migration_ip": "127.0.0.1", "syncing": True, "is_need_consistency_check": True,
                            "target_server": {"disks": [{"name": "/dev/vda", "size": 1 << 30}]}},
                      certkey=json.loads(bundle.to_json()), speed_limit={"speed_limit": []},
                      configuration={"task_id": "t", "configurations": []})
        cp = ControlPlane(url, TOKEN, verify=fake.ca_file, retries=1, backoff=0.1, max_backoff=0.5, timeout=(2, 5))
        agent = Agent(cp, "src", {"/dev/vda": dev}, os.path.join(work, "agent"), data_port=port,
                      poll_interval=0.1, sync_interval=0.3, speed_poll=1, netcheck_seconds=0.2,
                      tracking="kernel")
        wl = subprocess.Popen([sys.executable, os.path.join(HERE, "workload.py"), mnt, str(cfg.get("seed", 1))],
                              stdout=subprocess.PIPE, text=True)
        t = threading.Thread(target=agent.run, daemon=True)
        t.start()
        fake.push_command("src", "START", "t")
        end = time.monotonic() + 120
        while not agent.copied and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(float(cfg.get("seconds", 3)))
        wl.send_signal(signal.SIGTERM)
        verdict["workload_ops"] = int(wl.communicate(timeout=60)[0].strip() or 0)
        run("fsfreeze", "-f", mnt)
        frozen = True
        agent.request_cutover()
        t.join(180)
        verdict["finished"] = agent.finished
        verdict["rounds"] = len(agent._rounds)
        verdict["map_rounds"] = sum(r.dirty_blocks is not None for r in agent._rounds)
        snap = os.path.join(work, "snap.img")
        direct_copy(dev, snap)  # still frozen: the disk as the cutover saw it
        run("fsfreeze", "-u", mnt)
        frozen = False
        rx.stop()
        rx = None
        verdict["different_blocks"] = diff_blocks(snap, target)
        fsck = run("e2fsck", "-fn", target, check=False)
        verdict["fsck_rc"] = fsck.returncode
        [result] = fake.bodies("consistency_result") or [None]
        verdict["consistency"] = result
        traces = [b["process_trace"] for b in fake.bodies("progress")]
        verdict["last_trace"] = traces[-1] if traces else ""
        verdict["violations"] = fake.violations
    finally:
        if wl is not None and wl.poll() is None:
            wl.kill()
        if rx is not None:
            rx.stop()
        if fake is not None:
            fake.stop()
        release(mnt, dev, frozen=frozen, mounted=mounted)
    print(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
