"""TLS over a socket through memory BIOs, safe for one reader and one writer thread.

OpenSSL forbids using one SSL object from two threads at once, and Python's
SSLSocket releases the GIL inside SSL_read and SSL_write, so a reader thread
and a writer thread on one SSLSocket can corrupt the session (seen here as
sporadic "closed by the peer" in mid-transfer). Here every call into the SSL
object happens under one lock, while the blocking socket I/O happens outside
it; ciphertext leaves in the order the SSL object produced it because only
the (serialised) writers drain the outgoing BIO.
"""
from __future__ import annotations

import socket
import ssl
import threading
from typing import cast

RECV_SIZE = 1 << 20
#: plaintext per SSL write: each ciphertext buffer (a fresh bytes) stays below glibc's
#: default mmap threshold (128 KiB), so malloc reuses its memory. At 256 KiB a loopback full
#: copy of 1 GiB took ~11,000 more page faults and ~2% more CPU (medians of 8 alternating runs)
WRITE_SLICE = 64 << 10


class TLSStream:
    def __init__(self, raw: socket.socket, context: ssl.SSLContext, *, server_side: bool) -> None:
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self._in, self._out, server_side=server_side)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        # ciphertext lands here, read by one thread at a time (the Channel's receiver): a fresh
        # 1 MiB bytes per recv() was a fresh mapping, faulted in page by page (3% of a receiver)
        self._rbuf = bytearray(RECV_SIZE)

    # --- handshake (one thread) ---------------------------------------------
    def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send_pending()
                data = self.raw.recv(RECV_SIZE)
                if not data:
                    raise ConnectionResetError("connection closed during the TLS handshake")
                self._in.write(data)
            except ssl.SSLError:
                # the alert that says why (a certificate refused) is in the outgoing BIO: send it,
                # or the peer sees only the connection end and takes it for a network failure
                try:
                    self._send_pending()
                except OSError:
                    pass
                raise
        self._send_pending()

    def _send_pending(self) -> None:
        out = self._out.read()
        if out:
            self.raw.sendall(out)

    # --- the SSLSocket-like surface Channel uses ----------------------------
    def sendall(self, data) -> None:
        view = memoryview(data).cast("B")
        with self._send_lock:
            for i in range(0, len(view), WRITE_SLICE):
                with self._lock:
                    self.obj.write(view[i:i + WRITE_SLICE])
                    out = self._out.read()
                self.raw.sendall(out)

    def recv_into(self, buf) -> int:
        """Read up to len(buf) bytes: every record already received, or block for the next one."""
        view = memoryview(buf).cast("B")
        while True:
            got = 0
            with self._lock:
                try:
                    # one SSL read returns at most one 16 KiB record: drain what has arrived
                    while got < len(view):
                        # with a buffer, read() returns the count (typeshed knows only the bytes form)
                        n = cast(int, self.obj.read(len(view) - got, view[got:]))
                        if not n:
                            return got  # end of stream
                        got += n
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    return got
            if got:
                return got
            n = self.raw.recv_into(self._rbuf)
            with self._lock:
                if n:
                    self._in.write(memoryview(self._rbuf)[:n])
                else:
                    self._in.write_eof()

    def settimeout(self, value: float | None) -> None:
        self.raw.settimeout(value)

    def version(self) -> str | None:
        return self.obj.version()

    def getpeercert(self, binary_form: bool = False):
        return self.obj.getpeercert(binary_form)

    def close(self) -> None:
        try:
            self.raw.close()
        except OSError:
            pass
