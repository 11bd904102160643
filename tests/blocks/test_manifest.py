import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from smsrepl import kernels
from smsrepl.blocks.source import BlockSource
from smsrepl.blocks.manifest import GROUP_BLOCKS, ManifestFile, diff, group_digests, runs_of
from smsrepl.blocks.sourcescan import build
from smsrepl.kernels import FINE_BLOCK, UNKNOWN_DIGEST
from smsrepl.errors import ManifestError, SourceMissingError


class CountingSource(BlockSource):
    bytes_read = 0

    def readinto(self, buf, offset):
        n = super().readinto(buf, offset)
        self.bytes_read += n
        return n


def _image(path, size, data_ranges, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "wb") as fh:
        fh.truncate(size)
        for off, length in data_ranges:
            fh.seek(off)
            fh.write(rng.integers(0, 256, length, dtype=np.uint8).tobytes())


def test_half_hole_image_reads_only_its_data(tmp_path):
    size = 64 << 20
    path = str(tmp_path / "half.img")
    # data in every other 4 MiB stretch
    _image(path, size, [(off, 4 << 20) for off in range(0, size, 8 << 20)])
    with CountingSource(path) as src:
        man = build(src, str(tmp_path / "m"))
        assert src.bytes_read <= size // 2
    fine = man.read_fine(0, man.nblocks)
    per_stretch = (4 << 20) // FINE_BLOCK
    assert np.all(fine.reshape(-1, per_stretch)[1::2] == 0)
    assert np.all(fine.reshape(-1, per_stretch)[0::2] != 0)


def test_manifest_matches_block_digests_and_survives_reopen(tmp_path):
    path = str(tmp_path / "img")
    size = 3 * (1 << 20) + 5000  # a short last block and a short last group
    _image(path, size, [(0, size)], seed=4)
    with BlockSource(path) as src:
        man = build(src, str(tmp_path / "m"))
    data = open(path, "rb").read()
    want = np.empty(-(-size // FINE_BLOCK), dtype="<u8")
    kernels.block_digests(data, FINE_BLOCK, want)
    man.close()
    again = ManifestFile.open(str(tmp_path / "m"), expect_size=size)
    assert np.array_equal(again.read_fine(0, again.nblocks), want)
    assert np.array_equal(again.coarse, group_digests(want))


def _two(tmp_path, size, fine_a, fine_b):
    a = ManifestFile.create(str(tmp_path / "a"), size, fine=fine_a)
    b = ManifestFile.create(str(tmp_path / "b"), size, fine=fine_b)
    return a, b


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3000), st.lists(st.integers(0, 10**9), max_size=30), st.integers(1, 8))
def test_diff_equals_brute_force(tmp_path_factory, nblocks, changes, chunk_groups):
    tmp = tmp_path_factory.mktemp("d")
    rng = np.random.default_rng(nblocks)
    fa = rng.integers(1, 2**63, nblocks, dtype=np.uint64)
    fb = fa.copy()
    for c in changes:
        fb[c % nblocks] ^= 0x55
    a, b = _two(tmp, nblocks * FINE_BLOCK, fa, fb)
    got = list(diff(a, b, chunk_groups=chunk_groups))
    assert got == runs_of(fa != fb)


def test_unknown_never_matches(tmp_path):
    fa = np.arange(1, 600, dtype=np.uint64)
    fb = fa.copy()
    fb[10] = UNKNOWN_DIGEST
    a, b = _two(tmp_path, len(fa) * FINE_BLOCK, fa, fb)
    assert list(diff(a, b)) == [(10, 1)]


@pytest.mark.parametrize("damage", ["truncate", "magic", "header", "coarse", "fine", "version"])
def test_damaged_manifest_is_an_error_never_a_wrong_diff(tmp_path, damage):
    fine = np.arange(1, 3 * GROUP_BLOCKS + 7, dtype=np.uint64)
    path = str(tmp_path / "m")
    ManifestFile.create(path, len(fine) * FINE_BLOCK, fine=fine).close()
    raw = bytearray(open(path, "rb").read())
    if damage == "truncate":
        raw = raw[:-8]
    elif damage == "magic":
        raw[0] ^= 1
    elif damage == "header":
        raw[30] ^= 1  # inside the device size
    elif damage == "version":
        raw[8] = 9
    elif damage == "coarse":
        raw[64 + 3] ^= 1
    elif damage == "fine":
        raw[-100] ^= 1
    open(path, "wb").write(raw)
    if damage == "fine":
        man = ManifestFile.open(path)
        with pytest.raises(ManifestError, match="corrupt fine"):
            man.read_fine(0, man.nblocks)
        with pytest.raises(ManifestError, match="corrupt fine"):
            man.verify()
        changed = fine.copy()
        changed[600] ^= 1  # the other side differs in the damaged group (2): the diff must read it
        other = ManifestFile.create(str(tmp_path / "o"), man.size, fine=changed)
        with pytest.raises(ManifestError):
            list(diff(man, other))
        return
    with pytest.raises(ManifestError):
        ManifestFile.open(path)


def test_size_mismatch_is_refused(tmp_path):
    ManifestFile.create(str(tmp_path / "m"), 1 << 20).close()
    with pytest.raises(ManifestError, match="expected"):
        ManifestFile.open(str(tmp_path / "m"), expect_size=2 << 20)
    a = ManifestFile.create(str(tmp_path / "a"), 1 << 20)
    b = ManifestFile.create(str(tmp_path / "b"), 2 << 20)
    with pytest.raises(ManifestError, match="different sizes"):
        list(diff(a, b))


def test_source_errors_name_the_path(tmp_path):
    with pytest.raises(SourceMissingError, match="does not exist"):
        BlockSource(str(tmp_path / "nope"))
    with pytest.raises(SourceMissingError, match="not a regular file or block device"):
        BlockSource(str(tmp_path))


def test_source_permission_denied_when_unprivileged(tmp_path):
    path = tmp_path / "secret.img"
    path.write_bytes(b"x" * 4096)
    path.chmod(0o600)
    os.chmod(tmp_path, 0o755)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                BlockSource(str(path))
            except SourceMissingError as exc:
                code = 0 if "permission denied" in str(exc) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_scattered_fine_digests_on_a_huge_manifest_touch_only_their_clusters(tmp_path):
    size = 1 << 40  # 1 TiB: 256 Mi blocks, 2 GiB of fine digests (sparse on disk)
    man = ManifestFile.create(str(tmp_path / "m"), size)
    blocks = np.array([5, 7, 1 << 20, (1 << 28) - 1], dtype=np.int64)
    values = np.array([11, 12, 13, 14], dtype="<u8")
    read = []
    orig = man.read_fine
    man.read_fine = lambda first, count, *a, **k: read.append(count) or orig(first, count, *a, **k)
    man.write_fine_at(5, blocks - 5, values)
    assert np.array_equal(man.read_fine_at(blocks), values)
    assert sum(read) <= 16  # the clusters, never the 2 GiB between them
    man.commit()
    assert np.array_equal(ManifestFile.open(str(tmp_path / "m")).read_fine_at(blocks), values)
