import os

import numpy as np
import pytest

from smsrepl import kernels
from smsrepl.blocks.target import BlockTarget
from smsrepl.kernels import FINE_BLOCK, UNKNOWN_DIGEST
from smsrepl.blocks.replica import INTENT_STEP, Replica
from smsrepl.errors import DecompressionError, RemoteProtocolError, SizeMismatchError, TargetWriteError

SIZE = 4 << 20


def _digests(data):
    d = np.empty(-(-len(data) // FINE_BLOCK), dtype="<u8")
    kernels.block_digests(data, FINE_BLOCK, d)
    return d


def _replica(tmp_path):
    return Replica(BlockTarget(str(tmp_path / "t.img"), need_size=SIZE), str(tmp_path / "state"))


def _apply(r, data, mib):
    """Apply the ``mib``-th MiB of ``data`` (a full round's frame)."""
    part = data[mib << 20:(mib + 1) << 20]
    r.apply_data(mib << 20, 1 << 20, 0, _digests(part), part)


def _first_mib_durable_second_not(tmp_path, seed):
    """A full round that checkpointed its first MiB and applied its second since: (replica, data)."""
    data = np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    r = _replica(tmp_path)
    r.begin("s1", SIZE, 1, "full", 0)
    _apply(r, data, 0)
    assert r.checkpoint() == 1 << 20
    _apply(r, data, 1)
    return r, data


def _full_copy(tmp_path, data):
    r = _replica(tmp_path)
    r.begin("s1", SIZE, 1, "full", 0)
    for off in range(0, SIZE, 1 << 20):
        chunk = data[off:off + (1 << 20)]
        r.apply_data(off, len(chunk), 0, _digests(chunk), chunk)
    root = r.finish(1)
    return r, root


def test_full_round_then_describe_synced(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    r, root = _full_copy(tmp_path, data)
    assert open(tmp_path / "t.img", "rb").read() == data
    r.close()
    r2 = _replica(tmp_path)
    d = r2.describe("s1", SIZE)
    assert d["state"] == "synced" and d["manifest_root"] == root
    assert r2.describe("other-session", SIZE)["state"] == "new"


def test_interrupted_full_round_resumes_only_at_its_checkpoint(tmp_path):
    r, data = _first_mib_durable_second_not(tmp_path, 2)
    r.close()  # crash: no checkpoint for the second MiB
    r2 = _replica(tmp_path)
    d = r2.describe("s1", SIZE)
    assert (d["state"], d["round_kind"], d["checkpoint"]) == ("partial", "full", 1 << 20)
    with pytest.raises(RemoteProtocolError):
        r2.begin("s1", SIZE, 1, "full", 2 << 20)
    r2.begin("s1", SIZE, 1, "full", 1 << 20)


def _cut_sync_round(tmp_path, seed):
    """A full copy, then a sync round cut after a checkpoint, with one block written past it."""
    data = bytearray(np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8).tobytes())
    r, _ = _full_copy(tmp_path, bytes(data))
    r.begin("s1", SIZE, 2, "sync", 0)
    block = b"\x01" * 4096
    r.apply_data(8192, 4096, 0, _digests(block), block)
    r.checkpoint()
    r.apply_data(3 * 4096 * 64, 4096, 0, _digests(block), block)
    r.close()  # crash mid-round: the second block's digest never reached the manifest
    return block


def test_interrupted_sync_round_digests_what_the_target_holds(tmp_path):
    block = _cut_sync_round(tmp_path, 3)
    r2 = _replica(tmp_path)
    fine = r2.manifest.read_fine(0, r2.manifest.nblocks)
    held = _digests((tmp_path / "t.img").read_bytes())
    assert fine[2] == _digests(block)[0]  # durable before the checkpoint
    assert fine[3 * 64] == _digests(block)[0]  # written after it: digested again at recovery
    assert np.array_equal(fine, held)  # the manifest describes the target exactly
    assert r2.record.intent == r2.record.checkpoint
    d = r2.describe("s1", SIZE)
    assert (d["state"], d["round_kind"]) == ("partial", "sync")


def test_interrupted_sync_round_marks_what_cannot_be_read_unknown(tmp_path):
    _cut_sync_round(tmp_path, 4)
    os.truncate(tmp_path / "t.img", SIZE // 2)  # the target lost its second half
    r2 = Replica(BlockTarget(str(tmp_path / "t.img")), str(tmp_path / "state"))
    fine = r2.manifest.read_fine(0, r2.manifest.nblocks)
    checkpoint = r2.record.checkpoint // FINE_BLOCK
    intent_end = min(SIZE, INTENT_STEP) // FINE_BLOCK
    assert np.all(fine[checkpoint:intent_end] == UNKNOWN_DIGEST)  # resent by the next round
    assert not np.any(fine[:checkpoint] == UNKNOWN_DIGEST)


def test_sync_round_records_its_first_intent_with_its_begin(tmp_path):
    data = np.random.default_rng(6).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    r, _ = _full_copy(tmp_path, data)
    saves = []
    r._save = lambda: saves.append(r.record.intent)
    r.begin("s1", SIZE, 2, "sync", 0)
    block = b"\x03" * 4096
    r.apply_data(SIZE - 4096, 4096, 0, _digests(block), block)
    assert saves == [min(SIZE, INTENT_STEP)]  # one state write before the data, not two


def test_frames_must_move_forward_and_stay_inside(tmp_path):
    r = _replica(tmp_path)
    r.begin("s1", SIZE, 1, "full", 0)
    blk = b"\x02" * 4096
    r.apply_data(8192, 4096, 0, _digests(blk), blk)
    with pytest.raises(RemoteProtocolError, match="backwards"):
        r.apply_data(0, 4096, 0, _digests(blk), blk)
    with pytest.raises(RemoteProtocolError, match="outside"):
        r.apply_zero(SIZE, 4096)
    with pytest.raises(RemoteProtocolError, match="misaligned"):
        r.apply_zero(8192 * 2 + 1, 4096)


def test_target_smaller_than_source(tmp_path):
    p = tmp_path / "small.img"
    p.write_bytes(b"\x07" * 4096)
    with pytest.raises(SizeMismatchError) as exc:
        BlockTarget(str(p), need_size=SIZE)
    assert str(exc.value).startswith("SMS.1504")
    assert p.read_bytes() == b"\x07" * 4096


def test_target_write_outside_is_refused(tmp_path):
    t = BlockTarget(str(tmp_path / "t.img"), need_size=8192)
    with pytest.raises(TargetWriteError):
        t.write(8192, b"x")


def _set_payload(data, blocks):
    """The BLOCK_SET digests and payload for ``blocks`` (absolute block numbers) of ``data``."""
    parts = [data[b * FINE_BLOCK:(b + 1) * FINE_BLOCK] for b in blocks]
    digests = np.concatenate([_digests(p) for p in parts])
    return digests, b"".join(p for p, d in zip(parts, digests) if d != 0)


def test_block_set_writes_scattered_blocks_and_their_digests(tmp_path):
    rng = np.random.default_rng(5)
    old = rng.integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    r, _ = _full_copy(tmp_path, old)
    new = bytearray(old)
    blocks = [3, 4, 9, 200, 201, 202, 700, SIZE // FINE_BLOCK - 1]
    for b in blocks:
        new[b * FINE_BLOCK:(b + 1) * FINE_BLOCK] = rng.integers(0, 256, FINE_BLOCK, dtype=np.uint8).tobytes()
    new[201 * FINE_BLOCK:202 * FINE_BLOCK] = bytes(FINE_BLOCK)  # a block that became zero travels as digest 0
    new = bytes(new)
    r.begin("s1", SIZE, 2, "sync", 0)
    digests, payload = _set_payload(new, blocks[:4])
    r.apply_set(3 * FINE_BLOCK, np.array(blocks[:4]) - 3, 0, digests, payload)
    digests, payload = _set_payload(new, blocks[4:])
    assert digests[0] == 0 and len(payload) == 3 * FINE_BLOCK
    r.apply_set(201 * FINE_BLOCK, np.array(blocks[4:]) - 201, 0, digests, payload)
    root = r.finish(2)
    assert open(tmp_path / "t.img", "rb").read() == new
    assert np.array_equal(r.manifest.read_fine(0, r.manifest.nblocks), _digests(new))
    r.close()
    assert _replica(tmp_path).describe("s1", SIZE)["manifest_root"] == root


def test_block_set_with_a_wrong_block_names_its_offset_and_writes_nothing(tmp_path):
    data = np.random.default_rng(6).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    r, _ = _full_copy(tmp_path, data)
    r.begin("s1", SIZE, 2, "sync", 0)
    other = bytearray(data)
    other[10 * FINE_BLOCK] ^= 1
    digests, payload = _set_payload(data, [2, 10])
    _, bad_payload = _set_payload(bytes(other), [2, 10])
    with pytest.raises(DecompressionError, match=f"offset {10 * FINE_BLOCK} "):
        r.apply_set(2 * FINE_BLOCK, np.array([0, 8]), 0, digests, bad_payload)
    assert open(tmp_path / "t.img", "rb").read() == data
    with pytest.raises(RemoteProtocolError, match="past the source size"):
        r.apply_set(SIZE - FINE_BLOCK, np.array([0, 1]), 0, digests, payload)
    r.apply_set(2 * FINE_BLOCK, np.array([0, 8]), 0, digests, payload)
    with pytest.raises(RemoteProtocolError, match="backwards"):
        r.apply_set(0, np.array([0]), 0, digests[:1], payload[:FINE_BLOCK])


def test_block_set_reaching_a_short_last_block(tmp_path):
    size = SIZE - 1000
    data = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8).tobytes()
    r = Replica(BlockTarget(str(tmp_path / "t.img"), need_size=size), str(tmp_path / "state"))
    r.begin("s1", size, 1, "full", 0)
    r.apply_data(0, size, 0, _digests(data), data)
    r.finish(1)
    new = bytearray(data)
    last = size // FINE_BLOCK
    new[last * FINE_BLOCK:] = b"\x09" * (size - last * FINE_BLOCK)
    new[5 * FINE_BLOCK] ^= 0xFF
    new = bytes(new)
    r.begin("s1", size, 2, "sync", 0)
    digests, payload = _set_payload(new, [5, last])
    assert len(payload) == FINE_BLOCK + size - last * FINE_BLOCK
    r.apply_set(5 * FINE_BLOCK, np.array([0, last - 5]), 0, digests, payload)
    r.finish(2)
    assert open(tmp_path / "t.img", "rb").read() == new


def test_direct_target_writes_long_runs_past_the_page_cache_and_the_rest_through_it(tmp_path):
    from smsrepl.blocks import target as device

    size = (6 << 20) + 1234
    rng = np.random.default_rng(8)
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    t = BlockTarget(str(tmp_path / "t.img"), need_size=size, direct=True)
    if not t.direct:
        pytest.skip("this file system does not take O_DIRECT")
    t.write(0, data[:5 << 20])  # long and aligned: direct, across two staging buffers
    t.write(5 << 20, data[5 << 20:(5 << 20) + 8192])  # short: page cache
    t.write((5 << 20) + 8192, data[(5 << 20) + 8192:])  # long with an unaligned tail
    t.flush()
    t.close()
    assert open(tmp_path / "t.img", "rb").read() == data
    assert device.DIRECT_MIN <= 5 << 20


def test_data_frame_as_carried_is_checked_against_its_frame_digest(tmp_path):
    from smsrepl.protocol.frames import frame_digest

    rng = np.random.default_rng(12)
    data = bytearray(rng.integers(0, 256, 4 * FINE_BLOCK, dtype=np.uint8).tobytes())
    data[FINE_BLOCK:2 * FINE_BLOCK] = bytes(FINE_BLOCK)
    data = bytes(data)
    d = _digests(data)
    zeros = d == 0
    payload = data[:FINE_BLOCK] + data[2 * FINE_BLOCK:]
    r = _replica(tmp_path)
    r.begin("s1", SIZE, 1, "full", 0)
    bad = bytearray(payload)
    bad[100] ^= 1
    with pytest.raises(DecompressionError, match="frame at offset 0 does not match its digest"):
        r.apply_data(0, len(data), 0, None, bytes(bad), zeros=zeros, check=frame_digest(d))
    with pytest.raises(DecompressionError):  # a block the map calls non-zero arrives as zeros
        r.apply_data(0, 2 * FINE_BLOCK, 0, None, bytes(2 * FINE_BLOCK), zeros=np.zeros(2, dtype=bool),
                     check=frame_digest(np.zeros(2, dtype="<u8")))
    r.apply_data(0, len(data), 0, None, payload, zeros=zeros, check=frame_digest(d))
    r.finish(1)
    assert open(tmp_path / "t.img", "rb").read(len(data)) == data
    assert np.array_equal(r.manifest.read_fine(0, 4), d)


@pytest.mark.parametrize("codec", [0, 1])
def test_direct_target_frames_decoded_in_place_and_bad_ones_write_nothing(tmp_path, codec):
    # solid frames are decompressed straight into the direct writer's buffer: a frame that
    # fails its digest must leave the target untouched and give the buffer back
    from smsrepl.blocks import direct
    from smsrepl.codec import Compressor
    from smsrepl.protocol.frames import frame_digest

    size = 8 << 20
    rng = np.random.default_rng(13)
    data = rng.integers(0, 256, size, dtype=np.uint8)
    data[: size // 2] = np.resize(np.frombuffer(b"text-like data ", dtype=np.uint8), size // 2)
    data = data.tobytes()
    t = BlockTarget(str(tmp_path / "t.img"), need_size=size, direct=True)
    if not t.direct:
        pytest.skip("this file system does not take O_DIRECT")
    r = Replica(t, str(tmp_path / "state"))
    r.begin("s1", size, 1, "full", 0)
    comp = Compressor(3) if codec else None
    half = size // 2

    def payload(chunk):
        if comp is None:
            return chunk
        c, p = comp.encode(chunk)
        assert c == 1
        return bytes(p)

    good = payload(data[:half])
    d0 = _digests(data[:half])
    for _ in range(direct.STAGES + 1):  # more failures than buffers: none may leak
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0x40
        with pytest.raises(DecompressionError):
            r.apply_data(0, half, codec, None, bytes(bad), zeros=np.zeros(len(d0), dtype=bool),
                         check=frame_digest(d0))
    t.drain()
    assert open(tmp_path / "t.img", "rb").read(half) == bytes(half)  # nothing of a bad frame
    if codec:  # a payload that decompresses to more than the frame says
        long = comp.encode(data[:half] + data[:FINE_BLOCK])[1]
        with pytest.raises(DecompressionError, match="more than"):
            r.apply_data(0, half, codec, None, bytes(long), zeros=np.zeros(len(d0), dtype=bool),
                         check=frame_digest(d0))
    r.apply_data(0, half, codec, None, good, zeros=np.zeros(len(d0), dtype=bool), check=frame_digest(d0))
    rest = data[half:]
    r.apply_data(half, half, 0, _digests(rest), rest)
    r.finish(1)
    assert open(tmp_path / "t.img", "rb").read() == data


@pytest.mark.parametrize("codec", [0, 1])
def test_a_frame_with_zero_blocks_is_built_in_the_write_buffer_without_a_fresh_one(tmp_path, monkeypatch, codec):
    """A frame whose payload leaves out zero blocks is decoded into the replica's own buffer
    (compressed) or read from the payload (raw), and its blocks spread straight into the direct
    writer's buffer: no buffer the size of the frame is allocated, no second copy is made."""
    import tracemalloc

    from smsrepl.codec import Compressor

    rng = np.random.default_rng(5)
    blocks = SIZE // FINE_BLOCK
    data = np.frombuffer(bytes(range(256)) * (SIZE // 256), dtype=np.uint8).copy()
    data.reshape(blocks, FINE_BLOCK)[:, 0] = rng.integers(1, 256, blocks, dtype=np.uint8)
    zero = rng.random(blocks) < 0.4
    data.reshape(blocks, FINE_BLOCK)[zero] = 0
    digests = _digests(data.tobytes())
    payload = data.reshape(blocks, FINE_BLOCK)[~zero].tobytes()
    if codec:
        got_codec, payload = Compressor(2).encode(payload)
        assert got_codec == codec
    r = Replica(BlockTarget(str(tmp_path / "t.img"), need_size=SIZE, direct=True), str(tmp_path / "state"))
    if not r.target.direct:
        pytest.skip("no direct I/O on this file system")
    r.begin("s1", SIZE, 1, "full", 0)

    def no_write_run(*args):
        raise AssertionError("the frame went through a separate buffer")

    monkeypatch.setattr(r, "_write_run", no_write_run)
    tracemalloc.start()
    try:
        r.apply_data(0, SIZE, codec, digests, payload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    r.finish(1)
    assert open(tmp_path / "t.img", "rb").read() == data.tobytes()
    assert peak < 1 << 20


def _no_space(*args, **kwargs):
    raise OSError(28, os.strerror(28))


@pytest.mark.parametrize("where", ["manifest", "record"])
def test_a_full_state_directory_is_a_target_write_error_that_names_it_and_keeps_the_checkpoint(
        tmp_path, monkeypatch, where):
    """The receiver's state directory full (its file system, or a quota): the manifest's digests
    or the round's record cannot be written at a checkpoint. That is SMS.2007 (the sender exits
    3 and reruns later), saying where, not a receiver's internal error; the checkpoint stays
    where it was durable."""
    r, data = _first_mib_durable_second_not(tmp_path, 9)
    if where == "manifest":
        monkeypatch.setattr("smsrepl.blocks.manifest._pwrite_all", _no_space)
    else:
        monkeypatch.setattr("smsrepl.blocks.replica.write_json_atomic", _no_space)
    with pytest.raises(TargetWriteError) as err:
        r.checkpoint()
    assert err.value.code == "SMS.2007"
    assert str(tmp_path / "state") in err.value.message and "No space left on device" in err.value.message
    monkeypatch.undo()
    r.close()
    r2 = _replica(tmp_path)
    assert r2.describe("s1", SIZE)["checkpoint"] == 1 << 20


def test_a_full_state_directory_at_a_rounds_begin_is_a_target_write_error(tmp_path, monkeypatch):
    r = _replica(tmp_path)
    monkeypatch.setattr("smsrepl.blocks.manifest._pwrite_all", _no_space)
    monkeypatch.setattr("os.pwrite", _no_space)
    with pytest.raises(TargetWriteError) as err:
        r.begin("s1", SIZE, 1, "full", 0)
    assert err.value.code == "SMS.2007" and str(tmp_path / "state") in err.value.message


@pytest.mark.parametrize("kind", ["full", "sync"])
def test_a_session_that_begins_no_round_keeps_the_checkpoint_of_a_cut_one(tmp_path, kind):
    """A session ends with a checkpoint (close(), ended()): one that began no round (a consistency
    check, a dry run, a sender cut before its ROUND_BEGIN) found the cut round's checkpoint on
    disk, not its own position (0), and recorded 0: the next resume of a first copy started over."""
    data = np.random.default_rng(10).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    if kind == "full":
        r = _replica(tmp_path)
        r.begin("s1", SIZE, 1, "full", 0)
    else:
        r, _ = _full_copy(tmp_path, data)
        r.begin("s1", SIZE, 2, "sync", 0)
    r.apply_data(0, 1 << 20, 0, _digests(data[:1 << 20]), data[:1 << 20])
    assert r.checkpoint() == 1 << 20
    r.close()
    r.target.close()
    r2 = _replica(tmp_path)
    assert r2.checkpoint() == 1 << 20
    r2.close()
    r2.target.close()
    assert _replica(tmp_path).describe("s1", SIZE)["checkpoint"] == 1 << 20


@pytest.mark.parametrize("where", ["target", "manifest"])
def test_after_a_failed_sync_no_later_checkpoint_of_the_session_is_recorded(tmp_path, monkeypatch, where):
    """A failed fdatasync of the target (or fsync of the manifest) is reported once: the pages it
    could not write are clean now, and a second sync succeeds without them. The session's last
    checkpoint (close(), ended()) must not then record the data, or its digests, as durable."""
    r, data = _first_mib_durable_second_not(tmp_path, 11)
    failed = []

    def fails_once(fd):
        if not failed:
            failed.append(fd)
            raise OSError(5, os.strerror(5))

    monkeypatch.setattr("os.fdatasync" if where == "target" else "os.fsync", fails_once)
    with pytest.raises(TargetWriteError):
        r.checkpoint()
    assert failed
    with pytest.raises(TargetWriteError):
        r.checkpoint()  # what the session's end does: the sync would succeed now
    monkeypatch.undo()
    r.close()
    r.target.close()
    assert _replica(tmp_path).describe("s1", SIZE)["checkpoint"] == 1 << 20
