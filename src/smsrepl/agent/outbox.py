"""Reports on their way from the agent to the control plane, kept while it does not answer.

The data transfer never waits for the control plane: the agent puts each report
(state, progress, command result, consistency result, network check) into an
:class:`Outbox`, whose own thread delivers them in order and keeps them while the
control plane is unreachable (states in order, only the latest progress per subtask).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

from smsrepl.agent.client import ControlPlane
from smsrepl.errors import ControlPlaneError

log = logging.getLogger("smsrepl.agent")


class Outbox:
    """Reports on their way to the control plane, delivered in order by a thread of their own.

    While the control plane does not answer, reports wait (progress: only the latest per
    task and subtask is kept, so a subtask's last report is never replaced by the next
    subtask's first; everything else in order) and the thread retries every ``retry`` s."""

    def __init__(self, cp: ControlPlane, *, retry: float = 1.0) -> None:
        self.cp = cp
        self.retry = retry
        self._items: deque[tuple[str, str, dict]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="agent-outbox", daemon=True)
        self._thread.start()

    def put(self, kind: str, ident: str, body: dict) -> None:
        with self._cond:
            if kind == "progress":
                subtask = body.get("subtask_name")
                for i, (k, ident2, old) in enumerate(self._items):
                    if k == "progress" and ident2 == ident and old.get("subtask_name") == subtask:
                        del self._items[i]  # a newer report replaces one not yet delivered
                        break
            self._items.append((kind, ident, body))
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._items)

    def flush(self, timeout: float) -> bool:
        """Wait until everything was delivered (True) or ``timeout`` passed."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._items and time.monotonic() < end:
                self._cond.wait(min(0.1, max(0.0, end - time.monotonic())))
            return not self._items

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _send(self, kind: str, ident: str, body: dict) -> None:
        {"progress": self.cp.put_progress, "state": self.cp.put_state,
         "command_result": self.cp.post_command_result, "consistency": self.cp.post_consistency_result,
         "network_check": self.cp.post_network_check}[kind](ident, body)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                kind, ident, body = self._items[0]
            try:
                self._send(kind, ident, body)
            except ControlPlaneError as exc:
                if exc.resumable:  # unreachable or 5xx/429 after the client's retries: keep it
                    log.warning("control plane unavailable (%s); %d report(s) kept", exc, self.pending())
                    with self._cond:
                        self._cond.wait(self.retry)
                        if self._closed:
                            return
                    continue
                log.error("control plane refused a %s report: %s", kind, exc)  # never accepted: dropped
            with self._cond:
                if self._items and self._items[0][2] is body:
                    self._items.popleft()
                self._cond.notify_all()
