"""Codec: frame window, and the adaptive level choice against simulated links."""
import os
import random

import pytest
import zstandard

from smsrepl.codec import (FRAME_SIZE, RAW, SAMPLE, SAMPLES, ZSTD, AdaptiveChoice, Compressor,
                           Decompressor)


def _text(seed: int, alphabet: bytes, size: int) -> bytes:
    """``size`` bytes drawn at random from ``alphabet``: text that compresses, but not to nothing."""
    return bytes(random.Random(seed).choices(alphabet, k=size))


def test_a_frame_is_compressed_with_a_window_spanning_the_whole_frame(zstd_backend):
    # 1 MiB of random text, repeated 4 MiB later: only a window over the whole frame sees it
    rng = random.Random(5)
    part = bytes(rng.choices(b"abcdefghij klmnop\n", k=1 << 20))
    data = part + os.urandom(3 << 20) + part + os.urandom(3 << 20)
    assert len(data) == FRAME_SIZE
    codec, payload = Compressor(1).encode(data)
    assert codec == ZSTD
    assert zstandard.get_frame_parameters(payload).window_size >= FRAME_SIZE
    # the repeat costs next to nothing: about the random 6 MiB plus the first copy, compressed
    assert len(payload) < (6 << 20) + (1 << 20) * 0.7
    assert bytes(Decompressor().decode(codec, payload, len(data))) == data


def test_incompressible_data_goes_raw(zstd_backend):
    data = os.urandom(1 << 20)
    assert Compressor(3).encode(data) == (RAW, data)


@pytest.fixture(params=["libzstd", "python-zstandard"])
def zstd_backend(request, monkeypatch):
    """Compressors made in the test use the system's libzstd, or python-zstandard as where
    there is none."""
    from smsrepl import libzstd

    if request.param == "libzstd" and libzstd.library() is None:
        pytest.skip("no libzstd.so.1 here")
    if request.param == "python-zstandard":
        monkeypatch.setattr(libzstd, "library", lambda: None)
    assert Compressor(2).backend == request.param
    return request.param


def test_a_payload_whose_samples_do_not_compress_is_sent_raw_without_compressing_it(zstd_backend, monkeypatch):
    sizes = []
    real = Compressor._compress

    def counting(self, data, out, limit):
        sizes.append(len(data))
        return real(self, data, out, limit)

    monkeypatch.setattr(Compressor, "_compress", counting)
    comp = Compressor(2)
    data = os.urandom(2 << 20)
    assert comp.encode(data) == (RAW, data)
    assert sizes == [SAMPLES * SAMPLE]  # only the samples were compressed
    # one compressible eighth among random ones is worth compressing the whole for
    text = _text(1, b"abc def\n", 256 << 10)
    mixed = data[:7 << 18] + text
    sizes.clear()
    codec, payload = comp.encode(mixed)
    assert codec == ZSTD and sizes == [SAMPLES * SAMPLE, len(mixed)]
    assert bytes(Decompressor().decode(codec, payload, len(mixed))) == mixed


#: level -> (wire bytes per source byte, source bytes per second through one compressor)
LEVELS = {0: (1.0, None), 1: (0.40, 400e6), 3: (0.30, 150e6)}


def _drive(choice: AdaptiveChoice, link: float, frames: int = 400, buffered: bool = False) -> list[int]:
    """Feed the choice what a link of ``link`` wire bytes/s and the compressors above would measure.

    With ``buffered``, every other frame finds a drained 4 MiB socket buffer and its first
    4 MiB go out at once, as happens when the sender waits on its compressors."""
    picks = []
    for n in range(frames):
        level = choice.choose()
        picks.append(level)
        ratio, comp = LEVELS[level]
        nbytes = 8 << 20
        if comp:
            choice.record_compress(level, nbytes, nbytes / comp)
        wire = int(nbytes * ratio)
        waits = max(0, wire - (4 << 20)) if buffered and n % 2 else wire
        choice.record_send(level, nbytes, wire, waits / link)
    return picks


