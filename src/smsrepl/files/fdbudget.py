"""One budget of open-file descriptors for every tree writer of a process, shared fairly.

A tree writer keeps a descriptor for each small file it wrote until one
syncfs makes a whole run of them durable, and a cache of directory
descriptors. A receiver serving many file sessions at once must not let
them together reach the open-file limit: a session would then fail half-way
with EMFILE. At start the soft limit is raised to the hard limit; RESERVE of
it is left for sockets, block targets, manifests and the rest, and the
remainder is shared: each writer may hold its fair share (the budget over the
writers open now) and never more than what is left. A writer that finds
nothing left makes its own files durable first (which frees its share) and
then waits for others to do the same; past a deadline it writes one file at a
time the careful way, which holds one descriptor briefly: slower, never failed.
"""
from __future__ import annotations

import resource
import threading

#: descriptors left outside the budget: connections served (one each, up to 64), block
#: sessions' targets and manifests, lock files, the interpreter's own; and door_descriptors()
RESERVE = 512
#: the least a writer is given to work with, however many share the budget
MIN_SHARE = 16


def door_descriptors(soft: int) -> int:
    """How many connections may wait at a receiver's door (transport/door.py) under a soft
    limit of ``soft`` open files: an eighth of it, kept out of the budget."""
    return max(16, soft // 8)


def raise_fd_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class DescriptorBudget:
    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"a descriptor budget of {total} leaves nothing to share")
        self.total = total
        self.held = 0
        self.writers = 0
        self._cv = threading.Condition()

    def join(self) -> None:
        with self._cv:
            self.writers += 1

    def leave(self, holding: int) -> None:
        with self._cv:
            self.writers = max(0, self.writers - 1)
            self.held = max(0, self.held - holding)
            self._cv.notify_all()

    def share(self) -> int:
        """What one writer may hold now."""
        return max(MIN_SHARE, self.total // max(1, self.writers))

    def take(self, want: int, holding: int) -> int:
        """Up to ``want`` more descriptors for a writer holding ``holding``: at most its share
        and what is left (0: none now)."""
        with self._cv:
            n = max(0, min(want, self.share() - holding, self.total - self.held))
            self.held += n
            return n

    def force(self, n: int) -> None:
        """Count ``n`` descriptors a writer already holds beyond what it took (a run's directories)."""
        with self._cv:
            self.held += n

    def give_back(self, n: int) -> None:
        if n <= 0:
            return
        with self._cv:
            self.held = max(0, self.held - n)
            self._cv.notify_all()

    def wait(self, timeout: float) -> None:
        """Until some descriptors come back, or ``timeout`` seconds."""
        with self._cv:
            self._cv.wait(timeout)


_budget: DescriptorBudget | None = None
_lock = threading.Lock()


def process_budget() -> DescriptorBudget:
    """The budget of this process, made (and the limit raised) on first use."""
    global _budget
    with _lock:
        if _budget is None:
            soft = raise_fd_limit()
            rest = soft - min(RESERVE + door_descriptors(soft), soft // 2)
            # an eighth of the rest stays for the writers' directory caches (share // 8 each)
            _budget = DescriptorBudget(max(MIN_SHARE, rest * 7 // 8))
        return _budget
