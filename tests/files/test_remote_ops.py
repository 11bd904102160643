"""OpStream's adaptive compression: compressed only while that moves data faster than raw."""
import dataclasses
import time

from smsrepl.codec import RAW, ZSTD, Compressor, Decompressor
from smsrepl.files.opstream import OpStream


def on_the_wire(ev):
    """The frame as the receiver gets it: a channel writes it before send() returns, and the
    sender reuses its buffers afterwards."""
    return dataclasses.replace(ev, payload=bytes(ev.payload))


TEXT = b" ".join(b"word%d" % (i % 97) for i in range(200_000))  # ~1.3 MB, compresses well


def _run(send_seconds_per_byte: float, batches: int = 40, adaptive: bool = True) -> tuple[list, OpStream]:
    frames = []

    def send(ev):
        time.sleep(len(ev.payload) * send_seconds_per_byte)  # a link of a given speed
        frames.append(on_the_wire(ev))

    ops = OpStream(send, Compressor(3), adaptive=adaptive)
    try:
        for _ in range(batches):
            ops.add([TEXT])
            ops.flush()
        ops.drain()
    finally:
        ops.close()
    dec = Decompressor()
    for ev in frames:  # whatever was chosen, every frame decodes to what was batched
        assert bytes(dec.decode(ev.codec, ev.payload, ev.raw_len)) == TEXT
    return frames, ops


def _slow_cpu(monkeypatch, rate: float) -> None:
    """Compression at ``rate`` bytes per second: a fast link measured against a free
    compressor is a coin toss on a busy machine (zstd takes this text at GB/s)."""
    encode = Compressor.encode_into

    def slow_encode(self, data, out):
        time.sleep(len(data) / rate)
        return encode(self, data, out)

    monkeypatch.setattr(Compressor, "encode_into", slow_encode)


#: the rates the two cases are built from. The choice rests on one or two timed frames of each
#: kind, so each case makes the losing way ~100x slower than the winning one: a busy machine
#: (a thread preempted for tens of ms, zstd at a fraction of its idle speed) cannot flip it. At
#: 20-25 MB/s the two ways were within a few tens of ms of each other and load did flip it.
SLOW = 2e6  # bytes per second: a 1.3 MB batch takes 0.65 s


def test_a_fast_link_gets_raw_frames_and_a_slow_one_compressed_frames(monkeypatch):
    with monkeypatch.context() as m:
        _slow_cpu(m, SLOW)  # a raw frame (appended to a list) loses only to a 0.65 s stall
        fast, ops = _run(0.0)
    assert sum(ev.codec == RAW for ev in fast) > 0.8 * len(fast), ops.rates
    # a raw frame takes 0.65 s; compressing it (zstd at level 3, ratio ~1/100) takes ms
    slow, ops = _run(1 / SLOW)
    assert sum(ev.codec == ZSTD for ev in slow) > 0.8 * len(slow), ops.rates
    # the minority are the probes that keep measuring the other way
    assert any(ev.codec == RAW for ev in slow)


def test_without_adaptation_every_frame_is_compressed():
    frames, _ = _run(0.0, batches=6, adaptive=False)
    assert all(ev.codec == ZSTD for ev in frames)


def test_operations_that_trickle_in_leave_before_the_batch_is_full(monkeypatch):
    """A sync round's few changed files: a batch goes once its first operation is BATCH_AGE
    old, so the receiver applies them as the round goes, not all at its end."""
    from smsrepl.files import opstream

    monkeypatch.setattr(opstream, "BATCH_AGE", 0.5)  # a loaded machine may pause for some ms
    frames = []
    ops = OpStream(lambda ev: frames.append(on_the_wire(ev)), Compressor(1))
    try:
        ops.add([b"a" * 100])
        ops.add([b"b" * 100])
        assert ops.size == 200 and not frames  # both in one young batch
        time.sleep(opstream.BATCH_AGE * 2)
        ops.add([b"c" * 100])  # the batch is old now: it goes with this one
        assert ops.size == 0
        ops.add([b"d" * 100])
        ops.drain()
    finally:
        ops.close()
    dec = Decompressor()
    assert [bytes(dec.decode(ev.codec, ev.payload, ev.raw_len)) for ev in frames] == [
        b"a" * 100 + b"b" * 100 + b"c" * 100, b"d" * 100]


def test_compressed_batches_are_written_into_one_buffer_of_the_worker():
    """A fresh buffer per compressed batch was faulted in page by page; the worker compresses
    into its own, reused once the channel has written the frame."""
    holders = []

    def send(ev):
        if ev.codec == ZSTD:
            holders.append(ev.payload.obj)

    ops = OpStream(send, Compressor(2))
    try:
        for _ in range(5):
            ops.add([TEXT])
            ops.flush()
        ops.drain()
    finally:
        ops.close()
    assert len(holders) == 5 and all(h is holders[0] for h in holders)
