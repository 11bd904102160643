"""An image file's ranges that the page cache holds are read from it, not from the disk."""
from __future__ import annotations

import ctypes
import os

import pytest

from smsrepl.blocks import pagecache
from smsrepl.blocks.direct import aligned_buffer
from smsrepl.blocks.source import BlockSource

MiB = 1 << 20


def _stat(path: str) -> pagecache._Stat:
    fd = os.open(path, os.O_RDONLY)
    try:
        rng, st = pagecache._Range(0, 0), pagecache._Stat()
        assert pagecache._syscall(pagecache.SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) == 0
        return st
    finally:
        os.close(fd)


@pytest.fixture
def cachestat():
    fd = os.open("/", os.O_RDONLY)
    try:
        if pagecache.resident(fd, 0, 1) is None and pagecache._works is False:
            pytest.skip("no cachestat(2) in this kernel")
    finally:
        os.close(fd)


def test_resident_tells_a_cached_range_from_a_dropped_one(tmp_path, cachestat):
    path = tmp_path / "img"
    data = os.urandom(4 * MiB)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        assert pagecache.resident(fd, 0, 4 * MiB) is True
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if pagecache.resident(fd, 0, 4 * MiB):
            pytest.skip("this file system keeps its pages (tmpfs)")
        assert pagecache.resident(fd, 0, 4 * MiB) is False
        os.pread(fd, MiB, 0)  # one page in four cached, and a little read-ahead
        assert pagecache.resident(fd, 2 * MiB, 2 * MiB) is False
    finally:
        os.close(fd)


def test_a_cached_range_of_a_direct_source_is_read_without_writing_it_back(tmp_path, cachestat):
    """A direct read writes a range's dirty pages back first; the cached read leaves them be
    and returns the same, latest data."""
    path = str(tmp_path / "img")
    with open(path, "wb") as fh:
        fh.write(os.urandom(8 * MiB))
        fh.flush()
        os.fsync(fh.fileno())
    latest = os.urandom(8 * MiB)
    with open(path, "r+b") as fh:
        fh.write(latest)  # dirty in the page cache, not yet on the disk
    if _stat(path).nr_dirty == 0:
        pytest.skip("this file system has no dirty pages to keep (tmpfs)")
    with BlockSource(path) as src:
        if not src.direct:
            pytest.skip("no O_DIRECT on this file system")
        buf = memoryview(aligned_buffer(8 * MiB))
        assert src.readinto(buf, 0) == 8 * MiB
        assert bytes(buf) == latest
        assert _stat(path).nr_dirty > 0  # a direct read would have written them back
        got = memoryview(aligned_buffer(4 * MiB))
        assert src.read_ranges(got, [(0, MiB), (4 * MiB, 3 * MiB)]) == 4 * MiB
        assert bytes(got) == latest[:MiB] + latest[4 * MiB:7 * MiB]
        assert _stat(path).nr_dirty > 0


def test_an_uncached_range_is_still_read_directly(tmp_path, cachestat):
    path = str(tmp_path / "img")
    data = os.urandom(8 * MiB)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if _stat(path).nr_cache:
        pytest.skip("this file system keeps its pages (tmpfs)")
    with BlockSource(path) as src:
        if not src.direct:
            pytest.skip("no O_DIRECT on this file system")
        buf = memoryview(aligned_buffer(8 * MiB))
        assert src.readinto(buf, 0) == 8 * MiB
        assert bytes(buf) == data
    assert _stat(path).nr_cache < 8 * MiB // pagecache.PAGE // 4  # not through the cache
