"""How the Channel reads: a large frame's body in place, only small reads through the
connection's buffer."""
import numpy as np

from smsrepl.protocol import Connection, Scanned
from smsrepl.transport.channel import HEAD_READ, Channel

from tests.protocol.test_connection import block, pair_in_round


class RecordingStream:
    """A TLSStream stand-in that hands out ``wire`` and records each read's buffer size and
    whether it was the frame body the connection offered."""

    def __init__(self, wire: bytes, conn: Connection) -> None:
        self.wire, self.pos, self.conn = wire, 0, conn
        self.reads: list[tuple[int, bool]] = []

    def recv_into(self, buf) -> int:
        view = memoryview(buf).cast("B")
        body = self.conn.receive_buffer()
        in_body = body is not None and view.obj is body.obj
        self.reads.append((len(view), in_body))
        n = min(len(view), len(self.wire) - self.pos)
        view[:n] = self.wire[self.pos:self.pos + n]
        self.pos += n
        return n


def test_a_large_body_is_read_in_place_and_other_reads_are_small():
    data = np.random.default_rng(3).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    s, r = pair_in_round()
    events = (block(0, data), Scanned(8 << 20), block(8 << 20, data))
    wire = b"".join(b"".join(bytes(p) for p in s.send(ev)) for ev in events)
    stream = RecordingStream(wire, r)
    chan = Channel(stream, r)
    got = [chan.recv() for _ in events]
    assert [type(e) for e in got] == [type(e) for e in events]
    assert bytes(got[0].payload) == data and bytes(got[2].payload) == data
    outside = [n for n, in_body in stream.reads if not in_body]
    assert max(outside) <= HEAD_READ
    # all but the first read's share of each body went in place
    assert sum(n for n, in_body in stream.reads if in_body) >= 2 * (len(data) - HEAD_READ)
