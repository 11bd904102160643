"""A file round's progress follows its operations onto the socket (files.sentprogress)."""
import threading

import pytest

from smsrepl.codec import Compressor
from smsrepl.files.opstream import OpStream
from smsrepl.files.sentprogress import SentProgress
from smsrepl.protocol import frames as F

MiB = 1 << 20


class Socket:
    """The channel's side of an OpStream: each frame waits until the test lets it go, and
    the test says how many of its frame bytes (frame_size) went so far."""

    def __init__(self) -> None:
        self.frame_bytes_queued = 0
        self.sent = 0
        self.go = threading.Semaphore(0)
        self.began = threading.Semaphore(0)

    def frame_bytes_sent(self) -> int:
        return self.sent

    def send(self, frame) -> None:
        self.frame_bytes_queued += F.frame_size(frame)
        self.began.release()
        assert self.go.acquire(timeout=10)
        self.sent = self.frame_bytes_queued


def near(n: int) -> object:
    return pytest.approx(n, abs=100)  # a frame's 64 bytes beyond its payload


def test_progress_moves_with_the_socket_not_with_the_reads():
    sock = Socket()
    ops = OpStream(sock.send, Compressor(0), wire=sock)
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
        sock.sent = MiB  # a quarter of the 4 MiB frame on the socket: a third of the first file
        assert sent.sent() == near(MiB)
        sock.sent = 3 * MiB + 64  # the first file went: the unchanged one counts with it
        assert sent.sent() == near(8 * MiB)
        sock.sent = 3 * MiB + MiB // 2  # half the file being read went: byte for byte
        assert sent.sent() == near(8 * MiB + MiB // 2)
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
    ops = OpStream(sock.send, Compressor(0), wire=sock)
    sent = SentProgress(ops)
    try:
        ops.add([b"h" * 1000])  # a directory's batch: headers and 2 MiB of small files
        ops.add([b"d" * (2 * MiB - 1000)])
        sent.entry_done(2 * MiB - 1000)
        ops.flush()
        assert sock.began.acquire(timeout=10)
        sock.sent = MiB  # half the batch: half its file bytes
        assert sent.sent() == near((2 * MiB - 1000) // 2)
        sock.go.release()
        ops.drain()
        assert sent.sent() == 2 * MiB - 1000
    finally:
        sock.go.release()
        ops.close()
