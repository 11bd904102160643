"""Block kernels (block_digests, zero_map, file_signature, weak_checksum) against
the backend selected by SMSREPL_BACKEND, plus native-vs-pure cross checks."""
from __future__ import annotations

import os

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smsrepl import _pure, kernels

try:
    from smsrepl._native import _core as native
except ImportError:  # pragma: no cover - only when the extension is not built
    native = None

needs_native = pytest.mark.skipif(native is None, reason="native core not built")


def _mixed(rng: np.random.Generator, nblocks: int, bs: int) -> bytes:
    parts = []
    for kind in rng.integers(0, 4, nblocks):
        if kind == 0:
            parts.append(bytes(bs))
        elif kind == 1:
            parts.append(rng.integers(0, 256, bs, dtype=np.uint8).tobytes())
        elif kind == 2:
            parts.append(rng.integers(32, 127, bs, dtype=np.uint8).tobytes())
        else:  # zero block with a single non-zero byte somewhere (late exit path)
            b = bytearray(bs)
            b[int(rng.integers(0, bs))] = int(rng.integers(1, 256))
            parts.append(bytes(b))
    return b"".join(parts)


def _ref_digest(block: bytes) -> int:
    if not any(block):
        return 0
    h = xxhash.xxh3_64_intdigest(block)
    return 1 if h == 0 else (2**64 - 2 if h == 2**64 - 1 else h)


def test_backend_matches_env():
    want = "pure" if os.environ.get("SMSREPL_BACKEND", "").lower() == "pure" else "native"
    assert kernels.BACKEND == want
    assert kernels.ZERO_DIGEST == 0 and kernels.UNKNOWN_DIGEST == 2**64 - 1


@pytest.mark.parametrize("bs", [8, 512, 4096])
@pytest.mark.parametrize("tail", [0, 1, 7, 100])
def test_block_digests_reference(bs, tail):
    rng = np.random.default_rng(bs + tail)
    buf = _mixed(rng, 37, bs) + rng.integers(0, 256, tail, dtype=np.uint8).tobytes()
    nb = -(-len(buf) // bs)
    out = np.full(nb + 2, 12345, dtype=np.uint64)
    n = kernels.block_digests(buf, bs, out)
    want = [_ref_digest(buf[i * bs : (i + 1) * bs]) for i in range(nb)]
    assert out[:nb].tolist() == want
    assert out[nb:].tolist() == [12345, 12345]  # nothing written past the blocks
    assert n == sum(1 for d in want if d)
    assert kernels.UNKNOWN_DIGEST not in out[:nb]


def test_block_digests_zero_tail_and_empty():
    out = np.zeros(3, dtype=np.uint64)
    assert kernels.block_digests(b"", 8, out) == 0
    assert kernels.block_digests(bytes(20), 8, out) == 0
    assert out.tolist() == [0, 0, 0]
    assert kernels.block_digests(bytes(19) + b"\x01", 8, out) == 1
    assert out[2] == _ref_digest(bytes(3) + b"\x01")


@pytest.mark.parametrize(
    "buf_factory",
    [bytes, bytearray, lambda b: memoryview(b), lambda b: np.frombuffer(b, dtype=np.uint8).copy()],
)
def test_block_digests_buffer_kinds(buf_factory):
    data = b"abc" * 1000
    out = np.zeros(3, dtype=np.uint64)
    kernels.block_digests(buf_factory(data), 1024, out)
    assert out.tolist() == [_ref_digest(data[i : i + 1024]) for i in range(0, 3000, 1024)]


@pytest.mark.parametrize("fn", ["block_digests", "zero_map"])
def test_block_kernels_validate(fn):
    f = getattr(kernels, fn)
    dtype = np.uint64 if fn == "block_digests" else np.uint8
    for bad in (0, -8, 12, 7):
        with pytest.raises(ValueError):
            f(bytes(64), bad, np.zeros(64, dtype=dtype))
    with pytest.raises(ValueError):
        f(bytes(65), 8, np.zeros(8, dtype=dtype))  # needs 9
    with pytest.raises((TypeError, BufferError, ValueError)):
        f(bytes(64), 8, bytes(64))  # read-only out


def test_zero_map():
    rng = np.random.default_rng(5)
    bs = 4096
    buf = _mixed(rng, 64, bs) + bytes(10)
    nb = 65
    out = np.full(nb, 7, dtype=np.uint8)
    z = kernels.zero_map(buf, bs, out)
    want = [int(not any(buf[i * bs : (i + 1) * bs])) for i in range(nb)]
    assert out.tolist() == want and z == sum(want)
    outb = np.zeros(nb, dtype=bool)
    assert kernels.zero_map(buf, bs, outb) == z
    assert outb.tolist() == [bool(x) for x in want]


def test_zero_map_matches_block_digests():
    rng = np.random.default_rng(11)
    buf = _mixed(rng, 200, 512)
    zm = np.zeros(200, dtype=np.uint8)
    dg = np.zeros(200, dtype=np.uint64)
    z = kernels.zero_map(buf, 512, zm)
    nz = kernels.block_digests(buf, 512, dg)
    assert z + nz == 200
    assert ((dg == 0) == (zm == 1)).all()


def _weak_ref(b: bytes) -> int:
    h = 0
    for c in b:
        h = (h * 0x9E3779B1 + c + 1) & 0xFFFFFFFF
    return h


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 700, 1001])
def test_weak_checksum_definition(n):
    b = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert kernels.weak_checksum(b) == _weak_ref(b)


