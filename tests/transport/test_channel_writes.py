"""How the Channel writes: a large frame leaves in slices, counted in wire_sent as each goes
(progress moves while a frame crosses a slow link), with or without a speed limit."""
import numpy as np

from smsrepl.transport.channel import THROTTLE_SLICE, UNPACED_SLICE, Channel

from tests.protocol.test_connection import block, pair_in_round


class RecordingStream:
    """A TLSStream stand-in that records, at each write, its size and the channel's wire_sent."""

    def __init__(self) -> None:
        self.chan: Channel | None = None
        self.writes: list[tuple[int, int]] = []

    def sendall(self, data) -> None:
        assert self.chan is not None
        self.writes.append((len(memoryview(data).cast("B")), self.chan.wire_sent))


class Limiter:
    """A limit that applies and lets every byte through at once (pays are recorded)."""

    def __init__(self) -> None:
        self.paid: list[int] = []

    def current(self):
        return (100.0, None)

    def throttle(self, n: int) -> None:
        self.paid.append(n)


def _send_4mib(limiter=None) -> tuple[Channel, RecordingStream]:
    data = np.random.default_rng(4).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    s, _ = pair_in_round()
    stream = RecordingStream()
    chan = stream.chan = Channel(stream, s)
    chan.limiter = limiter
    chan.send(block(0, data))
    return chan, stream


def test_a_large_frame_is_counted_slice_by_slice_without_a_limit():
    chan, stream = _send_4mib()
    sizes = [n for n, _ in stream.writes]
    assert max(sizes) <= UNPACED_SLICE
    assert sum(sizes) == chan.wire_sent > 4 << 20
    # each write began once what went before it was counted
    assert [w for _, w in stream.writes] == [sum(sizes[:i]) for i in range(len(sizes))]


def test_a_large_frame_under_a_limit_is_paid_and_counted_in_smaller_slices():
    limiter = Limiter()
    chan, stream = _send_4mib(limiter)
    sizes = [n for n, _ in stream.writes]
    assert max(sizes) <= THROTTLE_SLICE
    assert sum(limiter.paid) == sum(sizes) == chan.wire_sent
    assert [w for _, w in stream.writes] == [sum(sizes[:i]) for i in range(len(sizes))]


def test_what_the_kernel_holds_unacknowledged_is_not_counted_as_sent():
    import socket
    import threading
    import time

    data = np.random.default_rng(5).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    server = socket.create_server(("127.0.0.1", 0))
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # a peer that takes little
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    try:
        s, _ = pair_in_round()
        chan = Channel(client, s)
        sender = threading.Thread(target=chan.send, args=(block(0, data),))
        sender.start()
        deadline = time.monotonic() + 10
        while chan.unacknowledged() < 64 << 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        # the peer reads nothing: the kernel holds what it took (and only more of it, as the
        # slice being written goes in), none of which counts as sent
        assert chan.unacknowledged() >= 64 << 10
        assert chan.frame_bytes_sent() <= chan.wire_sent - (64 << 10)
        reader = threading.Thread(target=lambda: [None for _ in iter(lambda: peer.recv(1 << 20), b"")])
        reader.start()  # the peer reads it all now
        sender.join(10)
        client.shutdown(socket.SHUT_WR)
        reader.join(10)
        while chan.unacknowledged() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert chan.frame_bytes_sent() == chan.frame_bytes_queued
    finally:
        client.close()
        peer.close()
        server.close()
