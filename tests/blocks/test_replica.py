import numpy as np
import pytest

from smsrepl import kernels
from smsrepl.blocks.device import BlockTarget
from smsrepl.blocks.manifest import FINE_BLOCK, UNKNOWN_DIGEST
from smsrepl.blocks.replica import INTENT_STEP, Replica
from smsrepl.errors import RemoteProtocolError, SizeMismatchError, TargetWriteError

SIZE = 4 << 20


def _digests(data):
    d = np.empty(-(-len(data) // FINE_BLOCK), dtype="<u8")
    kernels.block_digests(data, FINE_BLOCK, d)
    return d


def _replica(tmp_path):
    return Replica(BlockTarget(str(tmp_path / "t.img"), need_size=SIZE), str(tmp_path / "state"))


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
    data = np.random.default_rng(2).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    r = _replica(tmp_path)
    r.begin("s1", SIZE, 1, "full", 0)
    r.apply_data(0, 1 << 20, 0, _digests(data[:1 << 20]), data[:1 << 20])
    assert r.checkpoint() == 1 << 20
    r.apply_data(1 << 20, 1 << 20, 0, _digests(data[1 << 20:2 << 20]), data[1 << 20:2 << 20])
    r.close()  # crash: no checkpoint for the second MiB
    r2 = _replica(tmp_path)
    d = r2.describe("s1", SIZE)
    assert (d["state"], d["round_kind"], d["checkpoint"]) == ("partial", "full", 1 << 20)
    with pytest.raises(RemoteProtocolError):
        r2.begin("s1", SIZE, 1, "full", 2 << 20)
    r2.begin("s1", SIZE, 1, "full", 1 << 20)


def test_interrupted_sync_round_marks_its_intent_unknown(tmp_path):
    data = bytearray(np.random.default_rng(3).integers(0, 256, SIZE, dtype=np.uint8).tobytes())
    r, _ = _full_copy(tmp_path, bytes(data))
    r.begin("s1", SIZE, 2, "sync", 0)
    block = bytes(4096)[:0] + b"\x01" * 4096
    r.apply_data(8192, 4096, 0, _digests(block), block)
    r.checkpoint()
    r.apply_data(3 * 4096 * 64, 4096, 0, _digests(block), block)
    r.close()  # crash mid-round
    r2 = _replica(tmp_path)
    fine = r2.manifest.read_fine(0, r2.manifest.nblocks)
    assert fine[2] == _digests(block)[0]  # durable before the checkpoint
    intent_blocks = min(SIZE, 3 * 4096 * 64 + 4096 + INTENT_STEP) // FINE_BLOCK
    assert np.all(fine[3:intent_blocks] == UNKNOWN_DIGEST)
    d = r2.describe("s1", SIZE)
    assert (d["state"], d["round_kind"]) == ("partial", "sync")


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
