"""The source-side endpoint: one session, one source, one target; one round per run."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from smsrepl._lazy import np

from smsrepl import faults, kernels
from smsrepl.blocks.source import BlockSource
from smsrepl.blocks.direct import aligned_buffer
from smsrepl.blocks.manifest import ManifestFile
from smsrepl.kernels import FINE_BLOCK
from smsrepl.durable import private_makedirs, write_json_atomic
from smsrepl.blocks.dirtymap import ChangeMap, FrozenMarks
from smsrepl.blocks.stream import FRAME_BLOCKS, LEGACY_FRAME_BLOCKS, round_events
from smsrepl.codec import DEFAULT_LEVEL
from smsrepl.errors import RemoteProtocolError, ReplicationError, SourceError, StateError, TransportError
from smsrepl.control.progress import ProgressTracker, subtask_for
from smsrepl.control.sent_marks import SentMarks
from smsrepl.protocol import CAPABILITIES
from smsrepl.throttle import CpuCap, OverSpeedGuard, SpeedSchedule
from smsrepl.stages import StageClock
from smsrepl.control.state import Event as StateEvent
from smsrepl.control.state import SessionState, SessionStateMachine, StatePair
from smsrepl.protocol import frames as F
from smsrepl.transport.block_pipeline import Compression, PendingDigests, send_round
from smsrepl.transport.block_replies import Replies
from smsrepl.transport.channel import Channel
from smsrepl.transport.connect import IO_TIMEOUT
from smsrepl.control.report_ticker import RoundReports, Ticker
from smsrepl.transport.manifest_fetch import open_cache, reconcile
from smsrepl.transport.round_plan import BlockDryRun, check_resume_offset, plan_round, read_scope
from smsrepl.transport.sender_base import SenderBase, welcome as expect_welcome
from smsrepl.transport.streams_auto import StreamCount

log = logging.getLogger("smsrepl.sender")


@dataclass(frozen=True, slots=True)
class RoundResult:
    round_id: int
    kind: str  # "full" or "sync"
    resumed_from: int
    source_size: int
    data_bytes: int  # raw bytes sent as BLOCK_DATA
    wire_bytes: int  # protocol bytes sent (TLS payload, both frames and headers)
    seconds: float
    #: blocks a dirty map named for this round (None: the round read the whole source)
    dirty_blocks: int | None = None
    #: seconds per stage (stages.StageClock): read, digest, compress, send
    stages: dict | None = None
    #: why a sync round with a dirty map read the whole source anyway (the map's reason)
    whole_reason: str | None = None
    #: for a sender without a completed round of its own for the target (its state lost, or
    #: another host's): that it reconciled with the receiver's manifest, or why it copied everything
    reconcile: str | None = None


def _not_ours(rec: dict, welcome: F.Welcome, stateless: bool) -> str | None:
    """Why the target may hold what no round of this sender wrote, where it may: a session taken
    over (this sender completed none of its rounds: also a takeover cut short and run again, which
    finds the session its own already); since this sender's last round, a completed round that
    left another manifest, or a round cut short that this sender did not begin (another sender
    took the session over meanwhile); or one of those found earlier, until a round of this
    sender's completed (a whole-source round cut short leaves the rest of the target as it was)."""
    if stateless:
        return "a session taken over: no local state"
    if rec.get("not_ours"):
        return str(rec["not_ours"])
    root, begun = rec.get("root"), rec.get("begun")
    if welcome.state == "synced" and root is not None and welcome.manifest_root != root:
        return ("the target's manifest is not the one this sender's last round ended with (another sender of "
                "the session wrote it, or this sender did not hear a round end)")
    if welcome.state == "partial" and welcome.round_kind == "sync" and welcome.round_id != begun:
        return ("a round cut short on the target that this sender did not begin, or whose beginning the receiver "
                "did not confirm (another sender of the session may have begun it)")
    return None


def _capabilities(stateless: bool) -> list[str]:
    """What a block session's HELLO lists: ADOPT_SESSION only for a sender without a completed
    round of its own (it may take the receiver's session over)."""
    return [c for c in CAPABILITIES if c != F.ADOPT_SESSION or stateless]


