"""The receiver's tree as the sender receives it (TREE_DATA frames, files.describe).

A :class:`Listing` keeps each directory's records as they arrived, decoded on
demand: a round a directory at a time compares bodies of records (files.dirround),
the per-entry round looks entries up by path (files.decide). An ordered listing
may still be arriving while the round decides: each question waits for as much of
it as it needs.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from smsrepl import kernels
from smsrepl.codec import Decompressor
from smsrepl.errors import RemoteProtocolError
from smsrepl.files import wire as W
from smsrepl.files.scan import Entry
from smsrepl.protocol import frames as F


class Listing:
    """The receiver's tree as received, kept as each directory's records (decoded on demand):
    ``records(rel)`` for a directory-at-a-time round, ``lookup(path)`` -> (entry, content
    digest or None) for the per-entry one.

    An ordered listing (whole directories, breadth first) may still be arriving on the
    thread :meth:`follow` starts: a directory's records are final once a directory after
    it in that order arrived, and every question waits for that much of the listing."""

    ROOT = None  # the key of the root's own record

    def __init__(self) -> None:
        self.groups: dict[bytes | None, list[bytes]] = {}
        self._decoded: dict[bytes | None, list[tuple[Entry, bytes | None]]] = {}
        self._by_path: dict[bytes | None, dict[bytes, tuple[Entry, bytes | None]]] = {}
        self.done = False
        self.ordered: bool | None = None  # set by the first frame
        self._frontier: tuple = ()  # order key of the last directory received (ordered listings)
        self._failed: BaseException | None = None
        self._following = False
        self._cond = threading.Condition()

    def add(self, ev: F.TreeData, decomp: Decompressor) -> None:
        if self.done:
            raise RemoteProtocolError("TREE_DATA after the last one")
        if self.ordered is not None and ev.ordered != self.ordered:
            raise RemoteProtocolError("TREE_DATA both ordered and not in one listing")
        body = bytes(decomp.decode(ev.codec, ev.payload, ev.raw_len))
        groups = _groups(body) if body != b"\0" else []
        frontier = self._frontier
        if ev.ordered:
            for parent, _, _ in groups:
                key = order_key(parent)
                if key <= frontier:
                    raise RemoteProtocolError("ordered TREE_DATA out of order (or a directory split)")
                frontier = key
        with self._cond:
            for parent, start, end in groups:
                self.groups.setdefault(parent, []).append(body[start:end])
            self.ordered = ev.ordered
            self._frontier = frontier
            self.done = ev.last
            self._cond.notify_all()

    def follow(self, next_frame: Callable[[], F.TreeData], decomp: Decompressor) -> threading.Thread:
        """Receive the rest of the listing (``next_frame()``) on a thread of its own; a failure
        there is raised by the next question that waits for the listing."""

        def run() -> None:
            try:
                while not self.done:
                    self.add(next_frame(), decomp)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                with self._cond:
                    self._failed = exc
                    self._cond.notify_all()

        thread = threading.Thread(target=run, name="listing", daemon=True)
        self._following = True
        thread.start()
        return thread

    def ready(self, rel: bytes | None) -> bool:
        """Whether directory ``rel``'s records are final (wait() would not block)."""
        return self._final(order_key(rel))

    def _final(self, key: tuple | None) -> bool:
        """Whether the records up to order ``key`` (None: all of them) are in. An unordered
        listing's frontier stays empty: only its end makes anything final."""
        return self.done or (key is not None and self._frontier >= key)

    def wait(self, rel: bytes | None = None, *, whole: bool = False) -> None:
        """Until directory ``rel``'s records are final (the whole listing with ``whole``)."""
        if self.done:
            return
        if not self._following:
            raise RuntimeError("the listing is incomplete and nothing receives the rest")
        key = None if whole else order_key(rel)
        with self._cond:
            while not self._final(key) and self._failed is None:
                self._cond.wait()
            if not self.done and self._failed is not None:
                raise self._failed

    def records(self, rel: bytes | None) -> bytes:
        self.wait(rel)
        parts = self.groups.get(rel)
        if not parts:
            return b""
        if len(parts) > 1:
            parts[:] = [b"".join(parts)]
        return parts[0]

    def decoded(self, rel: bytes | None) -> list[tuple[Entry, bytes | None]]:
        got = self._decoded.get(rel)
        if got is None:
            r, got = W.Reader(self.records(rel)), []
            while not r.done():
                got.append(r.entry())
            self._decoded[rel] = got
            self._by_path[rel] = {e.path: (e, d) for e, d in got}
        return got

    def lookup(self, path: bytes) -> tuple[Entry, bytes | None] | None:
        parent = path.rpartition(b"/")[0] if path else self.ROOT
        self.wait(parent)
        if parent not in self.groups:
            return None
        self.decoded(parent)
        return self._by_path[parent].get(path)

    def below(self, path: bytes) -> list[bytes]:
        """Paths listed under directory ``path`` (at any depth)."""
        self.wait(whole=True)
        pre = path + b"/"
        return [e.path for rel in list(self.groups) if rel is not None and (rel == path or rel.startswith(pre))
                for e, _ in self.decoded(rel)]

    @property
    def entries(self) -> dict[bytes, tuple[Entry, bytes | None]]:
        """Every entry: path -> (entry, content digest or None)."""
        self.wait(whole=True)
        out: dict[bytes, tuple[Entry, bytes | None]] = {}
        for rel in list(self.groups):
            out.update((e.path, (e, d)) for e, d in self.decoded(rel))
        return out


def order_key(rel: bytes | None) -> tuple:
    """A directory's place in a breadth-first listing: depth, then its path's components as bytes."""
    if rel is None:
        return (-1,)
    parts = rel.split(b"/") if rel else []
    return (len(parts), parts)


def _groups(body: bytes) -> list[tuple[bytes | None, int, int]]:
    """(parent directory, start, end) of each run of records of ``body`` with one parent."""
    if kernels.TREE:
        try:
            return kernels.group_records(body)
        except ValueError as exc:
            raise RemoteProtocolError(str(exc)) from None
    out: list[tuple[bytes | None, int, int]] = []
    r = W.Reader(body)
    while not r.done():
        start = r.pos
        e, _ = r.entry()
        parent = e.path.rpartition(b"/")[0] if e.path else Listing.ROOT
        if out and out[-1][0] == parent and parent is not Listing.ROOT:
            out[-1] = (parent, out[-1][1], r.pos)
        else:
            out.append((parent, start, r.pos))
    return out
