"""The frames of a round, applied to a replica, rebuild the source exactly."""
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smsrepl.blocks.source import BlockSource
from smsrepl.blocks.target import BlockTarget
from smsrepl.blocks.manifest import ManifestFile
from smsrepl.kernels import FINE_BLOCK
from smsrepl.blocks.replica import Replica
from smsrepl.blocks.stream import CHUNK_END, SET_RUN_MAX, Covered, round_events
from smsrepl.protocol import frames as F

SIZE = (24 << 20) - 1000  # three read chunks and a short last block


def _apply(replica, cache, events):
    """Apply a round's frames as the receiver would, and its Covered records as the sender's cache."""
    kinds = []
    for ev in events:
        if ev is CHUNK_END:
            continue
        if isinstance(ev, Covered):
            if ev.index is None:
                cache.write_fine(ev.first, ev.digests)
            else:
                cache.write_fine_at(ev.first, ev.index, ev.digests)
            continue
        kinds.append(type(ev).__name__)
        if isinstance(ev, F.BlockData):
            replica.apply_data(ev.offset, ev.raw_len, ev.codec, ev.digests, bytes(ev.payload))
        elif isinstance(ev, F.BlockSet):
            replica.apply_set(ev.offset, ev.index, ev.codec, ev.digests, bytes(ev.payload))
        elif isinstance(ev, F.ZeroRange):
            replica.apply_zero(ev.offset, ev.length)
        elif isinstance(ev, F.Scanned):
            replica.scanned(ev.offset)
    return kinds


def _random_copy(tmp_path, rng, *, copy: bool = True):
    """A random source of SIZE bytes, a replica and the sender's manifest cache; with ``copy``,
    a full round applied to both."""
    src_path = str(tmp_path / "src.img")
    with open(src_path, "wb") as fh:
        fh.write(rng.integers(0, 256, SIZE, dtype=np.uint8).tobytes())
    replica = Replica(BlockTarget(str(tmp_path / "t.img"), need_size=SIZE), str(tmp_path / "rx"))
    cache = ManifestFile.create(str(tmp_path / "cache"), SIZE)
    if copy:
        with BlockSource(src_path) as src:
            replica.begin("s", SIZE, 1, "full", 0)
            _apply(replica, cache, round_events(src, cache=None))
            replica.finish(1)
    return src_path, replica, cache