class Sender(SenderBase):
    def __init__(
        self,
        source_path: str,
        target: str,
        address: tuple[str, int],
        context: ssl.SSLContext,
        state_dir: str,
        *,
        level: int | str = DEFAULT_LEVEL,
        compress_threads: int | None = None,
        speed_limit: SpeedSchedule | None = None,
        cpu_cap: CpuCap | None = None,
        on_report: Callable[[dict], None] | None = None,
        on_state: Callable[[StatePair], None] | None = None,
        host_sampler=None,
        states: SessionStateMachine | None = None,
        dirty_map: ChangeMap | None = None,
        trace: Callable[[], str] | None = None,
        streams: StreamCount = 1,
    ) -> None:
        super().__init__(target, address, context, speed_limit=speed_limit, cpu_cap=cpu_cap, streams=streams)
        self.source_path = os.path.abspath(source_path)
        self.dir = os.path.join(os.path.abspath(state_dir), self.target)
        self.level = level
        #: "auto": each frame at the level of AUTO_LEVELS (0: raw) that moves data fastest so far
        self.compression = Compression(level, compress_threads or min(4, os.cpu_count() or 1), cpu_cap,
                                       self._stopped)
        self.adapt = self.compression.adapt
        self.guard = OverSpeedGuard()
        self.on_report = on_report
        self.on_state = on_state
        self.host_sampler = host_sampler
        #: a state machine that outlives this round (see session.BlockSession); else one per run
        self._own_states = states
        #: changed-block map the source's writes are marked in: sync rounds read only what it names
        self.dirty_map = dirty_map
        #: what each report's process_trace says (continuous sync puts the replication lag there)
        self.trace = trace
        #: (source offset the running round has reached, source size); None before a round
        self.position: tuple[int, int] | None = None
        self.states: SessionStateMachine | None = None
        self._new_session()

    def _new_session(self) -> None:
        """What one session's threads share; fresh for every run() or check()."""
        self.tracker: ProgressTracker | None = None
        #: the running round's progress by the channel's frame bytes on the socket (with reports)
        self._marks: SentMarks | None = None
        self._peer_caps: frozenset = frozenset()
        self.replies = Replies()
        self._reconcile_note: str | None = None
        #: why the target may hold what this sender's rounds did not write (read_scope)
        self._not_ours: str | None = None
        self.clock = StageClock()

    def _state(self, event: StateEvent) -> None:
        if self.states is not None and self.states.can(event):
            self.states.fire(event)

    def _guarded_send(self, size: int) -> None:
        now = time.monotonic()
        self.guard.record(now, size)
        limit, threshold = self.limiter.current()
        self.guard.check(now, limit, threshold)

    # --- state ------------------------------------------------------------
    def _load_session(self, size: int) -> dict:
        private_makedirs(self.dir)
        path = os.path.join(self.dir, "session.json")
        try:
            with open(path) as fh:
                rec = json.load(fh)
            if rec.get("source_size") == size and rec.get("source") == self.source_path:
                return rec
            log.warning("state in %s is for another source; starting a new session", self.dir)
        except (FileNotFoundError, ValueError):
            pass
        rec = {"session_id": uuid.uuid4().hex, "source": self.source_path, "source_size": size, "rounds": 0}
        write_json_atomic(path, rec)
        return rec

    def _save_session(self, rec: dict) -> None:
        write_json_atomic(os.path.join(self.dir, "session.json"), rec)

    # --- the session --------------------------------------------------------
    def run(self) -> RoundResult:
        try:
            return self._run()
        except OSError as exc:  # the source's and the connections' errors are ReplicationErrors already
            raise StateError(f"this sender's state in {self.dir!r}: {exc.strerror or exc}") from None

    def _run(self) -> RoundResult:
        started = time.monotonic()
        self._new_session()
        with BlockSource(self.source_path) as source:
            rec = self._load_session(source.size)
            if self.stop_requested:
                raise TransportError("the round was stopped before it started")
            # no completed round here: the target may hold a copy all the same (this sender's state
            # was lost, or another host copied it), which the receiver's manifest describes
            stateless = not rec.get("rounds")
            chan = self._chan = self._open("block", rec["session_id"], source.size, _capabilities(stateless),
                                           prejoin=True)
            try:
                if self.stop_requested:  # came while connecting: stop() found no connection to break
                    raise TransportError("the round was stopped before it started")
                return self._session(source, rec, chan, started, stateless)
            finally:
                (self._chan or chan).close()  # the session's connections, extra ones too
                self._end_streams()  # (the stripes and their buffers go)

    def _session(self, source: BlockSource, rec: dict, chan: Channel, started: float, stateless: bool) -> RoundResult:
        welcome = expect_welcome(chan.recv())
        self._peer_caps = frozenset(welcome.capabilities)
        self._reconcile_note = None
        # the session this connection's HELLO named: its extra connections name it too (the
        # receiver's offer is for that one, even where _adopt takes another session over)
        hello_session = rec["session_id"]
        if welcome.session_id != rec["session_id"]:
            if not stateless:
                raise RemoteProtocolError(f"the receiver names session {welcome.session_id}, not this one's")
            self._adopt(rec, welcome)
        elif stateless and welcome.state == "new":
            self._reconcile_note = (
                "full copy: no local state for this target, and the receiver holds no completed copy to reconcile "
                "with" if F.ADOPT_SESSION in self._peer_caps else
                "full copy: no local state for this target, and the receiver is of a version that cannot reconcile")
        self._not_ours = _not_ours(rec, welcome, stateless)
        faults.point("sender.welcome")
        self.replies.on_streams = self.streams_granted
        # before the replies are read: an answer to STREAMS asked in HELLO comes right away
        spread = self._spread(chan, hello_session, source.size, self._peer_caps)
        self.replies.start(chan)
        chan = spread

        cache_path = os.path.join(self.dir, "target.manifest")
        check_resume_offset(welcome, source.size)
        plan = plan_round(welcome)
        if plan.resumed:
            cache = open_cache(cache_path, source.size) or ManifestFile.create(cache_path, source.size)
        elif plan.kind == "sync":
            cache = self._reconcile(chan, cache_path, source.size, welcome.manifest_root)
        else:
            cache = ManifestFile.create(cache_path, source.size)
        try:
            return self._round(source, rec, chan, started, plan.kind, plan.round_id, plan.start, cache)
        finally:
            cache.close()  # a failed round too: a continuous sync retries for weeks

    def _adopt(self, rec: dict, welcome: F.Welcome) -> None:
        """Take over the receiver's session (see F.ADOPT_SESSION): its manifest, fetched by
        _reconcile, says what the target holds, and the sync round sends what differs."""
        if welcome.state == "new" or (welcome.state == "partial" and welcome.round_kind == "full"):
            raise RemoteProtocolError(f"the receiver offers session {welcome.session_id} in state "
                                      f"{welcome.state}/{welcome.round_kind}, which has no completed round")
        log.info("no local state for target %s: taking over the receiver's session %s (round %d) and "
                 "reconciling with its manifest", self.target, welcome.session_id, welcome.round_id)
        rec["session_id"] = welcome.session_id
        self._save_session(rec)
        self._reconcile_note = (f"reconciled with the receiver's manifest: no local state for this target, "
                                f"session {welcome.session_id} taken over after its round {welcome.round_id}")

    def _round(self, source: BlockSource, rec: dict, chan: Channel, started: float, kind: str, round_id: int,
               start: int, cache: ManifestFile) -> RoundResult:
        log.info("%s round %d of %s -> %s, from offset %d", kind, round_id, self.source_path, self.target, start)
        scope = read_scope(self.dirty_map, kind, self._not_ours)
        self.states = self._own_states or SessionStateMachine(
            self.on_state, SessionState.SYNCED if kind == "sync" else SessionState.IDLE)
        self._state(StateEvent.SYNC_START if kind == "sync" else StateEvent.START)
        self.tracker = ProgressTracker(subtask_for("block", first_copy=kind == "full"), source.size - start,
                                       host_sampler=self.host_sampler)
        chan.limiter = self.limiter
        chan.on_sent = self._guarded_send
        wire0 = chan.wire_sent
        # why the target is not its own until a round completes; which round this sender began,
        # once the receiver says it did (a ROUND_BEGIN that never arrived leaves that round id
        # to another sender of the session)
        if self._not_ours:
            rec["not_ours"] = self._not_ours
            self._save_session(rec)
        self.replies.on_began = functools.partial(self._began, rec)
        # a CHECKPOINT may name only this round and only what was sent already
        self.replies.round_id, self.replies.sent_to = round_id, start
        self.position = (start, source.size)
        self._marks = marks = SentMarks(chan.frame_bytes_sent, (start, 0), at=chan.frame_bytes_queued) \
            if self.on_report is not None else None
        # reports go on until the receiver confirms the round: the last frames may still be leaving
        ticker: Ticker | contextlib.nullcontext = contextlib.nullcontext()
        if marks is not None and self.on_report is not None:
            def figures() -> tuple[int, int, int]:
                pos, raw = marks.value()
                return max(0, pos - start), chan.wire_acknowledged() - wire0, raw

            ticker = Ticker(RoundReports(self.tracker, self.on_report, figures, self.trace).update)
        try:
            with ticker:
                chan.send(F.RoundBegin(round_id, kind, start))
                self._state(StateEvent.COPY_RUNNING)
                data_bytes = self._stream(chan, source, cache if kind == "sync" else None, kind, start, cache,
                                          scope.frozen if scope.map_driven else None)
                self.replies.sent_to = source.size
                chan.send(F.RoundEnd(round_id))
                # the connection's last round: its CLOSE goes now, not a round trip after ROUND_DONE
                closing = F.EARLY_CLOSE in self._peer_caps
                if closing:
                    chan.send(F.Close("done"))
                faults.point("sender.round_end")
                self.replies.done.wait(IO_TIMEOUT)
            if self.replies.failure is not None:
                raise self.replies.failure
            if self.replies.round_done is None:
                raise TransportError("the receiver did not confirm the end of the round in time")
            faults.point("sender.round_done")  # durable there, not yet recorded here
        except ReplicationError as exc:
            if not self.stop_requested:  # a requested stop is a pause, not an error
                self._state(StateEvent.ERROR)
            reason = self.replies.peer_reason(exc, stopped=self.stop_requested)
            if reason is not exc:
                raise reason from None
            raise
        self.tracker.update(source.size - start, chan.wire_sent - wire0, data_bytes)
        if self.trace is not None:
            self.tracker.set_trace(self.trace())
        final = self.tracker.finish()
        if self.on_report:
            self.on_report(final)
        self._state(StateEvent.SYNC_DONE if kind == "sync" else StateEvent.COPY_DONE)
        self._digests.apply(None)
        cache.commit()
        dirty_blocks = scope.done(start)
        if cache.root.hex() != self.replies.round_done.manifest_root:
            # a resumed round's copy lacks what the receiver made durable after the last
            # CHECKPOINT this sender heard of before the cut: expected, and reconciled cheaply
            (log.info if start else log.warning)(
                "local copy of the target manifest differs from the receiver's%s; the next round reconciles it",
                " after a resumed round" if start else "")
        cache.close()
        rec["rounds"] = rec.get("rounds", 0) + 1
        rec["root"] = self.replies.round_done.manifest_root  # what the target holds after it (_not_ours)
        rec.pop("not_ours", None)  # the round read the whole source where that said so
        rec.pop("begun", None)
        self._save_session(rec)
        wire = chan.wire_sent - wire0
        self.replies.close(chan, sent=closing)
        return RoundResult(round_id, kind, start, source.size, data_bytes, wire, time.monotonic() - started,
                           dirty_blocks, self.clock.snapshot(), scope.whole_reason if kind == "sync" else None,
                           self._reconcile_note)

    def _began(self, rec: dict, round_id: int) -> None:
        """The receiver checkpointed this round: it is this sender's (_not_ours), cut or not."""
        rec["begun"] = round_id
        self._save_session(rec)

    def check(self, *, chunk: int = 8 << 20, extent: int = 1 << 20,
              on_progress: Callable[[int, int, int], None] | None = None) -> tuple[int, int]:
        """Compare the source, read now, with the receiver's manifest: the digests of what it
        verified on arrival and made durable. Returns (extents that differ, extents), an
        extent being ``extent`` bytes: the unit where a consistency result counts files
        (a target changed behind the receiver's back is not seen: it is not re-read).
        ``on_progress(bytes read, bytes to read, extents found different)``: at the start
        of the read and about every second."""
        self._new_session()
        with BlockSource(self.source_path) as source:
            rec = self._load_session(source.size)
            with self._check_session(source, rec["session_id"], list(CAPABILITIES)) as (chan, welcome):
                per = extent // FINE_BLOCK
                extents = -(-source.size // extent)
                if on_progress is not None:
                    on_progress(0, source.size, 0)
                if welcome.state != "synced":  # no completed round: nothing there counts as a copy
                    return extents, extents
                path = os.path.join(self.dir, "target.manifest")
                if not os.path.exists(path):
                    ManifestFile.create(path, source.size).close()
                cache = self._reconcile(chan, path, source.size, welcome.manifest_root)
                try:
                    buf = aligned_buffer(chunk)
                    digests = np.empty(chunk // FINE_BLOCK, dtype="<u8")
                    differ = 0
                    last = time.monotonic()
                    for off in range(0, source.size, chunk):
                        if on_progress is not None and time.monotonic() - last >= 1.0:
                            last = time.monotonic()
                            on_progress(off, source.size, differ)
                        n = min(chunk, source.size - off)
                        view = memoryview(buf)[:n]
                        if source.readinto(view, off) < n:
                            raise SourceError(f"source {self.source_path!r} ended before {off + n}")
                        k = -(-n // FINE_BLOCK)
                        kernels.block_digests(view, FINE_BLOCK, digests[:k])
                        neq = digests[:k] != cache.read_fine(off // FINE_BLOCK, k)
                        neq = np.concatenate((neq, np.zeros(-k % per, dtype=bool)))
                        differ += int(np.count_nonzero(neq.reshape(-1, per).any(axis=1)))
                finally:
                    cache.close()
                return differ, extents

    def dry_run(self) -> BlockDryRun:
        """What a round would send (``send block --dry-run``): the round's own decisions (the
        receiver's WELCOME for this session, its manifest reconciled, stream.round_events over
        the source), without a round. The session is a check (HELLO kind "verify", listing
        DRY_RUN): the receiver neither creates nor grows the target, nor begins a round. This
        session's state is read, not made; the local copy of the target's manifest is brought
        up to date, as a round would."""
        self._new_session()
        with BlockSource(self.source_path) as source:
            try:
                with open(os.path.join(self.dir, "session.json")) as fh:
                    rec = json.load(fh)
                if rec.get("source_size") != source.size or rec.get("source") != self.source_path:
                    rec = None
            except (OSError, ValueError):
                rec = None
            session_id = rec["session_id"] if rec else uuid.uuid4().hex  # a first run's new session
            stateless = rec is None or not rec.get("rounds")  # as _session: the receiver may offer its session
            with self._check_session(source, session_id, _capabilities(stateless) + [F.DRY_RUN]) as (chan, welcome):
                plan = plan_round(welcome, known=rec is not None or welcome.session_id != session_id)
                cache = None
                if plan.kind == "sync":
                    private_makedirs(self.dir)
                    cache = self._reconcile(chan, os.path.join(self.dir, "target.manifest"), source.size,
                                            welcome.manifest_root)
                try:
                    result = BlockDryRun(plan.kind, plan.round_id, plan.start, source.size, self.source_path)
                    big = "frame-8m" in self._peer_caps
                    for ev in round_events(source, start=plan.start, cache=cache, sets="block-set" in self._peer_caps,
                                           frame_blocks=FRAME_BLOCKS if big else LEGACY_FRAME_BLOCKS):
                        result.add(ev)
                finally:
                    if cache is not None:
                        cache.close()
                return result

    @contextlib.contextmanager
    def _check_session(self, source: BlockSource, session_id: str, capabilities: list[str]
                       ) -> Iterator[tuple[Channel, F.Welcome]]:
        """A session of kind "verify" (no round: the receiver neither creates nor changes the
        target) and its WELCOME, the receiver's replies read on a thread; closed after."""
        chan = self._chan = self._open("verify", session_id, source.size, capabilities)
        try:
            welcome = expect_welcome(chan.recv())
            self._peer_caps = frozenset(welcome.capabilities)
            self.replies.start(chan)
            yield chan, welcome
            self.replies.close(chan)
        finally:
            chan.close()
            self._chan = None

    def _reconcile(self, chan: Channel, path: str, size: int, root: str) -> ManifestFile:
        """Make the local copy of the target's manifest equal the receiver's."""
        return reconcile(functools.partial(self.replies.request, chan), path, size, root)

    def _stream(self, chan: Channel, source: BlockSource, against: ManifestFile | None, kind: str,
                start: int, cache: ManifestFile, dirty: FrozenMarks | None = None) -> int:
        """Send one round's frames (block_pipeline.py); ``self._marks`` (reports) told of each."""
        self._digests = PendingDigests(cache)
        return send_round(chan, source, start=start, against=against, dirty=dirty, digests=self._digests,
                          compression=self.compression, replies=self.replies, clock=self.clock,
                          peer_caps=self._peer_caps,
                          streams=(self._planned or 1) if "streams" in self._peer_caps else 1,
                          report=lambda covered, raw: setattr(self, "position", (covered, source.size)),
                          marks=self._marks)
