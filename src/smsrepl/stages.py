"""Where a transfer's time goes, stage by stage, without a profiler.

Each endpoint keeps a StageClock: the seconds spent in each stage, summed over
the threads that run it (so stages that overlap can add up to more than the
wall time). Sender stages: read, digest, compress, send (TLS and the socket,
including waiting for the link or the speed limit). Receiver stages: receive
(TLS and the socket, including waiting for the sender), decompress, verify
(digests of what arrived), write, flush (making writes durable).
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager


class StageClock:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextmanager
    def timing(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 3) for k, v in self.seconds.items()}

    def line(self) -> str:
        return " ".join(f"{k} {v:.2f}" for k, v in self.snapshot().items())
