"""The sending end of a file session: one round of a directory tree to a receiver's target.

The receiver says whether its target completed a round before (WELCOME
state "synced"): then this is a sync round (SYNC_EXCLUDE / ONLY_SYNC rules,
deletions), else the full copy (MIGRATE_EXCLUDE rules). Files are replaced
atomically on the receiver, so an interrupted round is simply run again:
what already arrived is skipped by size and mtime.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from smsrepl.codec import DEFAULT_LEVEL, Compressor, Decompressor
from smsrepl.errors import RemoteProtocolError, ReplicationError, TransportError
from smsrepl.throttle import CpuCap, SpeedSchedule
from smsrepl.protocol import CAPABILITIES
from smsrepl.transport.streams_auto import StreamCount
from smsrepl.protocol import frames as F
from smsrepl.transport.channel import Channel
from smsrepl.control.report_ticker import RoundReports, Ticker
from smsrepl.transport.sender_base import SenderBase, raise_if_error

if TYPE_CHECKING:
    from smsrepl.files.source import Prefetch
    from smsrepl.files.roundstats import RoundStats
    from smsrepl.files.plan import Plan
    from smsrepl.files.listing import Listing
    from smsrepl.files.journal import Changes, ChangeJournal
    from smsrepl.files.deletions import LastWholeRound
    from smsrepl.files.rules import PathRules
    from smsrepl.control.progress import ProgressTracker
    from smsrepl.files.sentprogress import SentProgress

# the file-round machinery (files.*, progress) is imported where a round first needs it:
# open() sends HELLO and TREE_REQUEST before, and the receiver lists its tree meanwhile

log = logging.getLogger("smsrepl.file_sender")
E = TypeVar("E", bound=F.Event)


@dataclass
class FileRoundResult:
    round_id: int
    kind: str
    stats: RoundStats
    wire_bytes: int
    seconds: float
    literal_bytes: int = 0  # data of delta-sent files that the receiver's copies did not have
    #: "whole" (the tree walked) or "journal" (only the directories a change journal named)
    scope: str = "whole"
    dirs: int = 0  # directories a journal round scanned (as asked, before recursion)
    whole_because: str | None = None  # why a round with a journal walked the whole tree

    def summary(self) -> dict:
        s = self.stats
        return {"round": self.round_id, "kind": self.kind, "entries": s.entries, "files_sent": s.files_sent,
                "bytes_sent": s.bytes_sent, "unchanged": s.unchanged, "deleted": s.deleted, "reread": s.reread,
                "vanished": s.vanished, "changed_during_read": s.changed_during_read, "source_moved": s.source_moved,
                "literal_bytes": self.literal_bytes, "wire_bytes": self.wire_bytes, "seconds": round(self.seconds, 3),
                "scope": self.scope, **({"dirs": self.dirs} if self.scope == "journal" else {}),
                **({"whole_because": self.whole_because} if self.whole_because else {}), "reported": s.reported,
                "unmatched_rules": [{"key": key, "rule": rule} for key, rule in s.unmatched_rules]}


def file_session_id(source: str, target: str) -> str:
    """The same for every run of this tree on this host into ``target``: a rerun is recognised by
    the receiver as the same sender, which takes the target back from a connection that died
    silently (block sessions keep theirs in the state directory)."""
    ident = b"\0".join([b"files", socket.gethostname().encode(), os.fsencode(os.path.realpath(source)),
                        target.encode()])
    return hashlib.sha256(ident).hexdigest()[:32]


class FileSender(SenderBase):
    def __init__(self, source_dir: str, target: str, address: tuple[str, int], context: ssl.SSLContext, *,
                 rules: PathRules | None = None, checksum: bool = False, level: int | str = "auto",
                 speed_limit: SpeedSchedule | None = None, cpu_cap: CpuCap | None = None,
                 on_report: Callable[[dict], None] | None = None, host_sampler=None,
                 journal: ChangeJournal | None = None, whole: str | None = None,
                 max_delete: int | None = None, last_whole: LastWholeRound | None = None,
                 streams: StreamCount = 1) -> None:
        if not os.path.isdir(source_dir):
            from smsrepl.errors import SourceMissingError

            what = "is not a directory" if os.path.lexists(source_dir) else "does not exist"
            raise SourceMissingError(f"source {source_dir!r} {what}")
        if cpu_cap is None and rules is not None and rules.cpu_limit is not None:
            cpu_cap = CpuCap(rules.cpu_limit)
        super().__init__(target, address, context, speed_limit=speed_limit, cpu_cap=cpu_cap, streams=streams)
        self.source = os.path.abspath(source_dir)
        self.session_id = file_session_id(self.source, self.target)
        self.rules = rules.anchored(self.source) if rules is not None else None  # host paths under it: relative
        self.checksum = checksum
        self.level = level
        self.literal_bytes = 0
        self.on_report = on_report
        self.host_sampler = host_sampler
        #: a change journal of the source (files.journal): sync rounds of only what it names
        self.journal = journal
        self.whole = whole  # a reason to walk the whole tree anyway (the cutover)
        #: most target entries a round may delete (files.deletions): None = half of the target's
        #: (from MIN_GUARDED entries up), -1 = no limit
        self.max_delete = max_delete
        #: a continuous sender's memory of its source (files.deletions), updated by whole-tree rounds
        self.last_whole = last_whole
        self.tracker: ProgressTracker | None = None
        self._done_bytes: int | None = None  # file bytes the running round has dealt with
        #: the thread that receives the rest of an ordered listing, and the listing
        self._listing: tuple[threading.Thread, Listing] | None = None

    @property
    def position(self) -> tuple[int, int | None] | None:
        """(file bytes the running round has dealt with or sent, the round's total where known:
        with progress reports); None before the round began."""
        if self._done_bytes is None:
            return None
        # entries are counted done a directory at a time: what was sent of the current one counts too
        ops = getattr(self, "_ops", None)
        done = max(self._done_bytes, ops.raw_bytes if ops is not None else 0)
        if self.tracker is None:
            return done, None
        return min(done, self.tracker.totalsize), self.tracker.totalsize

    def _total(self, kind: str, dirs: list | None = None) -> int:
        """Bytes of the regular files the round covers (the 5.4.8 totalsize); ``dirs``: a journal
        round's."""
        from smsrepl.files.local import by_dirs
        from smsrepl.files.scan import walk

        filt = self.rules.for_round(kind) if self.rules else None
        if by_dirs(self.checksum):
            from smsrepl.files.dirscan import scan_dirs

            return sum(b.file_bytes() for b in self._unless_stopped(
                scan_dirs(self.source, filt, on_error=lambda p, exc: None, xattrs=False, start=dirs)))
        return sum(e.size for e in self._unless_stopped(walk(self.source, filt, on_error=lambda p, exc: None))
                   if e.kind == "file")

    def _unless_stopped(self, items):
        """``items``, until stop() is called (a walk of a large tree takes seconds)."""
        for item in items:
            if self.stop_requested:
                raise TransportError("the round was stopped")
            yield item

    def open(self) -> None:
        """Connect, and send HELLO and TREE_REQUEST without waiting for WELCOME: the receiver
        lists its tree while this process gets ready for the round. run() opens the session
        itself otherwise. With a journal the request waits for WELCOME: its round id says
        whether a subset will do."""
        self._chan = self._connect(self.checksum, request=self.journal is None, prejoin=True)

    def _connect(self, checksum: bool, request: bool = True, prejoin: bool = False) -> Channel:
        """A connection with HELLO and (``request``) TREE_REQUEST sent (the protocol lets the
        request come before WELCOME); ``prejoin``: SenderBase._open."""
        return self._open("files", self.session_id, 0, list(CAPABILITIES), *([F.TreeRequest(checksum)] if request else []),
                          prejoin=prejoin)

    def run(self) -> FileRoundResult:
        from smsrepl.files.local import by_dirs

        started = time.monotonic()
        # where either kind of round walks the same tree, the walk starts now: it overlaps
        # connecting (unless open() did), the TLS handshake and the receiver's listing
        early = None
        if by_dirs(self.checksum) and self.journal is None and (
                self.rules is None or self.rules.for_round("full") == self.rules.for_round("sync")):
            early = self._source_walk("full")
        try:
            if self._chan is None:
                self.open()
            chan = self._chan
            assert chan is not None
            if self.stop_requested:  # came while connecting: stop() found no connection to break
                chan.close()
                self._end_streams()
                raise TransportError("the round was stopped before it started")
            try:
                return self._session(chan, started, early)
            except BaseException:
                if self.journal is not None:
                    # temporaries of the cut round may sit where a subset does not look
                    self.journal.force_whole("the last round did not complete")
                raise
            finally:
                (self._chan or chan).close()  # the session's connections, extra ones too
                self._end_streams()  # the next run() connects again
        finally:
            if early is not None:
                early.close()

    def _recv(self, chan: Channel, want: type[E]) -> E:
        if self._listing is not None:  # one reader at a time: the listing's comes first
            thread, listing = self._listing
            thread.join()
            self._listing = None
            listing.wait(whole=True)  # what stopped it (an ERROR frame, a lost connection)
        return self._recv_frame(chan, want)

    def _listing_frame(self, chan: Channel) -> F.TreeData:
        """The next frame of the listing; after its last, the answer to STREAMS that follows it."""
        ev = self._recv_frame(chan, F.TreeData)
        if ev.last:
            self._streams_answer(chan)
        return ev

    def _streams_answer(self, chan: Channel) -> None:
        """The receiver's answer to the session's STREAMS, where it was not read yet (it comes
        after the listing asked for before the STREAMS, before the one asked for after it)."""
        if self._joining is not None:
            self.streams_granted(self._recv_frame(chan, F.Streams))

    def _recv_frame(self, chan: Channel, want: type[E]) -> E:
        ev = chan.recv()
        while isinstance(ev, F.Pong) or (isinstance(ev, F.Streams) and want is not F.Streams):
            if isinstance(ev, F.Streams):
                self.streams_granted(ev)
            ev = chan.recv()  # (a PONG answers a keepalive PING)
        raise_if_error(ev)
        if not isinstance(ev, want):
            raise RemoteProtocolError(f"expected {want.__name__}, got {type(ev).__name__}")
        return ev

    def describe_target(self):
        """The receiver's tree with content digests (a files.listing.Listing), without a round:
        what a remote consistency check compares against."""
        from smsrepl.files.listing import Listing

        chan = self._connect(checksum=True)
        try:
            self._recv(chan, F.Welcome)
            listing, decomp = Listing(), Decompressor()
            while not listing.done:
                listing.add(self._recv(chan, F.TreeData), decomp)
            self._goodbye(chan)
            return listing
        finally:
            chan.close()

    def _on_done(self, sent: SentProgress, reports: RoundReports | None, file_bytes: int) -> None:
        """Entries of ``file_bytes`` are done (their operations are in the op stream)."""
        self._ops.keepalive()
        sent.entry_done(file_bytes)
        self._done_bytes = sent.done
        if reports is not None:
            reports.update()

    def _signature(self, chan: Channel, path: bytes, block_size: int):
        """(file size, weak, strong) of the receiver's copy of ``path``; size 0 if it has none."""
        from smsrepl._lazy import np

        chan.send(F.SigRequest(block_size, path))
        weak: list[np.ndarray] = []
        strong: list[np.ndarray] = []
        size = 0
        while True:
            ev = self._recv(chan, F.SigData)
            if ev.block_size != block_size or ev.first != sum(len(w) for w in weak):
                raise RemoteProtocolError("SIG_DATA out of order or for another block size")
            weak.append(ev.weak)
            strong.append(ev.strong)
            size = ev.file_size
            if ev.last:
                break
        w, s = np.concatenate(weak), np.concatenate(strong)
        if size and len(w) != -(-size // block_size):
            raise RemoteProtocolError("SIG_DATA does not cover the file")
        return size, w, s

    def _source_walk(self, kind: str, dirs: list | None = None) -> Prefetch:
        """The source walked for a round of ``kind`` on a thread of its own, ahead of the round
        (what vanished under the walk: the Prefetch's ``errors``); ``dirs``: only those (a
        journal round's, directory-at-a-time rounds only)."""
        from smsrepl.files.local import by_dirs
        from smsrepl.files.source import Prefetch, SourceWalkErrors, round_filter, scan_round, walk_round

        errors = SourceWalkErrors(os.fsencode(self.source))
        filt = round_filter(self.source, self.rules, kind)
        if by_dirs(self.checksum):
            p = Prefetch(scan_round(self.source, self.rules, kind, errors, start=dirs, filt=filt), limit=1024, batch=1)
        else:
            p = Prefetch(walk_round(self.source, self.rules, kind, errors, filt))
        p.errors, p.filter = errors, filt
        return p

    def _session(self, chan: Channel, started: float, early: Prefetch | None = None) -> FileRoundResult:
        welcome = self._recv(chan, F.Welcome)  # open() sent HELLO and TREE_REQUEST
        if "files" not in welcome.capabilities:
            raise RemoteProtocolError("the receiver does not take file sessions")
        kind = "sync" if welcome.state == "synced" else "full"
        round_id = welcome.round_id + 1
        # more connections asked for now: the answer comes after the listing (_streams_answer)
        chan = self._spread(chan, self.session_id, 0, frozenset(welcome.capabilities))
        # the source is walked while the receiver lists its tree
        if early is not None:
            return self._round(chan, started, kind, round_id, early)
        changes = self._journal_changes(welcome, kind)
        if changes is not None and changes.whole_because is None:
            from smsrepl.files.dirscan import walked
            from smsrepl.files.describe import normal_subset

            filt = self.rules.for_round(kind) if self.rules else None
            dirs = [(d, r) for d, r in normal_subset(changes.dirs)
                    if filt is None or walked(filt, tuple(d.split(b"/")) if d else ())]
            chan.send(F.TreeSubset(tuple(dirs)))
        else:
            dirs = None
            if self.journal is not None:
                chan.send(F.TreeRequest(self.checksum))
        prefetch = self._source_walk(kind, dirs)
        try:
            result = self._round(chan, started, kind, round_id, prefetch, dirs)
        finally:
            prefetch.close()
        if self.journal is not None:
            self.journal.completed(result.round_id)
            if changes is not None and changes.whole_because:
                result.whole_because = changes.whole_because
        return result

    def _deletion_limit(self, chan: Channel, listing: Listing, kind: str, *,
                        whole: bool) -> Callable[[int, int], None]:
        """Refuse, before the round begins, a whole-tree round that would delete more than its
        limit (files.deletions; the session is closed first: the target keeps its round
        record). Returns the check the round's deletion step makes again: the source may
        change meanwhile, and a journal round (not counted ahead, nor guarded by default: it
        lists a part of the target) meets its --max-delete there."""
        from smsrepl.errors import DeletionLimitError
        from smsrepl.files.deletions import (UNLIMITED, check_deletions, listed_entries, source_entries,
                                             would_delete)

        total = None
        before = self.last_whole.source_entries if self.last_whole is not None else None
        filt = self.rules.for_round(kind) if self.rules else None
        if whole and self.max_delete != UNLIMITED:
            try:
                total = listed_entries(listing) if self.max_delete is None else None
                count = would_delete(self.source, listing, filt, self.checksum)
                check_deletions(count.deletions, total, self.max_delete, self.target,
                                source_entries=count.source_entries, last_whole=before)
            except DeletionLimitError:
                self._goodbye(chan)
                raise
        if whole:
            return lambda count, walked: check_deletions(count, total, self.max_delete, self.target, changed=True,
                                                         source_entries=walked, last_whole=before)

        def journal_round(count: int, walked: int) -> None:
            now = None  # a journal round walked a part: the whole source is counted where it matters
            if self.max_delete is None and before is not None and count * 2 > before:
                now = source_entries(self.source, filt, self.checksum)
            check_deletions(count, None, self.max_delete, self.target, changed=True, source_entries=now,
                            last_whole=before)

        return journal_round

    def _goodbye(self, chan: Channel) -> None:
        """CLOSE, and the receiver's, after a round or a listing received whole."""
        try:
            chan.send(F.Close("done"))
            self._recv(chan, F.Close)
        except ReplicationError:
            pass

    def plan(self) -> "Plan":
        """What a round would change (files.plan), found as the round finds it, changing nothing:
        the receiver lists its tree for a session that begins no round (HELLO lists DRY_RUN:
        it creates and removes nothing either)."""
        from smsrepl.files.source import round_filter, walk_round
        from smsrepl.files.plan import plan_round
        from smsrepl.files.listing import Listing

        chan = self._open("files", self.session_id, 0, list(CAPABILITIES) + [F.DRY_RUN], F.TreeRequest(self.checksum))
        try:
            welcome = self._recv(chan, F.Welcome)
            if "files" not in welcome.capabilities:
                raise RemoteProtocolError("the receiver does not take file sessions")
            kind = "sync" if welcome.state == "synced" else "full"
            listing, decomp = Listing(), Decompressor()
            while not listing.done:
                listing.add(self._recv(chan, F.TreeData), decomp)
            self._goodbye(chan)
        finally:
            chan.close()
        filt = self.rules.for_round(kind) if self.rules else None
        entries = listing.entries

        def lookup(path: bytes):
            got = entries.get(path)
            return got[0] if got else None

        walk_filter = round_filter(self.source, self.rules, kind)
        plan = plan_round(os.fsencode(self.source), walk_round(self.source, self.rules, kind, filt=walk_filter),
                          lookup, entries, filt, kind, welcome.round_id + 1, checksum=self.checksum,
                          target_digest=lambda path: entries[path][1])
        if walk_filter is not None:
            from smsrepl.files.rules import unmatched_note

            plan.reported += [unmatched_note(key, rule, self.source) for key, rule in walk_filter.unmatched()]
        return plan

    def _journal_changes(self, welcome: F.Welcome, kind: str) -> Changes | None:
        """The journal's changes since the last round (taken now: the round's boundary), or
        None without a journal."""
        if self.journal is None:
            return None
        from smsrepl.files.local import by_dirs

        whole = self.whole
        if kind != "sync":
            whole = "the receiver's target has no completed round"
        elif not by_dirs(self.checksum):
            whole = "a journal round needs the native kernels and no content checksums"
        elif "tree-subset" not in welcome.capabilities:
            whole = "the receiver does not list parts of its tree (tree-subset)"
        return self.journal.take(round_id=welcome.round_id, whole=whole)

    def _round(self, chan: Channel, started: float, kind: str, round_id: int, entries: Prefetch,
               dirs: list | None = None) -> FileRoundResult:
        from smsrepl.files.local import sync_tree
        from smsrepl.files.listing import Listing
        from smsrepl.files.opstream import OpStream
        from smsrepl.files.remote import RemoteTarget
        from smsrepl.files.sentprogress import SentProgress
        from smsrepl.control.progress import ProgressTracker, subtask_for

        listing, decomp = Listing(), Decompressor()
        listing.add(self._recv(chan, F.TreeData), decomp)
        if listing.ordered and not listing.done:  # decide as it arrives: each directory waits for its own listing
            self._listing = listing.follow(lambda: self._listing_frame(chan), decomp), listing
        while not listing.done and not listing.ordered:
            listing.add(self._recv(chan, F.TreeData), decomp)
        if self._listing is None:
            self._streams_answer(chan)
        log.info("%s round %d of %s -> %s", kind, round_id, self.source, self.target)
        if self.on_report is not None:
            self.tracker = ProgressTracker(subtask_for("file", first_copy=kind == "full"), self._total(kind, dirs),
                                           host_sampler=self.host_sampler)
        deletion_limit = self._deletion_limit(chan, listing, kind, whole=dirs is None)
        self._done_bytes = 0
        chan.limiter = self.limiter
        wire0 = chan.wire_sent
        chan.send(F.RoundBegin(round_id, kind, 0))
        auto, cap = self.level == "auto", self.cpu_cap
        ops = self._ops = OpStream(chan.send, Compressor(DEFAULT_LEVEL if isinstance(self.level, str) else self.level),
                                   (lambda: cap.pace(self._stopped)) if cap else None, adaptive=auto,
                                   wire=chan)
        sent = SentProgress(ops)
        tracker = self.tracker
        reports = RoundReports(tracker, self.on_report, lambda: (
            min(sent.sent(), tracker.totalsize), chan.wire_acknowledged() - wire0, ops.on_socket())) \
            if tracker is not None and self.on_report is not None else None
        # reports go on until the receiver confirms the round: the last batches may still be leaving
        with Ticker(reports.update) if reports is not None else contextlib.nullcontext():
            try:
                target = RemoteTarget(listing, ops, signature=lambda path, bs: self._signature(chan, path, bs))
                target.deletion_limit = deletion_limit  # read by files.local.sync_tree
                stats = sync_tree(self.source, target, rules=self.rules, kind=kind, checksum=self.checksum,
                                  on_done=functools.partial(self._on_done, sent, reports), entries=entries,
                                  walk_errors=entries.errors)
                if entries.filter is not None and dirs is None:  # a part of the tree says nothing of the rest
                    stats.unmatched_rules = entries.filter.unmatched()
                self.literal_bytes = target.literal_bytes
                listing.wait(whole=True)  # ROUND_END only after the whole listing (its state machine)
                chan.send(F.RoundEnd(round_id))
            except TransportError:
                # the receiver usually hung up after saying why: prefer its ERROR frame
                self._recv(chan, F.RoundDone)
                raise
            finally:
                ops.close()
            done = self._recv(chan, F.RoundDone)
        if done.round_id != round_id:
            raise RemoteProtocolError(f"ROUND_DONE for round {done.round_id}, expected {round_id}")
        wire = chan.wire_sent - wire0
        if self.tracker is not None and self.on_report is not None:
            self.tracker.update(self.tracker.totalsize, wire, ops.raw_bytes)
            self.on_report(self.tracker.finish())
        self._goodbye(chan)  # the round is durable already: a lost goodbye changes nothing
        # a directory gone from a scanned one, with a subtree the subset did not list, left after
        # the round took its changes (a removal is an event in the parent, and the journal has
        # such directories listed whole): the next journal round deletes what it held
        if dirs is None and self.last_whole is not None:
            self.last_whole.source_entries = stats.entries
        if dirs is not None and stats.hard_links_changed and self.journal is not None:
            # their other names may sit in directories this round did not scan
            self.journal.force_whole("hard-linked files changed in a journal round")
        return FileRoundResult(round_id, kind, stats, wire, time.monotonic() - started, self.literal_bytes,
                               scope="whole" if dirs is None else "journal", dirs=len(dirs or ()))
