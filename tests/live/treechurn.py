"""A writer that keeps a directory tree busy the way a live server does: it creates, appends
to, truncates, rewrites, renames and deletes files, and makes, moves and removes whole
directories, at a given rate of operations per second.

    w = TreeChurn(root, rate=1000, seed=1); w.populate(); w.start(); ...; w.stop()
    python tests/live/treechurn.py ROOT [--rate N] [--seconds S] [--seed N]
"""
from __future__ import annotations

import os
import random
import shutil
import sys
import threading
import time


class TreeChurn:
    def __init__(self, root: str, *, rate: float = 1000.0, seed: int = 0, max_files: int = 3000) -> None:
        self.root = root
        self.rate = rate
        self.rng = random.Random(seed)
        self.max_files = max_files
        self.dirs: list[str] = []  # relative paths of the directories made here
        self.files: list[str] = []
        self.ops = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._n = 0
        self._pool = self.rng.randbytes(2 << 20)  # data is cut from it: random bytes cost CPU

    def _data(self, n: int) -> bytes:
        off = self.rng.randrange(0, len(self._pool) - n + 1)
        return self._pool[off:off + n]

    def _name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def populate(self, dirs: int = 30, files: int = 1500) -> None:
        os.makedirs(self.root, exist_ok=True)
        for _ in range(dirs):
            parent = self.rng.choice(self.dirs + [""] * 4)
            d = os.path.join(parent, self._name("d"))
            os.mkdir(os.path.join(self.root, d))
            self.dirs.append(d)
        for _ in range(files):
            self._create()
        big = os.path.join(self.rng.choice(self.dirs), self._name("big") + ".dat")
        with open(os.path.join(self.root, big), "wb") as fh:
            fh.write(self._data(1 << 20) * 3)
        self.files.append(big)

    # --- operations ---------------------------------------------------------------
    def _p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def _create(self) -> None:
        rel = os.path.join(self.rng.choice(self.dirs + [""]), self._name("f") + ".log")
        with open(self._p(rel), "wb") as fh:
            fh.write(self._data(self.rng.choice((0, 100, 3000, 9000, 70000))))
        self.files.append(rel)

    def _append(self) -> None:
        rel = self.rng.choice(self.files)
        with open(self._p(rel), "ab") as fh:
            fh.write(self._data(self.rng.randrange(1, 4000)))

    def _truncate(self) -> None:
        rel = self.rng.choice(self.files)
        os.truncate(self._p(rel), self.rng.randrange(0, 500))

    def _rewrite(self) -> None:
        """Rewrite a file in place, a few chunks at a time (a reader may see it half done)."""
        rel = self.rng.choice(self.files)
        with open(self._p(rel), "r+b") as fh:
            size = os.fstat(fh.fileno()).st_size
            for off in range(0, min(size, 1 << 20), 64 << 10):
                fh.seek(off)
                fh.write(self._data(min(64 << 10, size - off)))

    def _rename(self) -> None:
        i = self.rng.randrange(len(self.files))
        rel = self.files[i]
        new = os.path.join(self.rng.choice(self.dirs + [""]), self._name("r") + ".log")
        os.rename(self._p(rel), self._p(new))
        self.files[i] = new

    def _delete(self) -> None:
        i = self.rng.randrange(len(self.files))
        os.unlink(self._p(self.files[i]))
        self.files[i] = self.files[-1]
        self.files.pop()

    def _mkdir(self) -> None:
        d = os.path.join(self.rng.choice([p for p in self.dirs if p.count("/") < 3] + [""]), self._name("d"))
        os.mkdir(self._p(d))
        self.dirs.append(d)

    def _move_dir(self) -> None:
        """Move a directory with all it holds under another one (not into itself), keeping the
        tree at most a few levels deep."""
        if not self.dirs:
            return self._mkdir()
        d = self.rng.choice(self.dirs)
        dest_parent = self.rng.choice(self.dirs + [""])
        depth = max(p.count("/") - d.count("/") for p in self.dirs if p == d or p.startswith(d + "/"))
        if dest_parent == d or dest_parent.startswith(d + "/") or dest_parent.count("/") + depth >= 4:
            return
        new = os.path.join(dest_parent, self._name("m"))
        os.rename(self._p(d), self._p(new))
        self._relocate(d, new)

    def _remove_dir(self) -> None:
        """Remove a directory that holds no directory, with its files (as a package update does)."""
        if len(self.dirs) < 10:
            return self._mkdir()
        d = self.rng.choice(self.dirs)
        if any(p.startswith(d + "/") for p in self.dirs):
            return
        shutil.rmtree(self._p(d))
        self._relocate(d, None)

    def _relocate(self, old: str, new: str | None) -> None:
        pre = old + "/"

        def moved(p: str) -> str | None:
            if p == old:
                return new
            if p.startswith(pre):
                return None if new is None else new + "/" + p[len(pre):]
            return p

        self.dirs = [q for q in (moved(p) for p in self.dirs) if q is not None]
        self.files = [q for q in (moved(p) for p in self.files) if q is not None]

    def step(self) -> None:
        r = self.rng.random()
        if not self.files or (len(self.files) < self.max_files and r < 0.25):
            op = self._create
        elif r < 0.45:
            op = self._append
        elif r < 0.52:
            op = self._truncate
        elif r < 0.56:
            op = self._rewrite
        elif r < 0.70:
            op = self._rename
        elif r < 0.90:
            op = self._delete if len(self.files) > 100 else self._create
        elif r < 0.95:
            op = self._mkdir
        elif r < 0.98:
            op = self._move_dir
        else:
            op = self._remove_dir
        try:
            op()
        except OSError:
            self.errors += 1  # a model out of step with the tree: tolerated, the tree is the truth
        self.ops += 1

    # --- pacing -------------------------------------------------------------------
    def run(self, seconds: float | None = None) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if seconds is not None and now - start >= seconds:
                return
            due = int((now - start) * self.rate)
            while self.ops < due and not self._stop.is_set():
                self.step()
            time.sleep(0.002)

    def start(self) -> "TreeChurn":
        self._thread = threading.Thread(target=self.run, name="tree-churn", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--populate", action="store_true")
    a = ap.parse_args()
    w = TreeChurn(a.root, rate=a.rate, seed=a.seed)
    if a.populate or not os.path.isdir(a.root):
        w.populate()
    else:
        for dirpath, dirnames, filenames in os.walk(a.root):
            rel = os.path.relpath(dirpath, a.root)
            if rel != ".":
                w.dirs.append(rel)
            w.files += [os.path.normpath(os.path.join(rel, f)) for f in filenames]
    try:
        w.run(a.seconds)
    except KeyboardInterrupt:
        pass
    print(f"{w.ops} operations, {w.errors} refused", file=sys.stderr)
