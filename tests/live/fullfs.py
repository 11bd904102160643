"""Full target disks against one receiver, run in a private mount namespace; prints a JSON verdict.

    unshare -m --propagation private python tests/live/fullfs.py CONFIG_JSON

CONFIG: work (a directory of the test's), certkey, fs (ext4: a loop-mounted
ext4, whose block targets are written with O_DIRECT | tmpfs), runs (2), seed.

One ``smsrepl receive --root`` serves a small file system for every run.
Each run fills that file system with a ballast file but for a few MiB, sends
a file tree (target treeN) and a disk image (target diskN), both larger than
what is left, and expects exit 3 with "No space left on device" on one line;
then deletes the ballast and sends both again to the same receiver, which must
complete them identical, with no temporaries left in the tree. A receiver that
kept a failed session's target claimed answered the reruns "busy".
"""
from __future__ import annotations

import filecmp
import json
import os
import random
import re
import subprocess
import sys

from lab import CLI, run, sha_tree

TEMP = re.compile(r"^\.smsrepl~[0-9a-f]{16}~")
FS_MIB = 96
LEFT_MIB = 4


def fill(mnt: str) -> str:
    """A ballast file that leaves about LEFT_MIB free."""
    ballast = os.path.join(mnt, "ballast")
    st = os.statvfs(mnt)
    size = max(0, st.f_bavail * st.f_frsize - (LEFT_MIB << 20))
    with open(ballast, "wb") as fh:
        chunk = b"\xa5" * (1 << 20)
        for _ in range(size >> 20):
            fh.write(chunk)
    return ballast


def send(kind: str, source: str, target: str, port: int, certkey: str, work: str) -> subprocess.CompletedProcess:
    args = CLI + ["send", kind, "--json", source, "--to", f"127.0.0.1:{port}", "--target", target, "--certkey", certkey,
                  "--level", "0"]
    if kind == "block":
        args += ["--state-dir", os.path.join(work, "tx-" + target)]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def main() -> int:
    cfg = json.loads(sys.argv[1])
    work, certkey, fs = cfg["work"], cfg["certkey"], cfg.get("fs", "ext4")
    rnd = random.Random(cfg.get("seed", 1))
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt)
    loop = None
    if fs == "ext4":
        img = os.path.join(work, "fs.img")
        with open(img, "wb") as fh:
            fh.truncate(FS_MIB << 20)
        loop = run("losetup", "-f", "--show", img).stdout.strip()
        run("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop)
        run("mount", loop, mnt)
    else:
        run("mount", "-t", "tmpfs", "-o", f"size={FS_MIB}m", "tmpfs", mnt)
    root = os.path.join(mnt, "targets")
    os.makedirs(root)
    tree, image = os.path.join(work, "tree"), os.path.join(work, "disk.img")
    os.makedirs(tree)
    rx = subprocess.Popen(CLI + ["receive", "--listen", "127.0.0.1:0", "--certkey", certkey, "--state-dir",
                                 os.path.join(work, "rx"), "--root", root], stderr=subprocess.PIPE, text=True)
    verdict: dict = {"fs": fs, "runs": []}
    try:
        port = int(re.search(r"listening on [\d.]+:(\d+)", rx.stderr.readline()).group(1))
        for i in range(cfg.get("runs", 2)):
            # new content each run: all of it has to go again
            for n in range(24):
                with open(os.path.join(tree, f"f{n:02}"), "wb") as fh:
                    fh.write(rnd.randbytes(rnd.randint(256 << 10, 1536 << 10)))
            with open(image, "wb") as fh:
                fh.write(rnd.randbytes(24 << 20))
            ballast = fill(mnt)
            got = {"run": i}
            for kind, source, target in (("files", tree, f"tree{i}"), ("block", image, f"disk{i}")):
                full = send(kind, source, target, port, certkey, work)
                got[f"{kind}_full_rc"] = full.returncode
                got[f"{kind}_full_stderr"] = full.stderr.strip()
            os.unlink(ballast)
            for kind, source, target in (("files", tree, f"tree{i}"), ("block", image, f"disk{i}")):
                again = send(kind, source, target, port, certkey, work)
                got[f"{kind}_rerun_rc"] = again.returncode
                got[f"{kind}_rerun_stderr"] = again.stderr.strip()[-500:]
            dst_tree = os.path.join(root, f"tree{i}")
            got["tree_identical"] = os.path.isdir(dst_tree) and sha_tree(tree) == sha_tree(dst_tree)
            got["temporaries"] = [n for n in os.listdir(dst_tree) if TEMP.match(n)] if os.path.isdir(dst_tree) else []
            got["disk_identical"] = filecmp.cmp(image, os.path.join(root, f"disk{i}"), shallow=False) \
                if os.path.exists(os.path.join(root, f"disk{i}")) else False
            verdict["runs"].append(got)
            # room for the next run
            run("rm", "-rf", dst_tree, os.path.join(root, f"disk{i}"))
        verdict["receiver_alive"] = rx.poll() is None
    finally:
        rx.terminate()
        try:
            _, err = rx.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            rx.kill()
            _, err = rx.communicate()
        verdict["receiver_tracebacks"] = err.count("Traceback")
        verdict["receiver_log"] = err.splitlines()[-40:]  # for a failed run's message
        run("umount", "-l", mnt, check=False)
        if loop:
            run("losetup", "-d", loop, check=False)
    print(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
