"""The source side of a round: which entries it deals with, walked ahead of the decisions.

A round of ``kind`` walks the source under its filter (the rules anchored to the
source: :func:`round_filter`), entry by entry (:func:`walk_round`) or a directory at
a time (:func:`scan_round`); :class:`Prefetch` runs that walk on a thread of its own
while the receiver still lists its tree. Entries and directories that vanish between
being listed and being read are counted (:class:`SourceWalkErrors`), not failures.
"""
from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from smsrepl.files.dirscan import DirBatch, scan_dirs
from smsrepl.files.liveread import VANISHED
from smsrepl.files.roundstats import RoundStats
from smsrepl.files.rules import PathRules, RoundFilter
from smsrepl.files.scan import Entry, _raise, walk

OnError = Callable[[bytes, OSError], None]


class SourceWalkErrors:
    """``on_error`` for the walk of a live source: entries and directories that vanished between
    being listed and being read are counted (a busy tree never fails a round); any other error
    (permission, I/O) stops the round, naming the full path."""

    def __init__(self, top: bytes) -> None:
        self.top = top
        self.vanished: list[bytes] = []

    def __call__(self, rel: bytes, exc: OSError) -> None:
        if exc.errno in VANISHED:
            self.vanished.append(rel)
            return
        _raise(self.top + b"/" + rel if rel else self.top, exc)

    def into(self, stats: RoundStats) -> None:
        for rel in self.vanished:
            stats.gone(rel)
        self.vanished = []


def round_filter(source: str | bytes, rules: PathRules | None, kind: str) -> RoundFilter | None:
    """The filter of a round of ``kind`` over ``source``: the rules anchored to it."""
    return rules.anchored(source).for_round(kind) if rules else None


def walk_round(source: str | bytes, rules: PathRules | None, kind: str, on_error: OnError = _raise,
               filt: RoundFilter | None = None) -> Iterator[Entry]:
    """The source entries one round of ``kind`` deals with, in order; ``filt``: the round's
    filter (round_filter()'s), when the caller wants to know which rules matched."""
    if filt is None:
        filt = round_filter(source, rules, kind)
    return walk(os.fsencode(source), filt, xattrs=True, implied=True, on_error=on_error)


def scan_round(source: str | bytes, rules: PathRules | None, kind: str, on_error: OnError = _raise,
               start: list[tuple[bytes, bool]] | None = None, filt: RoundFilter | None = None) -> Iterator[DirBatch]:
    """walk_round() a directory at a time (files.dirscan); ``start``: only those directories."""
    if filt is None:
        filt = round_filter(source, rules, kind)
    return scan_dirs(os.fsencode(source), filt, xattrs=True, on_error=on_error, start=start)


class Prefetch:
    """Runs an iterator on a thread of its own, up to ``limit`` items ahead of the consumer:
    the source tree is walked while the receiver is still describing its own. Items cross
    in batches of ``batch``: one queue hand-off (two futex calls) per item cost more than the
    lstat of a small file. The items are a round's source walk: walk_round()'s entries or
    scan_round()'s batches, which sync_tree takes either way (``entries``)."""

    _END = object()

    def __init__(self, it: Iterable[Any], limit: int = 65536, batch: int = 256) -> None:
        self.batch = batch
        self.errors: SourceWalkErrors | None = None  # where the walk reports what vanished
        self.filter: RoundFilter | None = None  # the walk's (which rules matched: RoundFilter.unmatched)
        self._q: queue.Queue = queue.Queue(maxsize=max(1, limit // batch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(it,), name="walk-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it: Iterable[Any]) -> None:
        batch: list[Any] = []
        try:
            for item in it:
                batch.append(item)
                if len(batch) >= self.batch:
                    if not self._put(batch):
                        return
                    batch = []
            if (not batch or self._put(batch)):
                self._put(self._END)
        except BaseException as exc:  # handed to the consumer (after what came before), raised there
            if not batch or self._put(batch):
                self._put(exc)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

