"""A file round's progress follows its operations onto the socket (files.sentprogress)."""
import threading

from smsrepl.codec import Compressor
from smsrepl.files.opstream import OpStream
from smsrepl.files.sentprogress import SentProgress

MiB = 1 << 20


class Socket:
    """The channel's side of an OpStream: each frame waits until the test lets it go; ``written``
    is what the test says the socket has taken so far."""

    def __init__(self) -> None:
        self.written = 0
        self.frames: list = []
        self.go = threading.Semaphore(0)
        self.began = threading.Semaphore(0)

    def send(self, frame) -> None:
        self.began.release()
        assert self.go.acquire(timeout=10)
        self.frames.append(frame)
        self.written += len(frame.payload)


def test_progress_moves_with_the_socket_not_with_the_reads():
    sock = Socket()
    ops = OpStream(sock.send, Compressor(0), written=lambda: sock.written)
    sent = SentProgress(ops)
    try:
        ops.add([b"a" * (3 * MiB)])
        sent.entry_done(3 * MiB)  # a 3 MiB file read into the stream
        sent.entry_done(5 * MiB)  # an unchanged 5 MiB file: nothing to send
        ops.add([b"b" * MiB])  # a file being read: no mark yet
        assert sent.done == 8 * MiB
        assert sent.sent() == 0  # all of it is still in the stream
        ops.flush()
        assert sock.began.acquire(timeout=10)
        assert sent.sent() == 0  # the frame began, nothing of it went yet
        sock.written = MiB  # a quarter of the 4 MiB frame on the socket: a third of the first file
        assert sent.sent() == MiB
        sock.written = 3 * MiB  # the first file went: the unchanged one counts with it
        assert sent.sent() == 8 * MiB
        sock.written = 3 * MiB + MiB // 2  # half the file being read went: byte for byte
        assert sent.sent() == 8 * MiB + MiB // 2
        sock.go.release()
        ops.drain()
        assert sent.sent() == 9 * MiB
        sent.entry_done(MiB)  # that file is done: what went stays what is reported
        assert sent.sent() == 9 * MiB
    finally:
        sock.go.release()
        ops.close()


def test_progress_between_two_marks_is_shared_out_over_the_stream_between_them():
    sock = Socket()
    ops = OpStream(sock.send, Compressor(0), written=lambda: sock.written)
    sent = SentProgress(ops)
    try:
        ops.add([b"h" * 1000])  # a directory's batch: headers and 2 MiB of small files
        ops.add([b"d" * (2 * MiB - 1000)])
        sent.entry_done(2 * MiB - 1000)
        ops.flush()
        assert sock.began.acquire(timeout=10)
        sock.written = MiB  # half the batch: half its file bytes
        assert sent.sent() == (2 * MiB - 1000) // 2
        sock.go.release()
        ops.drain()
        assert sent.sent() == 2 * MiB - 1000
    finally:
        sock.go.release()
        ops.close()
