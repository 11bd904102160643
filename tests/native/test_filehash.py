"""hash_files: XXH3-128 of whole files, a directory's files per call (filehash.c and its
twin in _pure/__init__.py give what xxhash gives)."""
from __future__ import annotations

import errno
import os

import pytest
import xxhash

from smsrepl import _pure

try:
    from smsrepl._native import _core as native
except ImportError:  # pragma: no cover
    native = None

IMPLS = [pytest.param(_pure, id="pure")] + ([pytest.param(native, id="native")] if native else [])
SIZES = [0, 1, 4095, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, (3 << 20) + 5]


@pytest.fixture
def folder(tmp_path):
    for size in SIZES:
        (tmp_path / f"f{size}").write_bytes(os.urandom(size))
    (tmp_path / "sub").mkdir()
    os.symlink("f1", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")  # never opened for a read that would wait for a writer
    return tmp_path


@pytest.mark.parametrize("impl", IMPLS)
def test_digests_are_xxh3_128_of_the_whole_content(folder, impl):
    names = [f"f{s}".encode() for s in SIZES]
    out = bytearray(16 * len(names))
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        done, nbytes, errors = impl.hash_files(fd, names, out, 1 << 62)
    finally:
        os.close(fd)
    assert (done, nbytes, errors) == (len(names), sum(SIZES), [])
    for i, size in enumerate(SIZES):
        assert bytes(out[16 * i:16 * i + 16]) == xxhash.xxh3_128((folder / f"f{size}").read_bytes()).digest(), size


@pytest.mark.parametrize("impl", IMPLS)
def test_what_is_not_a_regular_file_is_an_error_and_the_budget_ends_a_call(folder, impl):
    names = [b"f1", b"missing", b"sub", b"link", b"fifo", b"f4095"]
    out = bytearray(16 * len(names))
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        done, nbytes, errors = impl.hash_files(fd, names, out, 1 << 62)
        assert done == 6 and nbytes == 1 + 4095
        assert errors == [(1, errno.ENOENT), (2, errno.EISDIR), (3, errno.EINVAL), (4, errno.EINVAL)]
        big = [f"f{s}".encode() for s in reversed(SIZES)]
        done, nbytes, _ = impl.hash_files(fd, big, bytearray(16 * len(big)), 1000)
        assert (done, nbytes) == (1, SIZES[-1])  # at least one file a call, then the budget
        done, nbytes, _ = impl.hash_files(fd, big[2:], bytearray(16 * len(big)), (1 << 20) + 1)
        assert (done, nbytes) == (2, (1 << 20) + (1 << 20) - 1)
    finally:
        os.close(fd)
    with pytest.raises(ValueError):
        impl.hash_files(0, [b"a", b"b"], bytearray(16), 0)
