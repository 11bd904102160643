"""pytest-benchmark tests of the kernels (skipped by default; run with
`PYTHONPATH=src python -m pytest benchmarks/bench_kernels.py --benchmark-only`).
Runs against the backend selected by SMSREPL_BACKEND."""
from __future__ import annotations

import numpy as np
import pytest

from smsrepl import kernels

MiB = 1 << 20


@pytest.fixture(scope="module")
def mixed() -> np.ndarray:
    rng = np.random.default_rng(1)
    a = np.zeros(64 * MiB, dtype=np.uint8)
    bs = 4096
    for i, k in enumerate(rng.integers(0, 3, a.size // (16 * bs)).tolist()):
        sl = slice(i * 16 * bs, (i + 1) * 16 * bs)
        if k == 1:
            a[sl] = rng.integers(0, 256, 16 * bs, dtype=np.uint8)
        elif k == 2:
            a[sl] = rng.integers(32, 127, 16 * bs, dtype=np.uint8)
    return a


@pytest.fixture(scope="module")
def delta_pair():
    rng = np.random.default_rng(2)
    size = 4 * MiB if kernels.BACKEND == "pure" else 64 * MiB
    old = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    parts, last = [], 0
    for o in np.sort(rng.integers(0, size, 25)).tolist():
        parts += [old[last:o], rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()]
        last = o
    new = b"".join(parts + [old[last:]])
    bs = kernels.delta_block_size(size)
    nb = -(-size // bs)
    w, s = np.zeros(nb, np.uint32), np.zeros(nb, np.uint64)
    kernels.file_signature(old, bs, w, s)
    return old, new, bs, w, s


def test_block_digests_4k(benchmark, mixed):
    out = np.empty(mixed.size // 4096, dtype=np.uint64)
    benchmark(kernels.block_digests, mixed, 4096, out)


def test_zero_map_4k(benchmark, mixed):
    out = np.empty(mixed.size // 4096, dtype=np.uint8)
    benchmark(kernels.zero_map, mixed, 4096, out)


def test_zero_map_numpy_best(benchmark, mixed):
    v = mixed.view(np.uint64).reshape(-1, 512)
    benchmark(lambda: np.bitwise_or.reduce(v, axis=1) == 0)


def test_file_signature(benchmark, delta_pair):
    old, _, bs, w, s = delta_pair
    benchmark(kernels.file_signature, old, bs, w.copy(), s.copy())


def test_delta_search(benchmark, delta_pair):
    old, new, bs, w, s = delta_pair
    rows = benchmark(kernels.delta_search, w, s, bs, len(old), new)
    assert kernels.apply_delta(old, rows, bs, new) == new
