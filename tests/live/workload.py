"""A server's writes to a mounted file system, until SIGTERM: python workload.py DIR SEED [OPS_PER_S].

Creates files (some fsynced), appends to logs, overwrites in place with
fdatasync, renames, deletes, makes and removes directories, writes through a
shared mmap, runs sqlite transactions, and fstrims the file system now and
then. Prints the number of operations on exit. Only DIR is touched.
"""
from __future__ import annotations

import errno
import mmap
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

stop = False


def _stop(signum, frame):
    global stop
    stop = True


def main() -> int:
    root, seed = sys.argv[1], int(sys.argv[2])
    rate = float(sys.argv[3]) if len(sys.argv) > 3 else 400.0
    signal.signal(signal.SIGTERM, _stop)
    rnd = random.Random(seed)
    work = os.path.join(root, "work")
    os.makedirs(work, exist_ok=True)
    db = sqlite3.connect(os.path.join(root, "app.db"))
    db.execute("create table if not exists t (id integer primary key, v blob)")
    db.commit()
    files: list[str] = []
    ops = 0
    full = False
    last_trim = time.monotonic()
    t0 = time.monotonic()
    while not stop:
        op = rnd.random()
        if ops % 20 == 0:
            st = os.statvfs(root)
            full = st.f_bavail < st.f_blocks * 0.4  # keep room: deletions come first on a full disk
        if full and files and op < 0.73:
            op = 0.70
        try:
            if op < 0.25 or len(files) < 8:
                d = os.path.join(work, f"d{rnd.randrange(8)}")
                os.makedirs(d, exist_ok=True)
                p = os.path.join(d, f"f{ops}-{rnd.randrange(1 << 30)}")
                with open(p, "wb") as fh:
                    fh.write(rnd.randbytes(rnd.choice((700, 4096, 20000, 150000, 1 << 20))))
                    if rnd.random() < 0.5:
                        fh.flush()
                        os.fsync(fh.fileno())
                files.append(p)
            elif op < 0.40:
                with open(os.path.join(root, f"log{rnd.randrange(3)}.txt"), "ab") as fh:
                    fh.write(b"%d %s\n" % (ops, rnd.randbytes(40).hex().encode()))
                    if rnd.random() < 0.3:
                        os.fdatasync(fh.fileno())
            elif op < 0.55:
                p = rnd.choice(files)
                size = os.path.getsize(p)
                with open(p, "r+b") as fh:
                    fh.seek(rnd.randrange(max(1, size)))
                    fh.write(rnd.randbytes(rnd.choice((1, 512, 4096, 9000))))
                    os.fdatasync(fh.fileno())
            elif op < 0.63:
                p = files.pop(rnd.randrange(len(files)))
                q = os.path.join(os.path.dirname(p), f"r{ops}")
                os.rename(p, q)
                files.append(q)
            elif op < 0.73:
                os.unlink(files.pop(rnd.randrange(len(files))))
            elif op < 0.78:
                p = rnd.choice(files)
                size = os.path.getsize(p)
                if size >= 4096:
                    with open(p, "r+b") as fh, mmap.mmap(fh.fileno(), size) as m:
                        at = rnd.randrange(size - 8)
                        m[at:at + 8] = rnd.randbytes(8)
                        if rnd.random() < 0.5:
                            m.flush()
            elif op < 0.93:
                with db:
                    for _ in range(rnd.randrange(1, 20)):
                        db.execute("insert or replace into t (id, v) values (?, ?)",
                                   (rnd.randrange(5000), rnd.randbytes(rnd.randrange(10, 3000))))
                    if rnd.random() < 0.2:
                        db.execute("delete from t where id < ?", (rnd.randrange(500),))
            else:
                d = os.path.join(work, f"tmp{rnd.randrange(4)}")
                if os.path.isdir(d):
                    for name in os.listdir(d):
                        os.unlink(os.path.join(d, name))
                    os.rmdir(d)
                else:
                    os.mkdir(d)
                    with open(os.path.join(d, "x"), "wb") as fh:
                        fh.write(rnd.randbytes(5000))
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            full = True
        ops += 1
        if time.monotonic() - last_trim > 1.5:
            subprocess.run(["fstrim", root], capture_output=True)
            last_trim = time.monotonic()
        ahead = ops / rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
    db.close()
    print(ops, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
