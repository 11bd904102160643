"""Golden frames: fixed events whose wire bytes are pinned, so the wire format cannot drift silently.

A deliberate format change updates these digests together with the layout in
frames.py (and PROTOCOL_VERSION once a release has shipped). Version 2 changed every
frame's check from XXH32 to XXH3-64's low 32 bits.
"""
import numpy as np
import pytest
import xxhash

from smsrepl import kernels
from smsrepl.protocol import frames as F


def _events():
    rng = np.random.default_rng(2024)
    data = bytearray(rng.integers(0, 256, 5 * 4096 - 100, dtype=np.uint8).tobytes())
    data[4096:8192] = bytes(4096)
    d = np.empty(5, dtype="<u8")
    kernels.block_digests(bytes(data), 4096, d)
    payload = bytes(data[:4096] + data[8192:])
    return {
        "BlockData": F.BlockData(1 << 20, len(data), 0, d, payload),
        "BlockSet": F.BlockSet(2 << 20, np.array([0, 3, 7]), 0, d[[0, 2, 3]], bytes(data[:4096]) + bytes(data[8192:16384])),
        "ZeroRange": F.ZeroRange(3 << 20, 65536),
        "Scanned": F.Scanned(4 << 20),
        "RoundBegin": F.RoundBegin(2, "sync", 0),
        "Ping": F.Ping(7, 123456789, 32),
    }


GOLDEN = {
    "BlockData": (16329, "e0f4ef4601ab60ef"),
    "BlockSet": (12352, "cb4716ccbf74f403"),
    "ZeroRange": (28, "036c88f5a8c8b3e5"),
    "Scanned": (20, "ecf80b8a6608bc1a"),
    "RoundBegin": (50, "d21ea536da39f451"),
    "Ping": (60, "ae084049fe645e67"),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_frame_bytes_are_pinned(name):
    wire = b"".join(bytes(p) for p in F.encode(_events()[name]))
    assert (len(wire), xxhash.xxh3_64_hexdigest(wire)) == GOLDEN[name]
