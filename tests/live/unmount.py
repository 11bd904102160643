"""A continuous file sender whose source file system is unmounted under it; prints a JSON verdict.

    unshare -m --propagation private python tests/live/unmount.py CONFIG_JSON

CONFIG: work (a directory of the test's), certkey, journal (off | auto).

A loop-mounted ext4 holds the source tree. ``send files --continuous`` copies it,
then follows a rename of the directory that holds most of the tree (more than half
of the target's names go: the tree moved, it did not collapse). Then the file
system is unmounted (a plain umount: the sender must not hold it busy) and leaves
its empty mount point: the next round (asked for with SIGUSR1) must stop the
sender, exit 2, with the target as the last round left it (a change journal sees
the mount table change and walks the whole tree). Where it did not, the verdict
says so and the cutover round (SIGTERM) is asked for.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading

from lab import CLI, Continuous, loop_device, run, sha_tree


def populate(root: str) -> None:
    for d, n in (("spool", 120), ("etc", 40)):
        os.makedirs(os.path.join(root, "data", d))
        for i in range(n):
            with open(os.path.join(root, "data", d, f"f{i:03d}"), "wb") as fh:
                fh.write(os.urandom(512 + 37 * i))


def main() -> int:
    cfg = json.loads(sys.argv[1])
    work, certkey, journal = cfg["work"], cfg["certkey"], cfg.get("journal", "off")
    src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
    os.makedirs(src)
    dev = loop_device(os.path.join(work, "fs.img"), 64 << 20)
    verdict: dict = {"journal": journal}
    rx = snd = None
    mounted = False
    try:
        run("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
        run("mount", dev, src)
        mounted = True
        populate(src)
        rx = subprocess.Popen(CLI + ["receive", "--listen", "127.0.0.1:0", "--certkey", certkey, "--state-dir",
                                     os.path.join(work, "rx"), "--create", "--target", f"t={dst}"],
                              stderr=subprocess.PIPE, text=True)
        port = int(re.search(r"listening on [\d.]+:(\d+)", rx.stderr.readline()).group(1))
        threading.Thread(target=rx.stderr.read, daemon=True).start()
        snd = Continuous(CLI + ["send", "files", "--json", src, "--to", f"127.0.0.1:{port}", "--target", "t",
                                "--certkey", certkey, "--continuous", "--interval", "3600", "--journal", journal])
        snd.wait_rounds(1)
        verdict["first"] = snd.rounds[0] if snd.rounds else None
        # the directory holding most of the tree moves: 121 of the target's 164 names go
        os.rename(os.path.join(src, "data", "spool"), os.path.join(src, "data", "spool.1"))
        verdict["moved"] = snd.round_now()
        verdict["identical_after_move"] = sha_tree(dst) == sha_tree(src)
        kept = sha_tree(dst)
        verdict["kept_files"] = len(kept)
        run("umount", src)
        mounted = False
        verdict["after_unmount"] = snd.round_now(timeout=30)
        verdict["cutover_needed"] = snd.proc.poll() is None
        if verdict["cutover_needed"]:
            snd.proc.send_signal(signal.SIGTERM)
        verdict["sender_rc"] = snd.finish()
        verdict["sender_stderr"] = "".join(snd.stderr)
        verdict["target_kept"] = sha_tree(dst) == kept and os.path.isdir(os.path.join(dst, "data", "spool.1"))
    finally:
        if snd is not None and snd.proc.poll() is None:
            snd.proc.kill()
        if rx is not None:
            rx.terminate()
            rx.wait(30)
        if mounted:
            run("umount", "-l", src, check=False)
        run("losetup", "-d", dev, check=False)
    print(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
