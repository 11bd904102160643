"""TLSStream's writes: what each socket write carries."""
import socket
import threading

import numpy as np

from smsrepl.lab.certs import make_bundle
from smsrepl.transport.tls import client_context, server_context
from smsrepl.transport.tlsio import TLSStream

#: glibc's default mmap threshold: a larger ciphertext buffer is mapped afresh (and faulted
#: in page by page) whenever malloc's dynamic threshold has not been raised above it
MMAP_THRESHOLD = 128 << 10


class RecordingSocket:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sizes: list[int] = []

    def sendall(self, data) -> None:
        self.sizes.append(len(data))
        self.sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_a_large_write_leaves_in_ciphertext_pieces_below_the_mmap_threshold():
    bundle = make_bundle()
    a, b = socket.socketpair()
    data = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    got = bytearray()

    def serve() -> None:
        server = TLSStream(b, server_context(bundle), server_side=True)
        server.handshake()
        buf = bytearray(1 << 20)
        while len(got) < len(data):
            n = server.recv_into(buf)
            if not n:
                return
            got.extend(buf[:n])

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        raw = RecordingSocket(a)
        client = TLSStream(raw, client_context(bundle), server_side=False)
        client.handshake()
        raw.sizes.clear()
        client.sendall(data)
        thread.join(10)
    finally:
        a.close()
        b.close()
    assert bytes(got) == data
    assert raw.sizes and max(raw.sizes) < MMAP_THRESHOLD