def test_weak_checksum_rolls():
    b = np.random.default_rng(3).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    n, M = 700, 0x9E3779B1
    mn = pow(M, n, 2**32)
    h = kernels.weak_checksum(b[:n])
    for p in range(1, 200):
        h = (h * M + b[p + n - 1] + 1 - (b[p - 1] + 1) * mn) & 0xFFFFFFFF
        assert h == kernels.weak_checksum(b[p : p + n])


@pytest.mark.parametrize("bs", [1, 700, 1024])
def test_file_signature(bs):
    b = np.random.default_rng(bs).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    nb = -(-len(b) // bs)
    w = np.zeros(nb, dtype=np.uint32)
    s = np.zeros(nb, dtype=np.uint64)
    assert kernels.file_signature(b, bs, w, s) == nb
    blocks = [b[i * bs : (i + 1) * bs] for i in range(nb)]
    assert w.tolist() == [_weak_ref(x) for x in blocks]
    assert s.tolist() == [xxhash.xxh3_64_intdigest(x) for x in blocks]  # no remap
    with pytest.raises(ValueError):
        kernels.file_signature(b, bs, np.zeros(nb - 1, np.uint32), s)
    with pytest.raises(ValueError):
        kernels.file_signature(b, 0, w, s)


# --- native vs pure on random inputs -------------------------------------------------

_small = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def _block_bufs(draw):
    bs = draw(st.sampled_from([8, 16, 64, 520, 4096]))
    nblk = draw(st.integers(0, 20))
    kinds = draw(st.lists(st.integers(0, 3), min_size=nblk, max_size=nblk))
    seed = draw(st.integers(0, 2**32 - 1))
    tail = draw(st.integers(0, bs - 1))
    rng = np.random.default_rng(seed)
    parts = []
    for k in kinds:
        if k == 0:
            parts.append(bytes(bs))
        elif k == 1:
            parts.append(rng.integers(0, 256, bs, dtype=np.uint8).tobytes())
        elif k == 2:
            b = bytearray(bs)
            b[int(rng.integers(0, bs))] = 1
            parts.append(bytes(b))
        else:
            parts.append(rng.integers(0, 2, bs, dtype=np.uint8).tobytes())
    parts.append(rng.integers(0, 256, tail, dtype=np.uint8).tobytes() if seed % 2 else bytes(tail))
    return bs, b"".join(parts)


@needs_native
@_small
@given(_block_bufs())
def test_native_vs_pure_block_kernels(case):
    bs, buf = case
    nb = -(-len(buf) // bs)
    a, b = np.zeros(nb, np.uint64), np.zeros(nb, np.uint64)
    assert native.block_digests(buf, bs, a) == _pure.block_digests(buf, bs, b)
    assert (a == b).all()
    za, zb = np.zeros(nb, np.uint8), np.zeros(nb, np.uint8)
    assert native.zero_map(buf, bs, za) == _pure.zero_map(buf, bs, zb)
    assert (za == zb).all()


@needs_native
@_small
@given(st.binary(max_size=3000), st.integers(1, 1100))
def test_native_vs_pure_signature(buf, bs):
    nb = -(-len(buf) // bs)
    wa, sa = np.zeros(nb, np.uint32), np.zeros(nb, np.uint64)
    wb, sb = np.zeros(nb, np.uint32), np.zeros(nb, np.uint64)
    assert native.file_signature(buf, bs, wa, sa) == _pure.file_signature(buf, bs, wb, sb)
    assert (wa == wb).all() and (sa == sb).all()
    assert native.weak_checksum(buf) == _pure.weak_checksum(buf)


@needs_native
def test_native_constants_match_pure():
    assert native.ZERO_DIGEST == _pure.ZERO_DIGEST
    assert native.UNKNOWN_DIGEST == _pure.UNKNOWN_DIGEST
    assert native.DELTA_MAX_CHAIN == _pure.DELTA_MAX_CHAIN
    assert native.DELTA_FAIL_BUDGET == _pure.DELTA_FAIL_BUDGET


@needs_native
def test_native_releases_gil_and_is_thread_safe():
    from concurrent.futures import ThreadPoolExecutor

    buf = np.random.default_rng(9).integers(0, 256, 8 << 20, dtype=np.uint8)
    ref = np.zeros(2048, np.uint64)
    native.block_digests(buf, 4096, ref)

    def run(_):
        out = np.zeros(2048, np.uint64)
        native.block_digests(buf, 4096, out)
        return (out == ref).all()

    with ThreadPoolExecutor(4) as ex:
        assert all(ex.map(run, range(8)))
