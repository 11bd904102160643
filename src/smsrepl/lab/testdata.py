"""Deterministic disk-like images for the demo, tests and benchmarks.

An image is a sequence of 4 MiB stretches, each one of: a hole (never
written), written zeros, text-like data (compresses ~3-4x with zstd-1),
random data (incompressible), or a mix of text and zero 4 KiB blocks. The
proportions follow what migrated system disks look like: much free space,
some binaries and compressed files, logs and configuration.
"""
from __future__ import annotations

import os

from smsrepl._lazy import import_numpy

TYPE_CHECKING = False
if TYPE_CHECKING:
    import numpy as np
else:
    np = import_numpy()

STRETCH = 4 << 20
#: kind -> share of stretches
DISK_MIX = {"hole": 0.30, "zero": 0.10, "text": 0.35, "random": 0.15, "mixed": 0.10}

_WORDS = (
    "the of and to in is for on that by this with you it not or be are from at as your all have new more an was we "
    "will home can us about if page my has search free but our one other do no information time they site he up may "
    "what which their news out use any there see only so his when contact here business who web also now help get pm "
    "kernel systemd journal error warning info debug /usr/lib /var/log /etc/fstab uuid=3f2a ext4 xfs lvm mount boot "
    "grub initrd vmlinuz eth0 192.168.1.10 GET POST HTTP/1.1 200 404 500 user agent Mozilla/5.0 nginx apache mysql"
).split()


def _text_pool(rng: np.random.Generator, size: int) -> np.ndarray:
    words = rng.choice(np.array(_WORDS, dtype=object), size=size // 4)
    text = " ".join(words.tolist())
    lines = [text[i:i + 96] for i in range(0, len(text), 96)]
    out = ("\n".join(lines)).encode()[:size]
    return np.frombuffer(out.ljust(size, b"\n"), dtype=np.uint8)


def write_image(path: str, size: int, *, seed: int = 1, mix: dict[str, float] | None = None) -> dict[str, int]:
    """Write a disk-like image of ``size`` bytes; returns bytes per kind."""
    mix = mix or DISK_MIX
    rng = np.random.default_rng(seed)
    kinds = list(mix)
    probs = np.array([mix[k] for k in kinds], dtype=float)
    probs /= probs.sum()
    pool = _text_pool(rng, STRETCH * 2)
    counts = dict.fromkeys(kinds, 0)
    with open(path, "wb") as fh:
        fh.truncate(size)
        pos = 0
        while pos < size:
            n = min(STRETCH, size - pos)
            kind = kinds[int(rng.choice(len(kinds), p=probs))]
            counts[kind] += n
            if kind == "hole":
                pos += n
                continue
            if kind == "zero":
                buf = np.zeros(n, dtype=np.uint8)
            elif kind == "random":
                buf = rng.integers(0, 256, n, dtype=np.uint8)
            else:
                start = int(rng.integers(0, STRETCH))
                buf = pool[start:start + n].copy()
                # make every 4 KiB block distinct, as real files are
                marks = np.arange(0, n, 4096)
                buf[marks] = rng.integers(0, 256, len(marks), dtype=np.uint8)
                if kind == "mixed":
                    blocks = buf[: n // 4096 * 4096].reshape(-1, 4096)
                    blocks[rng.random(len(blocks)) < 0.5] = 0
            fh.seek(pos)
            fh.write(buf.tobytes())
            pos += n
    return counts


def rewrite_random_blocks(path: str, fraction: float, *, seed: int = 2, block: int = 4096, dirty=None) -> int:
    """Overwrite ``fraction`` of the image's 4 KiB blocks at random offsets; returns bytes rewritten.

    With ``dirty`` (a DirtyMap), every write is marked in it as an agent would."""
    size = os.path.getsize(path)
    nblocks = size // block
    rng = np.random.default_rng(seed)
    count = max(1, int(nblocks * fraction))
    picks = rng.choice(nblocks, size=count, replace=False)
    picks.sort()
    data = rng.integers(0, 256, count * block, dtype=np.uint8).tobytes()
    fd = os.open(path, os.O_WRONLY)
    try:
        for i, b in enumerate(picks.tolist()):
            if dirty is not None:
                dirty.mark(b * block, block)
            os.pwrite(fd, data[i * block:(i + 1) * block], b * block)
            if dirty is not None:
                dirty.mark(b * block, block)
    finally:
        os.close(fd)
    return count * block