@pytest.mark.parametrize("sets", [True, False])
def test_sync_round_with_scattered_runs_and_holes_rebuilds_the_source(tmp_path, sets):
    rng = np.random.default_rng(11)
    src_path = str(tmp_path / "src.img")
    data = bytearray(rng.integers(0, 256, SIZE, dtype=np.uint8).tobytes())
    with open(src_path, "wb") as fh:  # the middle stretch is a hole
        fh.write(data[:8 << 20])
        fh.seek(16 << 20)
        fh.write(data[16 << 20:])
    replica = Replica(BlockTarget(str(tmp_path / "t.img"), need_size=SIZE), str(tmp_path / "rx"))
    cache = ManifestFile.create(str(tmp_path / "cache"), SIZE)
    with BlockSource(src_path) as src:
        replica.begin("s", SIZE, 1, "full", 0)
        _apply(replica, cache, round_events(src, cache=None))
        replica.finish(1)
    nblocks = -(-SIZE // FINE_BLOCK)
    picks = rng.choice(nblocks - 1, 300, replace=False).tolist() + [nblocks - 1]
    long_run = list(range(5000, 5000 + SET_RUN_MAX + 3))
    zeroed = picks[:20]
    fd = os.open(src_path, os.O_RDWR)
    for b in picks + long_run:
        n = min(FINE_BLOCK, SIZE - b * FINE_BLOCK)
        os.pwrite(fd, bytes(n) if b in zeroed else rng.integers(1, 256, n, dtype=np.uint8).tobytes(), b * FINE_BLOCK)
    os.close(fd)
    with BlockSource(src_path) as src:
        replica.begin("s", SIZE, 2, "sync", 0)
        kinds = _apply(replica, cache, round_events(src, cache=cache, sets=sets))
        root = replica.finish(2)
    with open(src_path, "rb") as a, open(tmp_path / "t.img", "rb") as b:
        assert a.read() == b.read()
    cache.commit()
    assert cache.root.hex() == root
    if sets:
        # one set per read chunk or fewer, plus the long run as ordinary data frames
        assert kinds.count("BlockSet") <= 4 and kinds.count("BlockData") <= 2
    else:
        assert "BlockSet" not in kinds and kinds.count("BlockData") > 250


def test_dirty_map_round_reads_only_marked_blocks_and_rebuilds_the_source(tmp_path):
    from smsrepl.blocks.dirtymap import DirtyMap, tracked_pwrite
    from smsrepl.blocks.stream import dirty_round_events

    rng = np.random.default_rng(13)
    src_path, replica, cache = _random_copy(tmp_path, rng)
    dm = DirtyMap.open(str(tmp_path / "dirty"), SIZE)
    dm.reset()
    nblocks = -(-SIZE // FINE_BLOCK)
    fd = os.open(src_path, os.O_RDWR)
    picks = sorted(set(rng.choice(nblocks - 1, 200, replace=False).tolist()) | {nblocks - 1})
    for b in picks:
        n = min(FINE_BLOCK, SIZE - b * FINE_BLOCK)
        tracked_pwrite(fd, rng.integers(1, 256, n, dtype=np.uint8).tobytes(), b * FINE_BLOCK, dm)
    tracked_pwrite(fd, bytes(3 * FINE_BLOCK), 100 * FINE_BLOCK, dm)  # a run that became zero
    tracked_pwrite(fd, rng.integers(0, 256, 80 * FINE_BLOCK, dtype=np.uint8).tobytes(), 3000 * FINE_BLOCK, dm)
    dm.mark(5000 * FINE_BLOCK, FINE_BLOCK)  # marked but unchanged: not sent
    os.close(fd)
    reads = []
    with BlockSource(src_path) as src:
        orig = src.read_ranges
        src.read_ranges = lambda buf, ranges: reads.append(sum(n for _, n in ranges)) or orig(buf, ranges)
        frozen = dm.freeze()
        replica.begin("s", SIZE, 2, "sync", 0)
        kinds = _apply(replica, cache, dirty_round_events(src, frozen, cache))
        replica.finish(2)
        frozen.release()
    with open(src_path, "rb") as a, open(tmp_path / "t.img", "rb") as b:
        assert a.read() == b.read()
    assert 0 < sum(reads) <= (len(picks) + 3 + 80 + 1) * FINE_BLOCK  # only what the map named was read
    assert kinds.count("BlockSet") <= 2 and "Scanned" not in kinds
    assert dm.dirty_blocks() == 0
    dm.close()


def test_a_long_zero_region_goes_out_in_pieces_not_as_one_range_at_its_end(tmp_path):
    # allocated zeros (read, not a hole): one ZERO_RANGE at the end of a huge region would
    # leave the receiver without a frame for minutes
    path = tmp_path / "zeros.img"
    with open(path, "wb") as fh:
        for _ in range(12):
            fh.write(bytes(4 << 20))
        fh.write(b"\x01" * 4096)
    src = BlockSource(str(path))
    frames = [e for e in round_events(src, zero_flush=8 << 20) if isinstance(e, (F.ZeroRange, F.BlockData))]
    zeros = [f for f in frames if isinstance(f, F.ZeroRange)]
    assert len(zeros) >= 5 and all(z.length <= (8 << 20) + (8 << 20) for z in zeros)
    assert sum(z.length for z in zeros) == 48 << 20
    assert [z.offset for z in zeros] == sorted(z.offset for z in zeros)
    assert zeros[0].offset == 0 and zeros[-1].offset + zeros[-1].length == 48 << 20
    assert isinstance(frames[-1], F.BlockData) and frames[-1].offset == 48 << 20


def test_a_frame_with_zero_blocks_is_gathered_in_place_without_a_temporary():
    """The non-zero blocks of a frame go straight into the chunk's gather buffer: no array the
    size of the payload is allocated on the way (np.compress made one per frame, then copied it)."""
    import tracemalloc

    from smsrepl.blocks.stream import _Gather, _payload

    rng = np.random.default_rng(7)
    blocks = 2048
    data = rng.integers(1, 256, blocks * FINE_BLOCK, dtype=np.uint8)
    zero = rng.random(blocks) < 0.5
    data.reshape(blocks, FINE_BLOCK)[zero] = 0
    digests = np.where(zero, 0, 1).astype("<u8")
    gather = _Gather(blocks * FINE_BLOCK)
    gather.next_chunk()
    _payload(memoryview(data), 0, len(data), digests, gather)  # the gather buffer is made once
    gather.next_chunk()
    for _ in range(len(gather.bufs) - 1):
        gather.next_chunk()
    tracemalloc.start()
    try:
        out = _payload(memoryview(data), 0, len(data), digests, gather)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert bytes(out) == data.reshape(blocks, FINE_BLOCK)[~zero].tobytes()
    assert peak < 256 << 10


#: how many more chunks a round's frames may wait for their turn at the socket (block_pipeline:
#: two batches queued and one being written)
LAG = 3


@pytest.mark.parametrize("kind,sets", [("sync", True), ("sync", False), ("full", False)])
def test_frames_hold_their_data_while_the_sender_may_still_send_them(tmp_path, kind, sets):
    """A chunk's frames are applied only once LAG more chunks were read, as the sender's writer
    may: by then a sync round's 3 read buffers were all read into again (SYNC_BUFFERS), so its
    frames must carry copies; a full round's views into its 6 read buffers still hold."""
    rng = np.random.default_rng(12)
    src_path, replica, cache = _random_copy(tmp_path, rng, copy=kind == "sync")
    if kind == "sync":
        fd = os.open(src_path, os.O_RDWR)
        # scattered blocks, long runs (sent as data frames) with and without a zero block, one across chunks
        runs = [(b, 1) for b in range(7, 6000, 97)] + [(3000, SET_RUN_MAX + 5), (4100, 300), (5000, 100)]
        for b, n in runs:
            block = rng.integers(1, 256, n * FINE_BLOCK, dtype=np.uint8)
            if b == 3000:
                block[FINE_BLOCK:2 * FINE_BLOCK] = 0
            os.pwrite(fd, block.tobytes(), b * FINE_BLOCK)
        os.close(fd)
    with BlockSource(src_path) as src:
        replica.begin("s", SIZE, 2, kind, 0)
        chunks: list[list] = [[]]
        for ev in round_events(src, cache=cache if kind == "sync" else None, sets=sets, chunk=1 << 20):
            chunks[-1].append(ev)
            if ev is CHUNK_END:
                chunks.append([])
                if len(chunks) > LAG + 1:
                    _apply(replica, cache, chunks.pop(0))
        for c in chunks:
            _apply(replica, cache, c)
        replica.finish(2)
    with open(src_path, "rb") as a, open(tmp_path / "t.img", "rb") as b:
        assert a.read() == b.read()


_CHANGE = st.tuples(st.integers(0, 1023), st.sampled_from([1, 2, 3, SET_RUN_MAX - 1, SET_RUN_MAX, SET_RUN_MAX + 1, 300]),
                    st.sampled_from(["random", "zero", "same"]))


@settings(max_examples=25, deadline=None)
@given(changes=st.lists(_CHANGE, max_size=30), tail=st.integers(1, FINE_BLOCK), seed=st.integers(0, 2**32 - 1))
def test_any_pattern_of_changed_runs_rebuilds_the_source_through_sets(tmp_path_factory, changes, tail, seed):
    """Short runs (BLOCK_SETs, several per chunk, split at MAX_SET), long runs (data frames),
    blocks that became zero or were rewritten unchanged, a short last block: the frames of a
    sync round with sets rebuild the source, and the cache ends equal to the receiver's manifest."""
    tmp = tmp_path_factory.mktemp("pattern")
    rng = np.random.default_rng(seed)
    size = 1024 * FINE_BLOCK - FINE_BLOCK + tail
    data = rng.integers(0, 256, size, dtype=np.uint8)
    data[:64 * FINE_BLOCK] = 0  # a zero region, and zero blocks about: ZERO_RANGEs and zero-digest blocks
    data[:size // FINE_BLOCK * FINE_BLOCK].reshape(-1, FINE_BLOCK)[rng.random(size // FINE_BLOCK) < 0.1] = 0
    src_path = str(tmp / "src.img")
    data.tofile(src_path)
    replica = Replica(BlockTarget(str(tmp / "t.img"), need_size=size), str(tmp / "rx"))
    cache = ManifestFile.create(str(tmp / "cache"), size)
    with BlockSource(src_path) as src:
        replica.begin("s", size, 1, "full", 0)
        _apply(replica, cache, round_events(src, cache=None, chunk=1 << 20))
        replica.finish(1)
    for b, n, how in changes:
        lo, hi = b * FINE_BLOCK, min((b + n) * FINE_BLOCK, size)
        if how == "random":
            data[lo:hi] = rng.integers(0, 256, hi - lo, dtype=np.uint8)
        elif how == "zero":
            data[lo:hi] = 0
    data.tofile(src_path)
    with BlockSource(src_path) as src:
        replica.begin("s", size, 2, "sync", 0)
        _apply(replica, cache, round_events(src, cache=cache, sets=True, chunk=1 << 20))
        root = replica.finish(2)
    with open(tmp / "t.img", "rb") as fh:
        assert fh.read() == data.tobytes()
    cache.commit()
    assert cache.root.hex() == root
    cache.close()
