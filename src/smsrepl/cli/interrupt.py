"""Signals during a send or an agent run.

A one-shot send (OneShotStop): SIGINT and SIGTERM stop it within a second, say where, exit 3.

The handler stops the running sender (its connection is aborted, its pacing sleeps end), so
the round fails at once wherever the main thread is; what the receiver made durable stays,
and the same command resumes from there. A watchdog bounds the rest: if the process has not
ended ``GRACE`` seconds after the signal (a read stuck on a slow disk, a thread that does not
notice), it says the same line and exits 3 anyway. A second signal does so at once.

A --continuous send or the agent (cutover_on_sigterm): the first SIGTERM runs the cutover
round; a second one, or SIGINT, aborts resumably; SIGUSR1 asks for a round now.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

from smsrepl.errors import EXIT_TRANSFER
from smsrepl.cli.summary import interrupted_line

#: seconds from the signal to the forced exit when the orderly one has not happened by then
GRACE = 0.8


class OneShotStop:
    """Install with :meth:`install`; the command sets :attr:`sender` once it made one."""

    def __init__(self) -> None:
        #: the running sender (transport.sender.Sender or FileSender): stop(), position
        self.sender = None
        self.hit = threading.Event()
        self._said = threading.Lock()
        self._done = False
        self._cancelled = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.hit.is_set():  # a second signal: no more waiting
            self._exit_now()
        self.hit.set()
        threading.Thread(target=self._watchdog, name="interrupt-watchdog", daemon=True).start()
        sender = self.sender
        if sender is not None:
            sender.stop()
        if sender is None or getattr(sender, "_chan", None) is None:
            # not connected yet (a connect is not broken by stop()): unwind from wherever the
            # main thread is; should something swallow this, the watchdog ends the process
            raise KeyboardInterrupt

    def position(self) -> tuple[int, int | None] | None:
        return getattr(self.sender, "position", None)

    def say(self) -> int:
        """Print the interruption line once; the exit code to return (3)."""
        # not a plain `with`: a second signal's handler runs on the main thread, maybe in here
        if self._said.acquire(timeout=0.5):
            try:
                if not self._done:
                    self._done = True
                    print(interrupted_line(self.position()), file=sys.stderr, flush=True)
            finally:
                self._said.release()
        return EXIT_TRANSFER

    def cancel(self) -> None:
        """The command ended on its own (the round completed as the signal came): no forced exit."""
        self._cancelled = True

    def _watchdog(self) -> None:
        time.sleep(GRACE)
        if not self._cancelled:
            self._exit_now()

    def _exit_now(self) -> None:
        self.say()
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        os._exit(EXIT_TRANSFER)


#: SIGTERM and SIGUSR1 that came while a --continuous send was starting (hold_early_signals),
#: until cutover_on_sigterm handles them; None when not held
_early: list[int] | None = None


def hold_early_signals() -> None:
    """From now until cutover_on_sigterm, a SIGTERM or SIGUSR1 is kept for it, not the end of
    the process: a start-up (imports, the source's checks) takes a second on a busy host, and
    a cutover asked for meanwhile is still a cutover."""
    global _early
    _early = []
    held = _early
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, lambda signum, frame: held.append(signum))


def cutover_on_sigterm(cutover, abort, round_now=None) -> None:
    """First SIGTERM: the cutover round; a second one, or SIGINT: abort, resumably; SIGUSR1: a round now."""
    global _early
    seen: list[int] = []  # the SIGTERMs handled so far

    def on_term(signum, frame):
        if signum == signal.SIGTERM and not seen:
            seen.append(signum)
            print("SIGTERM: running the cutover round", file=sys.stderr, flush=True)
            cutover()
        else:
            abort()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    if round_now is not None:
        signal.signal(signal.SIGUSR1, lambda signum, frame: round_now())
    held, _early = _early or [], None
    for signum in held:  # what came while the command started
        if signum == signal.SIGTERM:
            on_term(signum, None)
        elif round_now is not None:
            round_now()
