"""`smsrepl demo`: the whole loop on this machine with nothing prepared.

A fake control plane (API v3, every body checked against the reference's
field tables), a receiver on loopback, the reference agent driving a
generated two-disk server through a full copy, a change, a sync round, the
cutover round and the consistency check; then a file tree copied and
verified; and at the end, what the control plane received.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time


def _say(msg: str) -> None:
    print(msg, flush=True)


def _wait(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError(f"demo: timed out waiting for {what}")
        time.sleep(0.05)


def run_demo(*, size_mib: int = 64, keep: bool = False) -> int:
    from smsrepl.agent.client import ControlPlane
    from smsrepl.lab.fakecp import FakeControlPlane
    from smsrepl.agent.loop import Agent
    from smsrepl.lab.certs import make_bundle
    from smsrepl.control.consistency import consistent as no_differences
    from smsrepl.files.compare import compare_with_listing
    from smsrepl.lab.testdata import rewrite_random_blocks, write_image
    from smsrepl.transport.file_sender import FileSender
    from smsrepl.transport.receiver import Receiver
    from smsrepl.transport.tls import client_context, server_context
    from smsrepl.blocks.imagecompare import compare_block_images

    work = tempfile.mkdtemp(prefix="smsrepl-demo-")
    cp = rx = None
    try:
        _say(f"working directory: {work}")
        bundle = make_bundle()
        _say("1. certificates: a fresh CA, source and target certificates (the 5.7.1 certkey shape)")

        token = "demo-token"
        cp = FakeControlPlane(token, f"{work}/control-plane")
        url = cp.start()
        _say(f"2. fake control plane (API v3) at {url}")

        disks = {"/dev/vda": (f"{work}/vda.img", size_mib), "/dev/vdb": (f"{work}/vdb.img", max(8, size_mib // 2))}
        for i, (name, (path, mib)) in enumerate(disks.items()):
            mix = write_image(path, mib << 20, seed=7 + i)
            _say(f"3. source disk {name}: {mib} MiB image ({', '.join(f'{k} {v >> 20} MiB' for k, v in mix.items())})")

        targets = {"vda": f"{work}/target-vda.img", "vdb": f"{work}/target-vdb.img", "tree": f"{work}/target-tree"}
        rx = Receiver(targets, server_context(bundle), f"{work}/receiver-state", create=True)
        host, port = rx.start("127.0.0.1", 0)
        _say(f"4. receiver on {host}:{port} (mutual TLS 1.3): vda, vdb -> images, tree -> a directory")

        cp.add_task("demo-task", {"id": "demo-task", "name": "demo", "type": "MIGRATE_BLOCK", "os_type": "LINUX",
                                  "migration_ip": host, "syncing": True, "is_need_consistency_check": True,
                                  "target_server": {"disks": [{"name": n} for n in disks]}},
                    certkey=json.loads(bundle.to_json()),
                    speed_limit={"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 0,
                                                  "over_speed_threshold": 50.0}]})
        agent = Agent(ControlPlane(url, token, verify=cp.ca_file, retries=2, backoff=0.2), "demo-source",
                      {n: p for n, (p, _) in disks.items()}, f"{work}/agent-state", data_port=port,
                      poll_interval=0.1, sync_interval=3600, speed_poll=1.0, netcheck_seconds=1.0)
        thread = threading.Thread(target=agent.run, name="agent", daemon=True)
        thread.start()
        cp.push_command("demo-source", "START", "demo-task")
        _wait(lambda: agent.copied, 300, "the full copy")
        full = agent._rounds[-1]
        _say(f"5. START: full copy of both disks, {full.data_bytes >> 20} MiB of data as "
             f"{full.wire_bytes / 2**20:.1f} MiB on the wire in {full.seconds:.2f} s")
        changed = rewrite_random_blocks(disks["/dev/vda"][0], 0.01, seed=int(time.time()))
        _say(f"6. source changed: {changed >> 10} KiB rewritten in random 4 KiB blocks of /dev/vda")
        n = len(agent._rounds)
        cp.push_command("demo-source", "SYNC")
        _wait(lambda: len(agent._rounds) > n, 120, "the sync round")
        r = agent._rounds[-1]
        _say(f"7. SYNC: one round, {r.data_bytes >> 10} KiB of changed blocks, {r.wire_bytes >> 10} KiB on the wire")
        agent.request_cutover()
        thread.join(120)
        r = agent._rounds[-1]
        _say(f"8. cutover round ({r.data_bytes >> 10} KiB), then the consistency check against the receiver")
        consistent = True
        for name, (path, _) in disks.items():
            result, same = compare_block_images(path, targets[name.rsplit("/", 1)[1]])
            consistent &= same
        _say(f"   independent byte comparison of both disks: {'identical' if consistent else 'DIFFERENT'}")

        tree = f"{work}/source-tree"
        _make_tree(tree)
        ctx = client_context(bundle)
        res = FileSender(tree, "tree", (host, port), ctx).run()
        _say(f"9. file tree: {res.stats.files_sent} files copied file by file ({res.summary()['wire_bytes']} "
             "bytes on the wire)")
        check, _ = compare_with_listing(tree, FileSender(tree, "tree", (host, port), ctx).describe_target)
        files_ok = no_differences(check["consistency_result"])
        _say(f"   verified against the receiver: {json.dumps(check['consistency_result'])}")

        _say("10. what the control plane received:")
        _say("    states (5.3.6): " + " -> ".join(f"{b['copystate']}/{b['migrationcycle']}"
                                                  for b in cp.bodies("changestate")))
        progress = cp.bodies("progress")
        _say(f"    progress reports (5.4.8): {len(progress)}, the last: " + json.dumps(progress[-1]))
        _say("    network check (5.9.1): " + json.dumps(cp.bodies("network_check")))
        _say("    command results (5.5.2): " + json.dumps(cp.bodies("command_result")))
        _say("    consistency result (5.4.14): " + json.dumps(cp.bodies("consistency_result")))
        _say(f"    bodies rejected by the field tables: {len(cp.violations)}")
        ok = consistent and files_ok and agent.finished and not cp.violations
        _say("demo finished: targets are identical to the sources" if ok else "demo FAILED")
        return 0 if ok else 1
    finally:
        if rx is not None:
            rx.stop()
        if cp is not None:
            cp.stop()
        if keep:
            _say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _make_tree(root: str) -> None:
    import os
    import random

    rng = random.Random(3)
    for d in range(5):
        os.makedirs(f"{root}/dir{d}/sub", exist_ok=True)
        for f in range(20):
            with open(f"{root}/dir{d}/{'sub/' if f % 2 else ''}file{f}.txt", "wb") as fh:
                fh.write(bytes(rng.choice(b"abcdef \n") for _ in range(rng.randint(100, 5000))))
    os.symlink("dir0/file0.txt", f"{root}/link")
