"""Golden vectors: fixed-seed inputs (numpy PCG64 output is stable across versions)
with pinned outputs, so a speed-up can never silently change the on-wire format.
Run against the backend selected by SMSREPL_BACKEND."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from smsrepl import kernels


def sha(a: np.ndarray, dtype: str) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).astype(dtype).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def disk_like() -> bytes:
    rng = np.random.default_rng(20240601)
    parts = []
    for k in rng.integers(0, 3, 256).tolist():
        if k == 0:
            parts.append(bytes(4096))
        elif k == 1:
            parts.append(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        else:
            parts.append(rng.integers(32, 127, 4096, dtype=np.uint8).tobytes())
    return b"".join(parts) + b"tail-bytes"


@pytest.fixture(scope="module")
def delta_pair() -> tuple[bytes, bytes]:
    rng = np.random.default_rng(777)
    old = rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    ins = rng.integers(0, 256, 300, dtype=np.uint8).tobytes()
    new = old[:5000] + ins + old[5000:400000] + old[402345:900000] + b"X" * 1000 + old[900000:]
    return old, new


def test_golden_block_digests(disk_like):
    out = np.zeros(257, np.uint64)
    assert kernels.block_digests(disk_like, 4096, out) == 177
    assert out[:4].tolist() == [0, 14954310426338993491, 0, 2570315036032610010]
    assert int(out[-1]) == 5553259625847932580  # the 10-byte tail block
    assert sha(out, "<u8") == "72918c4b98679d0a771cf35a35579469e4cef46effb5112ca88b1ede99930047"


def test_golden_zero_map(disk_like):
    out = np.zeros(257, np.uint8)
    assert kernels.zero_map(disk_like, 4096, out) == 80
    assert out[:4].tolist() == [1, 0, 1, 0]
    assert sha(out, "u1") == "c2ff15a30f96cb773fa1f1a01cb57498557657b48d28416a0e09985c5a3acf77"


def test_golden_self_test_vector():
    buf = bytes(range(256)) * 4 + bytes(1024) + b"smsrepl"
    out = np.zeros(5, np.uint64)
    assert kernels.block_digests(buf, 512, out) == 3
    assert out.tolist() == [1177990759783856649, 1177990759783856649, 0, 0, 11997748179830375189]


def test_golden_weak_checksum():
    assert kernels.weak_checksum(b"") == 0
    assert kernels.weak_checksum(b"\x00") == 1
    assert kernels.weak_checksum(b"ab") == (98 * 0x9E3779B1 + 99) % 2**32


def test_golden_signature_and_delta(delta_pair):
    old, new = delta_pair
    bs = 1000
    nb = 1049  # 1048 full blocks + a 576-byte tail block
    w, s = np.zeros(nb, np.uint32), np.zeros(nb, np.uint64)
    assert kernels.file_signature(old, bs, w, s) == nb
    assert w[:3].tolist() == [434853611, 1580733982, 3298339361]
    assert s[:2].tolist() == [2740532387797896803, 10234831928270705396]
    assert int(w[-1]) == 2096531675 and int(s[-1]) == 16267354823883706958
    assert sha(w, "<u4") == "f23be3ebf311737dde9898bf6d325665a1e1029de69709a532c805c661476627"
    assert sha(s, "<u8") == "bfc99e68036428e4f6f40c55f0cc184c0723125b479ec39e67340181846d56f2"

    rows = kernels.delta_search(w, s, bs, len(old), new)
    assert rows.tolist() == [
        [1, 0, 5],
        [0, 5000, 300],
        [1, 5, 395],
        [0, 400300, 655],
        [1, 403, 497],
        [0, 897955, 1000],
        [1, 900, 149],
    ]
    assert sha(rows, "<i8") == "7ebf02d1277f5641521058e16d9e6be7fdea5755561523aed3fcf8591a8f89da"
    assert kernels.apply_delta(old, rows, bs, new) == new


def test_golden_group_digests():
    """Coarse manifest digests: XXH3-128 (canonical bytes) of each group of 256 fine digests."""
    from smsrepl.blocks.manifest import ZERO_GROUP, group_digests

    fine = np.random.default_rng(20240601).integers(0, 2**63, 1000, dtype=np.uint64)
    g = group_digests(fine)  # 3 whole groups and a short one
    assert g.shape == (4, 2)
    assert g[0].tolist() == [16596642682777896229, 15974835636411196276]
    assert sha(g, "<u8") == "f3530514de8df8cde48299065c8ca514369af1f5a1dbac5c175ce2013e1407e6"
    assert ZERO_GROUP.tolist() == [5703744611665473091, 5402269032752946465]