@pytest.mark.parametrize("buffered", [False, True])
@pytest.mark.parametrize("link, best", [
    (10e9, 0),     # faster than any compressor: raw
    (200e6, 1),    # level 1 (2 x 400 MB/s, 500 MB/s through the link) beats raw (200) and 3 (300)
    (12.5e6, 3),   # 100 Mbit/s: every byte saved counts
])
def test_auto_settles_on_the_fastest_level_for_the_link_and_keeps_probing(link, best, buffered):
    choice = AdaptiveChoice(2, tuple(LEVELS))
    picks = _drive(choice, link, buffered=buffered)
    tail = picks[100:]
    assert choice.best() == best, {lv: choice.rate(lv) for lv in LEVELS}
    assert tail.count(best) >= 0.9 * len(tail)
    # the probes still try each other level now and then
    assert set(tail) == set(LEVELS)


def test_auto_follows_a_change_of_link():
    choice = AdaptiveChoice(2, tuple(LEVELS))
    _drive(choice, 10e9)
    assert choice.best() == 0
    picks = _drive(choice, 12.5e6)
    assert choice.best() == 3 and picks[-50:].count(3) >= 45


def test_compressing_then_sending_on_one_thread_adds_the_two_times():
    # 300 MB/s link: pipelined, level 3 (2 x 150 MB/s) would tie raw; one thread doing both
    # (1 / (1/1000 + 1/150) MB/s = 130 MB/s) loses to raw at 300 MB/s
    choice = AdaptiveChoice(1, (0, 3), pipelined=False)
    _drive(choice, 300e6, frames=100)
    assert choice.best() == 0
    assert choice.rate(3) == pytest.approx(1 / (0.30 / 300e6 + 1 / 150e6), rel=0.01)


def test_auto_needs_two_levels():
    with pytest.raises(ValueError):
        AdaptiveChoice(2, (3, 3))


def test_encode_into_writes_the_frame_into_the_given_buffer(zstd_backend):
    text = _text(2, b"abcdefgh ijk\n", 2 << 20)
    out = bytearray(FRAME_SIZE)
    comp = Compressor(2)
    codec, payload = comp.encode_into(text, out)
    assert codec == ZSTD and isinstance(payload, memoryview) and payload.obj is out
    assert zstandard.get_frame_parameters(payload).content_size == len(text)
    assert bytes(Decompressor().decode(codec, payload, len(text))) == text
    # about what the one-shot way makes
    assert abs(len(payload) - len(comp.encode(text)[1])) < 1024


def test_encode_into_gives_up_on_a_frame_that_outgrows_the_saving_and_the_next_is_whole(zstd_backend):
    comp = Compressor(2)
    # samples compress (text), the whole does not save MIN_SAVING: random between the samples
    rng = random.Random(3)
    step = (1 << 20) // SAMPLES
    data = bytearray(os.urandom(1 << 20))
    for i in range(SAMPLES):
        data[i * step:i * step + SAMPLE] = bytes(rng.choices(b"ab", k=SAMPLE))
    data = bytes(data)
    codec, payload = comp.encode_into(data, bytearray(FRAME_SIZE))
    assert (codec, payload) == (RAW, data)
    # a buffer too small for even a good frame: raw, and the compressor is not left mid-frame
    text = bytes(rng.choices(b"abcd efg\n", k=1 << 20))
    assert comp.encode_into(text, bytearray(1000)) == (RAW, text)
    codec, payload = comp.encode_into(text, bytearray(FRAME_SIZE))
    assert codec == ZSTD and bytes(Decompressor().decode(codec, payload, len(text))) == text


def test_a_payload_of_wider_items_is_compressed_whole(zstd_backend):
    # a numpy array or memoryview of 8-byte items: len() counts items, the frame must hold
    # every byte (libzstd compressed only the first len() bytes, python-zstandard raised)
    import numpy as np

    text = _text(4, b"abcdefgh ijk\n", 256 << 10)
    for data in (np.frombuffer(text, dtype="<u8"), memoryview(text).cast("Q"),
                 np.frombuffer(text, dtype=np.uint8).reshape(64, -1)):
        codec, payload = Compressor(2).encode(data)
        assert codec == ZSTD and bytes(Decompressor().decode(codec, payload, len(text))) == text
        codec, payload = Compressor(2).encode_into(data, bytearray(len(text)))
        assert codec == ZSTD and bytes(Decompressor().decode(codec, payload, len(text))) == text
