"""The block compare behind `verify block`: every differing 4 KiB block found and counted, ranges
merged across chunks and workers, holes, short targets and read errors, against a plain
block-by-block reference."""
from __future__ import annotations

import os

import numpy as np
import pytest

from smsrepl import faults
from smsrepl.blocks import imagecompare
from smsrepl.blocks.imagecompare import BLOCK, compare, open_side
from smsrepl.errors import SourceError

CHUNK = 64 << 10  # small chunks, so that a few hundred KiB spans many of them and every worker


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(imagecompare, "CHUNK", CHUNK)


def reference(a: bytes, b: bytes) -> tuple[int, int, list[list[int]]]:
    """(different, missing, ranges) block by block, the slow way."""
    nblocks = -(-len(a) // BLOCK)
    end = len(a) if len(b) >= len(a) else len(b) // BLOCK * BLOCK
    mask = [a[i:i + BLOCK] != b[i:i + BLOCK] for i in range(0, end, BLOCK)]
    ranges: list[list[int]] = []
    for k, differs in enumerate(mask):
        if differs:
            off = k * BLOCK
            length = min(BLOCK, len(a) - off)
            if ranges and sum(ranges[-1]) == off:
                ranges[-1][1] += length
            else:
                ranges.append([off, length])
    missing = nblocks - end // BLOCK if end < len(a) else 0
    if missing:
        ranges.append([end, len(a) - end])
    return sum(mask), missing, ranges


def run(tmp_path, a: bytes, b: bytes, **kw) -> imagecompare.BlockDiff:
    (tmp_path / "a.img").write_bytes(a)
    (tmp_path / "b.img").write_bytes(b)
    with open_side(str(tmp_path / "a.img"), "source") as src, open_side(str(tmp_path / "b.img"), "target") as dst:
        return compare(src, dst, **kw)


def changed(data: bytes, offsets) -> bytes:
    out = bytearray(data)
    for off in offsets:
        out[off] ^= 0xFF
    return bytes(out)


RNG = np.random.default_rng(3)
DATA = RNG.integers(0, 256, 40 * CHUNK + 1234, dtype=np.uint8).tobytes()  # a short last block


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_every_differing_block_is_found_whatever_the_workers(tmp_path, threads):
    # lone blocks, a run across a chunk edge (and so across workers), the first and the short last block
    offsets = [0, 5 * BLOCK + 7, CHUNK - 1, CHUNK, CHUNK + BLOCK, 3 * CHUNK - 2 * BLOCK, 3 * CHUNK + 100,
               17 * CHUNK + 9, len(DATA) - 1]
    offsets += list(range(20 * CHUNK - 3 * BLOCK, 23 * CHUNK + 5, BLOCK))  # 3 whole chunks and their edges
    b = changed(DATA, offsets)
    diff = run(tmp_path, DATA, b, threads=threads)
    different, missing, ranges = reference(DATA, b)
    assert (diff.different, diff.missing, diff.ranges) == (different, missing, ranges)
    assert [20 * CHUNK - 3 * BLOCK, 3 * CHUNK + 4 * BLOCK] in diff.ranges  # one range across 4 chunks
    assert diff.ranges[-1] == [len(DATA) // BLOCK * BLOCK, 1234 % BLOCK]  # the short last block, its length
    assert diff.blocks == -(-len(DATA) // BLOCK) and not diff.same


def test_equal_images_are_the_same(tmp_path):
    diff = run(tmp_path, DATA, DATA)
    assert diff.same and diff.different == 0 and diff.ranges == [] and diff.compared == len(DATA)


def test_an_equal_short_last_block_in_a_differing_chunk_is_not_counted(tmp_path):
    a = DATA[:2 * CHUNK + 3 * BLOCK + 100]
    b = changed(a, [2 * CHUNK + BLOCK])  # the last chunk differs, its short last block does not
    diff = run(tmp_path, a, b)
    assert (diff.different, diff.ranges) == (1, [[2 * CHUNK + BLOCK, BLOCK]])


def test_ranges_stop_at_the_limit_but_the_count_does_not(tmp_path):
    offsets = list(range(0, 30 * CHUNK, 2 * BLOCK))  # every other block: many separate ranges
    b = changed(DATA, offsets)
    diff = run(tmp_path, DATA, b, max_ranges=10)
    different, _, ranges = reference(DATA, b)
    assert diff.different == different == len(offsets)
    assert diff.ranges == ranges[:10]


def test_a_shorter_target_misses_its_last_blocks_even_a_partly_present_one(tmp_path):
    short = DATA[:10 * CHUNK + 100]  # ends 100 bytes into a block: that block is not wholly there
    b = changed(short, [3 * BLOCK])
    diff = run(tmp_path, DATA, b)
    assert (diff.different, diff.missing, diff.ranges) == reference(DATA, b)
    assert diff.missing == -(-len(DATA) // BLOCK) - (10 * CHUNK) // BLOCK
    assert diff.ranges[-1] == [10 * CHUNK, len(DATA) - 10 * CHUNK]
    assert run(tmp_path, DATA, b"").missing == diff.blocks  # an empty target misses everything


def test_a_longer_target_is_compared_over_the_source(tmp_path):
    diff = run(tmp_path, DATA, DATA + b"tail")
    assert diff.same and diff.compared == len(DATA)
    assert run(tmp_path, b"", b"x").same  # an empty source


def test_holes_compare_as_zeros_and_are_not_read(tmp_path, monkeypatch):
    size = 64 * CHUNK
    (tmp_path / "a.img").write_bytes(b"")
    with open(tmp_path / "a.img", "r+b") as fh:  # sparse: data at 8 chunks, the rest holes
        fh.truncate(size)
        fh.seek(8 * CHUNK)
        fh.write(DATA[:CHUNK])
    with open(tmp_path / "b.img", "wb") as fh:  # zeros written out where a has its leading holes
        fh.write(bytes(8 * CHUNK))
        fh.write(DATA[:CHUNK])
        fh.truncate(size)
    reads = []
    original = imagecompare.BlockSource.readinto

    def counting(self, buf, offset):
        reads.append(offset)
        return original(self, buf, offset)

    monkeypatch.setattr(imagecompare.BlockSource, "readinto", counting)
    with open_side(str(tmp_path / "a.img"), "source") as src, open_side(str(tmp_path / "b.img"), "target") as dst:
        diff = compare(src, dst)
    assert diff.same
    try:
        hole_at_end = os.lseek(os.open(tmp_path / "a.img", os.O_RDONLY), 9 * CHUNK, os.SEEK_DATA) >= size
    except OSError:
        hole_at_end = True
    if hole_at_end:  # this file system keeps holes: chunks that are holes on both sides were not read
        assert all(off < 9 * CHUNK for off in reads), sorted(set(reads))[-3:]
    with open(tmp_path / "b.img", "r+b") as fh:  # data in b where a has a hole
        fh.seek(40 * CHUNK + 5)
        fh.write(b"\1")
    with open_side(str(tmp_path / "a.img"), "source") as src, open_side(str(tmp_path / "b.img"), "target") as dst:
        diff = compare(src, dst)
    assert (diff.different, diff.ranges) == (1, [[40 * CHUNK, BLOCK]])


def test_progress_is_reported_on_the_callers_thread_up_to_the_total(tmp_path):
    calls = []
    diff = run(tmp_path, DATA, changed(DATA, [BLOCK]), on_progress=lambda *a: calls.append(a), interval=0.001)
    assert calls[0] == (0, len(DATA), 0)
    assert all(total == len(DATA) for _, total, _ in calls)
    done = [d for d, _, _ in calls]
    assert done == sorted(done) and done[-1] <= len(DATA) and diff.different == 1


def test_a_read_error_in_a_worker_is_raised_naming_the_side_and_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(faults, "_IO", {"source.read": (5, 7 * CHUNK)})  # EIO from the 8th chunk on
    with pytest.raises(SourceError) as err:
        run(tmp_path, DATA, DATA, threads=3)
    assert "read failed near offset" in str(err.value) and "Input/output error" in str(err.value)


def test_an_image_file_is_read_through_the_page_cache_and_a_device_would_be_direct(tmp_path):
    (tmp_path / "a.img").write_bytes(DATA)
    with open_side(str(tmp_path / "a.img"), "source") as side:
        assert not side.direct  # a regular file's page cache is coherent with its writers
    assert not imagecompare.is_device(str(tmp_path / "a.img"))
    assert not imagecompare.is_device(str(tmp_path / "missing"))
    if os.path.exists("/dev/loop-control"):
        assert not imagecompare.is_device("/dev/loop-control")  # a character device
