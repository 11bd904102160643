"""The receiver's door: connections wait, without a thread, until they send their first bytes.

A connection costs the receiver a thread and a TLS handshake only once its
peer has said something (a TLS ClientHello). Until then it waits here, in one
selector with the listening socket: a flood of connections that say nothing
(500 of them slowed a legitimate copy tenfold when each took a thread and the
oldest were pushed out, to reconnect at once) costs a descriptor each and
nothing else. A connection that has said nothing within ``deadline`` seconds
is closed, and when ``limit`` wait already the oldest of them goes.

Each peer address may start ``rate`` TLS handshakes a second (``burst`` at
once): past that a connection is closed when it speaks, before it costs a
handshake. 500 peers that opened a TLS session, were refused and came back a
second later kept a core busy with handshakes; a sender from another address
does not notice them now. The rate is charged when a connection speaks, not
when it is accepted: silent connections cost no handshake, and charged at
accept, 250 of them dropped at their deadline and reconnecting at once used
up their address's rate, so that a legitimate sender from the same address
(one host, or behind one NAT) was turned away with them.
"""
from __future__ import annotations

import selectors
import socket
import time
from collections import OrderedDict
from collections.abc import Callable

#: peer addresses whose connection rate is remembered, at most (the least recent goes)
ADDRESSES = 4096


class WaitingRoom:
    def __init__(self, listener: socket.socket, *, limit: int, deadline: float,
                 on_drop: Callable[[str, tuple], None], rate: float = 20.0, burst: int = 64) -> None:
        self.listener = listener
        self.limit = limit
        self.deadline = deadline
        self.rate, self.burst = rate, burst
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # address -> [tokens, at]
        self.on_drop = on_drop  # (why, peer address): the receiver counts and says it
        self._sel = selectors.DefaultSelector()
        listener.setblocking(False)
        self._sel.register(listener, selectors.EVENT_READ, None)
        #: waiting sockets, oldest first: socket -> (accepted at, peer address)
        self._waiting: OrderedDict[socket.socket, tuple[float, tuple]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._waiting)

    def ready(self, timeout: float) -> list[tuple[socket.socket, tuple, float]]:
        """Connections whose peer has spoken: (socket, address, when it was accepted). Raises
        OSError once the listener is closed."""
        ready = []
        for key, _ in self._sel.select(timeout):
            if key.data is None:
                self._accept()
                continue
            raw = key.fileobj
            assert isinstance(raw, socket.socket)
            self._sel.unregister(raw)
            accepted, addr = self._waiting.pop(raw)
            if not self._token(addr[0]):
                self.on_drop(f"more than {self.rate:g} TLS handshakes a second from {addr[0]}", addr)
                raw.close()  # counted first: what the peer sees is already in the count
                continue
            raw.setblocking(True)
            ready.append((raw, addr, accepted))
        self._expire()
        if self.listener.fileno() < 0:
            raise OSError("the listener is closed")
        return ready

    def _accept(self) -> None:
        while True:
            try:
                raw, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # a connection reset before it was accepted, or no descriptors now
            if len(self._waiting) >= self.limit:
                old = next(iter(self._waiting))
                self._drop(old, f"pushed out by newer connections: {self.limit} were waiting to say anything")
            raw.setblocking(False)
            self._waiting[raw] = (time.monotonic(), addr)
            self._sel.register(raw, selectors.EVENT_READ, "waiting")

    def _token(self, address: str) -> bool:
        now = time.monotonic()
        bucket = self._buckets.pop(address, None)
        if bucket is None:
            bucket = [float(self.burst), now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        ok = tokens >= 1
        self._buckets[address] = [tokens - 1 if ok else tokens, now]
        if len(self._buckets) > ADDRESSES:
            self._buckets.popitem(last=False)
        return ok

    def _expire(self) -> None:
        now = time.monotonic()
        while self._waiting:
            raw, (accepted, _) = next(iter(self._waiting.items()))
            if now - accepted <= self.deadline:
                return
            self._drop(raw, f"said nothing within {self.deadline:g} s of connecting")

    def _drop(self, raw: socket.socket, why: str) -> None:
        _, addr = self._waiting.pop(raw)
        self._sel.unregister(raw)
        self.on_drop(why, addr)
        raw.close()

    def close(self) -> None:
        for raw in list(self._waiting):
            self._sel.unregister(raw)
            raw.close()
        self._waiting.clear()
        self._sel.close()
