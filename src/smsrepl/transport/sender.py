"""The source-side endpoint: one session, one source, one target; one round per run."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import ssl
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass

from smsrepl._lazy import np

from smsrepl import faults, kernels
from smsrepl.blocks.device import BlockSource
from smsrepl.blocks.direct import aligned_buffer
from smsrepl.blocks.manifest import ManifestFile, runs_of
from smsrepl.kernels import FINE_BLOCK
from smsrepl.blocks.replica import private_makedirs, write_json_atomic
from smsrepl.blocks.dirtymap import DirtyMap
from smsrepl.blocks.stream import (CHUNK_END, FRAME_BLOCKS, LEGACY_FRAME_BLOCKS, Covered,
                                   dirty_round_events, round_events)
from smsrepl.codec import AUTO_LEVELS, DEFAULT_LEVEL, AdaptiveChoice, Compressor
from smsrepl.errors import (ManifestError, RemoteError, RemoteProtocolError, ReplicationError,
                            SourceError, TransportError)
from smsrepl.control.progress import HostSampler, ProgressTracker, subtask_for
from smsrepl.protocol import CAPABILITIES, PROTOCOL_VERSION, SENDER, Connection, ConnectionClosed
from smsrepl.throttle import CpuCap, OverSpeedGuard, ScheduledLimiter, SpeedSchedule
from smsrepl.stages import StageClock
from smsrepl.control.state import Event as StateEvent
from smsrepl.control.state import SessionState, SessionStateMachine, StatePair
from smsrepl.protocol import frames as F
from smsrepl.transport.channel import Channel
from smsrepl.transport.connect import IO_TIMEOUT, check_target_name, connect, parse_address  # noqa: F401 (re-exported for agents)
from smsrepl.transport.limits import MAX_MANIFEST_ENTRIES

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


@dataclass
class BlockDryRun:
    """What a block round would send: BLOCK_DATA/BLOCK_SET blocks and their ranges, and the
    ranges of zero blocks sent as ZERO_RANGE (no data)."""

    kind: str
    round_id: int
    start: int
    source_size: int
    source: str
    blocks: int = 0
    data_bytes: int = 0  # what the round's data_bytes would be
    zero_bytes: int = 0
    ranges: list = dataclasses.field(default_factory=list)  # [offset, length] of the data, merged

    def add(self, ev) -> None:
        if isinstance(ev, F.BlockData):
            self._range(ev.offset, ev.raw_len)
        elif isinstance(ev, F.BlockSet):
            for i in ev.index.tolist():
                self._range(ev.offset + i * FINE_BLOCK, min(FINE_BLOCK, self.source_size - ev.offset - i * FINE_BLOCK))
        elif isinstance(ev, F.ZeroRange):
            self.zero_bytes += ev.length

    def _range(self, offset: int, length: int) -> None:
        self.blocks += -(-length // FINE_BLOCK)
        self.data_bytes += length
        if self.ranges and self.ranges[-1][0] + self.ranges[-1][1] == offset:
            self.ranges[-1][1] += length
        else:
            self.ranges.append([offset, length])

    def summary(self, target: str) -> str:
        where = f" from offset {self.start}" if self.start else ""
        return (f"dry run, {self.kind} round {self.round_id} of {self.source!r} ({self.source_size} bytes) to target "
                f"{target!r}{where}: {self.blocks} blocks ({self.data_bytes} bytes) in {len(self.ranges)} ranges "
                f"would be sent, {self.zero_bytes} bytes of zero blocks as zero ranges; nothing was changed")


def _source_bytes(frame) -> int:
    """The source bytes a BLOCK_DATA or BLOCK_SET frame covers."""
    return frame.raw_len if isinstance(frame, F.BlockData) else len(frame.index) * FINE_BLOCK


def _frame_end(frame) -> int:
    """The source offset a round frame takes the receiver to (0 for frames that move nothing)."""
    if isinstance(frame, F.BlockData):
        return frame.offset + frame.raw_len
    if isinstance(frame, F.BlockSet):
        return frame.offset + (int(frame.index[-1]) + 1) * FINE_BLOCK
    if isinstance(frame, F.ZeroRange):
        return frame.offset + frame.length
    if isinstance(frame, F.Scanned):
        return frame.offset
    return 0


class Sender:
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
        dirty_map: DirtyMap | None = None,
        trace: Callable[[], str] | None = None,
    ) -> None:
        self.source_path = os.path.abspath(source_path)
        self.target = check_target_name(target)
        self.address = address
        self.context = context
        self.dir = os.path.join(os.path.abspath(state_dir), self.target)
        self.level = level
        #: "auto": each frame at the level of AUTO_LEVELS (0: raw) that moves data fastest so far
        self._zlevel = max(AUTO_LEVELS) if level == "auto" else level
        # zstd releases the GIL: one compressor per core keeps the sender from
        # being bound by compression (measured: 225 MB/s per core at level 1 on
        # binaries here, 380 MB/s with two)
        self.compress_threads = compress_threads or min(4, os.cpu_count() or 1)
        self._local = threading.local()
        #: the running session's speed schedule; replace_schedule() changes it live
        self.limiter = ScheduledLimiter(speed_limit)
        self.guard = OverSpeedGuard()
        self.cpu_cap = cpu_cap
        self.on_report = on_report
        self.on_state = on_state
        self.host_sampler = host_sampler
        #: a state machine that outlives this round (see session.BlockSession); else one per run
        self._own_states = states
        #: changed-block map the source's writes are marked in: sync rounds read only what it names
        self.dirty_map = dirty_map
        #: what each report's process_trace says (continuous sync puts the replication lag there)
        self.trace = trace
        self._chan: Channel | None = None
        #: (source offset the running round has reached, source size); None before a round
        self.position: tuple[int, int] | None = None
        self.stop_requested = False
        self._stopped = threading.Event()  # ends a CPU cap's pacing (the cap may outlive this sender)
        self.states: SessionStateMachine | None = None
        self._new_session()
        self.adapt = AdaptiveChoice(self.compress_threads, AUTO_LEVELS) if level == "auto" else None

    def _new_session(self) -> None:
        """What one session's threads share; fresh for every run() or check()."""
        self.tracker: ProgressTracker | None = None
        self._last_report = 0.0
        self._wire0 = 0
        self._acked = 0
        self._peer_caps: frozenset = frozenset()
        self._done = threading.Event()
        self._round_done: F.RoundDone | None = None
        self._round_id = 0
        self._sent_to = 0
        self._failure: BaseException | None = None
        self._replies: queue.Queue = queue.Queue()
        self._reconcile_note: str | None = None
        self.clock = StageClock()

    def stop(self) -> None:
        """Pause: break the running round from another thread. What the receiver made
        durable stays; the next run resumes from its checkpoint."""
        self.stop_requested = True
        self._stopped.set()
        self.limiter.release()
        chan = self._chan
        if chan is not None:
            chan.abort()

    def replace_schedule(self, schedule: SpeedSchedule) -> None:
        """Change the speed schedule of the running session, effective at once."""
        self.limiter.replace_schedule(schedule)

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
        started = time.monotonic()
        self._new_session()
        with BlockSource(self.source_path) as source:
            rec = self._load_session(source.size)
            if self.stop_requested:
                raise TransportError("the round was stopped before it started")
            chan = Channel(connect(self.address, self.context), Connection(SENDER))
            self._chan = chan
            try:
                return self._session(source, rec, chan, started)
            finally:
                chan.close()
                self._chan = None

    def _session(self, source: BlockSource, rec: dict, chan: Channel, started: float) -> RoundResult:
        # no completed round here: the target may hold a copy all the same (this sender's state
        # was lost, or another host copied it), which the receiver's manifest describes
        stateless = not rec.get("rounds")
        caps = [c for c in CAPABILITIES if c != F.ADOPT_SESSION or stateless]
        chan.send(F.Hello([PROTOCOL_VERSION], "block", self.target, rec["session_id"], source.size, F.FINE_BLOCK, caps))
        welcome = chan.recv()
        self._raise_if_error(welcome)
        if not isinstance(welcome, F.Welcome):
            raise RemoteProtocolError(f"expected WELCOME, got {type(welcome).__name__}")
        self._peer_caps = frozenset(welcome.capabilities)
        self._reconcile_note = None
        if welcome.session_id != rec["session_id"]:
            if not stateless:
                raise RemoteProtocolError(f"the receiver names session {welcome.session_id}, not this one's")
            self._adopt(rec, welcome)
        elif stateless and welcome.state == "new":
            self._reconcile_note = (
                "full copy: no local state for this target, and the receiver holds no completed copy to reconcile "
                "with" if F.ADOPT_SESSION in self._peer_caps else
                "full copy: no local state for this target, and the receiver is of a version that cannot reconcile")
        faults.point("sender.welcome")
        reader = threading.Thread(target=self._read_loop, args=(chan,), daemon=True)
        reader.start()

        cache_path = os.path.join(self.dir, "target.manifest")
        if welcome.state == "partial" and not (
                0 <= welcome.checkpoint <= source.size
                and (welcome.checkpoint % F.FINE_BLOCK == 0 or welcome.checkpoint == source.size)):
            raise RemoteProtocolError(f"the receiver offers to resume at {welcome.checkpoint}, which is not "
                                      f"a block boundary of the {source.size}-byte source")
        if welcome.state == "partial" and welcome.round_kind == "full":
            kind, round_id, start = "full", welcome.round_id, welcome.checkpoint
            cache = self._open_cache(cache_path, source.size) or ManifestFile.create(cache_path, source.size)
        elif welcome.state in ("synced", "partial"):
            kind, round_id, start = "sync", welcome.round_id + 1, 0
            cache = self._reconcile(chan, cache_path, source.size, welcome.manifest_root)
        else:
            kind, round_id, start = "full", max(1, welcome.round_id + 1), 0
            cache = ManifestFile.create(cache_path, source.size)
        try:
            return self._round(source, rec, chan, started, kind, round_id, start, cache)
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
        dm, frozen, map_driven, whole_reason = self.dirty_map, None, False, None
        if dm is not None:
            # writes from here on go to a fresh slot and are the next round's
            frozen = dm.freeze()
            # a session taken over: the map marks writes since this sender's last round, not
            # since what the target holds
            map_driven = kind == "sync" and dm.trusted and self._reconcile_note is None
            if not map_driven:
                whole_reason = dm.reason if self._reconcile_note is None else "a session taken over: no local state"
                log.info("dirty map not used for this round (%s): reading the whole source", dm.reason)

        self.states = self._own_states or SessionStateMachine(
            self.on_state, SessionState.SYNCED if kind == "sync" else SessionState.IDLE)
        self._state(StateEvent.SYNC_START if kind == "sync" else StateEvent.START)
        self.tracker = ProgressTracker(subtask_for("block", first_copy=kind == "full"), source.size - start,
                                       host_sampler=self.host_sampler)
        chan.limiter = self.limiter
        chan.on_sent = self._guarded_send
        wire0 = chan.wire_sent
        self._wire0 = wire0
        # a CHECKPOINT may name only this round and only what was sent already
        self._round_id, self._sent_to = round_id, start
        self.position = (start, source.size)
        try:
            chan.send(F.RoundBegin(round_id, kind, start))
            self._state(StateEvent.COPY_RUNNING)
            data_bytes = self._stream(chan, source, cache if kind == "sync" else None, kind, start, cache,
                                      frozen if map_driven else None)
            self._sent_to = source.size
            chan.send(F.RoundEnd(round_id))
            faults.point("sender.round_end")
            self._done.wait(IO_TIMEOUT)
            if self._failure is not None:
                raise self._failure
            if self._round_done is None:
                raise TransportError("the receiver did not confirm the end of the round in time")
            faults.point("sender.round_done")  # durable there, not yet recorded here
        except ReplicationError as exc:
            if not self.stop_requested:  # a requested stop is a pause, not an error
                self._state(StateEvent.ERROR)
            reason = self._peer_reason(exc)
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
        self._apply_acks(cache, None)
        cache.commit()
        if frozen is not None and (map_driven or start == 0):
            # durable on the target: this round's marks may go. A round that read the
            # whole source after the freeze also makes an untrusted map trustworthy;
            # a resumed full round did not (writes below its start before the freeze
            # may be unmarked), so the next round scans again
            dirty_blocks = frozen.dirty_blocks() if map_driven else None
            frozen.release()
            if not dm.trusted:
                dm.trust()
        else:
            dirty_blocks = None
        if cache.root.hex() != self._round_done.manifest_root:
            # a resumed round's copy lacks what the receiver made durable after the last
            # CHECKPOINT this sender heard of before the cut: expected, and reconciled cheaply
            (log.info if start else log.warning)(
                "local copy of the target manifest differs from the receiver's%s; the next round reconciles it",
                " after a resumed round" if start else "")
        cache.close()
        rec["rounds"] = rec.get("rounds", 0) + 1
        self._save_session(rec)
        wire = chan.wire_sent - wire0
        self._close(chan)
        return RoundResult(round_id, kind, start, source.size, data_bytes, wire, time.monotonic() - started,
                           dirty_blocks, self.clock.snapshot(), whole_reason if kind == "sync" else None,
                           self._reconcile_note)

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
            chan = Channel(connect(self.address, self.context), Connection(SENDER))
            self._chan = chan
            try:
                chan.send(F.Hello([PROTOCOL_VERSION], "verify", self.target, rec["session_id"], source.size,
                                  F.FINE_BLOCK, list(CAPABILITIES)))
                welcome = chan.recv()
                self._raise_if_error(welcome)
                if not isinstance(welcome, F.Welcome):
                    raise RemoteProtocolError(f"expected WELCOME, got {type(welcome).__name__}")
                threading.Thread(target=self._read_loop, args=(chan,), daemon=True).start()
                per = extent // FINE_BLOCK
                extents = -(-source.size // extent)
                if on_progress is not None:
                    on_progress(0, source.size, 0)
                if welcome.state != "synced":  # no completed round: nothing there counts as a copy
                    self._close(chan)
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
                self._close(chan)
                return differ, extents
            finally:
                chan.close()

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
            chan = Channel(connect(self.address, self.context), Connection(SENDER))
            self._chan = chan
            try:
                chan.send(F.Hello([PROTOCOL_VERSION], "verify", self.target, session_id, source.size,
                                  F.FINE_BLOCK, [c for c in CAPABILITIES if c != F.ADOPT_SESSION or stateless]
                                  + [F.DRY_RUN]))
                welcome = chan.recv()
                self._raise_if_error(welcome)
                if not isinstance(welcome, F.Welcome):
                    raise RemoteProtocolError(f"expected WELCOME, got {type(welcome).__name__}")
                self._peer_caps = frozenset(welcome.capabilities)
                threading.Thread(target=self._read_loop, args=(chan,), daemon=True).start()
                cache, start = None, 0
                if welcome.state == "partial" and welcome.round_kind == "full":
                    kind, round_id, start = "full", welcome.round_id, welcome.checkpoint
                elif welcome.state in ("synced", "partial") and (rec is not None or welcome.session_id != session_id):
                    kind, round_id = "sync", welcome.round_id + 1
                    private_makedirs(self.dir)
                    cache = self._reconcile(chan, os.path.join(self.dir, "target.manifest"), source.size,
                                            welcome.manifest_root)
                else:
                    kind, round_id = "full", max(1, welcome.round_id + 1)
                try:
                    result = BlockDryRun(kind, round_id, start, source.size, self.source_path)
                    big = "frame-8m" in self._peer_caps
                    for ev in round_events(source, start=start, cache=cache, sets="block-set" in self._peer_caps,
                                           frame_blocks=FRAME_BLOCKS if big else LEGACY_FRAME_BLOCKS):
                        result.add(ev)
                finally:
                    if cache is not None:
                        cache.close()
                self._close(chan)
                return result
            finally:
                chan.close()
                self._chan = None

    def _open_cache(self, path: str, size: int, *, verify: bool = False) -> ManifestFile | None:
        if not os.path.exists(path):
            log.info("no local copy of the target manifest; fetching it")
            return None
        try:
            cache = ManifestFile.open(path, writable=True, expect_size=size)
            if verify:
                cache.verify()  # the round reads it unverified, range by range
            return cache
        except ManifestError as exc:
            log.warning("local copy of the target manifest is unusable (%s); fetching it again", exc)
            return None

    def _reconcile(self, chan: Channel, path: str, size: int, root: str) -> ManifestFile:
        """Make the local copy of the target's manifest equal the receiver's."""
        cache = self._open_cache(path, size, verify=True) or ManifestFile.create(path, size)
        if cache.root.hex() == root:
            return cache
        try:
            return self._fetch_differences(chan, cache, root)
        except BaseException:
            cache.close()
            raise

    def _fetch_differences(self, chan: Channel, cache: ManifestFile, root: str) -> ManifestFile:
        coarse = np.empty_like(cache.coarse)
        for first in range(0, cache.ngroups, MAX_MANIFEST_ENTRIES):
            n = min(MAX_MANIFEST_ENTRIES, cache.ngroups - first)
            coarse[first:first + n] = self._request(chan, "coarse", first, n)
        differ = np.any(coarse != cache.coarse, axis=1)
        fetched = 0
        for g0, gn in runs_of(differ):
            b0 = g0 * 256
            b1 = min((g0 + gn) * 256, cache.nblocks)
            for first in range(b0, b1, MAX_MANIFEST_ENTRIES):
                n = min(MAX_MANIFEST_ENTRIES, b1 - first)
                cache.write_fine(first, self._request(chan, "fine", first, n))
                fetched += n
        cache.commit()
        log.info("reconciled target manifest: %d of %d groups differed, %d digests fetched",
                 int(differ.sum()), cache.ngroups, fetched)
        if cache.root.hex() != root:
            raise RemoteProtocolError("the receiver's manifest does not match its own root after reconciliation")
        return cache

    def _request(self, chan: Channel, level: str, first: int, count: int) -> np.ndarray:
        chan.send(F.ManifestRequest(level, first, count))
        ev = self._replies.get(timeout=IO_TIMEOUT)
        if isinstance(ev, BaseException):
            raise ev
        if not isinstance(ev, F.ManifestData) or ev.level != level or ev.first != first or len(ev.entries) != count:
            raise RemoteProtocolError("manifest answer does not match the request")
        return ev.entries

    def _encode(self, ev: F.BlockData | F.BlockSet, level: int) -> F.BlockData | F.BlockSet:
        comps = getattr(self._local, "comps", None)
        if comps is None:
            comps = self._local.comps = {}
        comp = comps.get(level)
        if comp is None:
            comp = comps[level] = Compressor(level)
        t0 = time.perf_counter()
        codec, payload = comp.encode(ev.payload)
        dt = time.perf_counter() - t0
        self.clock.add("compress", dt)
        if self.adapt is not None:
            self.adapt.record_compress(level, _source_bytes(ev), dt)
        if self.cpu_cap is not None:
            self.cpu_cap.pace(self._stopped)
        return dataclasses.replace(ev, codec=codec, payload=payload)

    def _stream(self, chan: Channel, source: BlockSource, against: ManifestFile | None, kind: str,
                start: int, cache: ManifestFile, dirty=None) -> int:
        """Send one round's frames: read and digest here, compress on a pool, write on a thread."""
        out: queue.Queue = queue.Queue(maxsize=2)
        writer_error: list[BaseException] = []
        adapt = self.adapt

        def writer() -> None:
            try:
                while True:
                    work = out.get()
                    if work is None:
                        return
                    batch, covered, raw = work
                    for item, level in batch:
                        frame = item.result() if isinstance(item, Future) else item
                        # a CHECKPOINT may cover this frame once it is sent: allow it first
                        self._sent_to = max(self._sent_to, _frame_end(frame))
                        t0, w0 = time.perf_counter(), chan.wire_sent
                        chan.send(frame)
                        dt = time.perf_counter() - t0
                        self.clock.add("send", dt)
                        if adapt is not None and isinstance(frame, (F.BlockData, F.BlockSet)):
                            adapt.record_send(level, _source_bytes(frame), chan.wire_sent - w0, dt)
                    faults.point("sender.data")
                    # progress counts what reached the socket, not what was read ahead
                    self._report(kind, covered, start, total, raw, chan)
            except BaseException as exc:
                writer_error.append(exc)
                while out.get() is not None:  # drain so the producer never blocks forever
                    pass

        wt = threading.Thread(target=writer, daemon=True)
        wt.start()
        pool = ThreadPoolExecutor(self.compress_threads, thread_name_prefix="zstd") if self._zlevel else None
        pending: list[Covered] = []
        self._pending = pending
        sent = 0
        batch: list = []
        total = source.size - start
        covered_to = start
        try:
            sets = "block-set" in self._peer_caps
            if dirty is not None:  # a frozen dirty map: read only what it names
                events = dirty_round_events(source, dirty, cache, sets=sets, clock=self.clock)
            else:
                big = "frame-8m" in self._peer_caps
                events = round_events(source, start=start, cache=against, sets=sets,
                                      frame_blocks=FRAME_BLOCKS if big else LEGACY_FRAME_BLOCKS, clock=self.clock)
            for item in events:
                if writer_error or self._failure:
                    break
                if isinstance(item, Covered):
                    pending.append(item)
                    covered_to = min(source.size, item.end * FINE_BLOCK)
                    continue
                if item is CHUNK_END:
                    # exactly one batch per read chunk, even an empty one: with at most
                    # 3 batches queued or being written, 1 chunk being cut into frames and
                    # stream.AHEAD being read, the stream.BUFFERS read buffers are never
                    # reused before their frames are sent
                    out.put((batch, covered_to, sent))
                    batch = []
                    if self.cpu_cap is not None:
                        self.cpu_cap.pace(self._stopped)
                    self._apply_acks(cache, self._acked)
                    continue
                level = None
                if isinstance(item, (F.BlockData, F.BlockSet)):
                    sent += _source_bytes(item)
                    level = self._zlevel if adapt is None else adapt.choose()
                    if level:
                        item = pool.submit(self._encode, item, level)
                batch.append((item, level))
            if batch:
                out.put((batch, covered_to, sent))
        finally:
            out.put(None)
            wt.join()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        if writer_error:
            raise self._failure or writer_error[0]  # _session prefers the receiver's ERROR
        if self._failure:
            raise self._failure
        return sent

    def _report(self, kind: str, pos: int, start: int, total: int, sent: int, chan: Channel) -> None:
        """Feed the 5.4.8 tracker with what reached the socket; emit a report at most once a second."""
        if self.tracker is None:
            return
        self.position = (pos, start + total)
        self.tracker.update(max(0, pos - start), chan.wire_sent - self._wire0, sent)
        if self.trace is not None:
            self.tracker.set_trace(self.trace())
        now = time.monotonic()
        if self.on_report is not None and now - self._last_report >= 1.0:
            self._last_report = now
            self.on_report(self.tracker.report())

    def _apply_acks(self, cache: ManifestFile, acked: int | None) -> None:
        """Copy digests the receiver has made durable into the local manifest copy."""
        pending = self._pending
        limit = None if acked is None else acked // FINE_BLOCK
        i = 0
        for i, cov in enumerate(pending):
            if limit is not None and cov.end > limit:
                break
            if cov.index is None:
                cache.write_fine(cov.first, cov.digests)
            else:
                cache.write_fine_at(cov.first, cov.index, cov.digests)
        else:
            i = len(pending)
        del pending[:i]

    def _read_loop(self, chan: Channel) -> None:
        try:
            while True:
                ev = chan.recv()
                if isinstance(ev, F.Checkpoint):
                    if ev.round_id != self._round_id or ev.offset > self._sent_to:
                        raise RemoteProtocolError(
                            f"the receiver acknowledged offset {ev.offset} of round {ev.round_id}, but round "
                            f"{self._round_id} has sent only up to {self._sent_to}: it claims data it never got")
                    self._acked = max(self._acked, ev.offset)
                elif isinstance(ev, F.RoundDone):
                    self._round_done = ev
                    self._done.set()
                elif isinstance(ev, (F.ManifestData, F.Pong, F.Close)):
                    self._replies.put(ev)
                    if isinstance(ev, F.Close):
                        return
                elif isinstance(ev, F.Error):
                    self._raise_if_error(ev)
                elif isinstance(ev, ConnectionClosed):
                    raise TransportError("the receiver closed the connection")
        except BaseException as exc:
            self._failure = exc
            self._replies.put(exc)
            self._done.set()
            # the session is over: a writer blocked on a full socket (a peer or middlebox that
            # stopped reading) must fail now, not at the socket timeout minutes later
            chan.abort()

    def _peer_reason(self, exc: ReplicationError) -> ReplicationError:
        """The receiver's ERROR, where it sent one, rather than what the end of the connection did
        here: a send that failed because the reader, on that ERROR, shut the socket down (or
        because the receiver hung up after it) says only "broken pipe"."""
        if isinstance(exc, TransportError) and not self.stop_requested:
            self._done.wait(2.0)  # the reader may still be taking the ERROR in
        failure = self._failure
        return failure if isinstance(failure, RemoteError) else exc

    @staticmethod
    def _raise_if_error(ev: F.Event) -> None:
        if isinstance(ev, F.Error):
            raise RemoteError(f"receiver: {ev.message}", code=ev.code or None, exit_code=ev.exit_code, resumable=ev.resumable)
        if isinstance(ev, ConnectionClosed):
            raise TransportError("the receiver closed the connection")

    def _close(self, chan: Channel) -> None:
        try:
            chan.send(F.Close("done"))
            ev = self._replies.get(timeout=30)
            if isinstance(ev, BaseException):
                raise ev
        except (ReplicationError, queue.Empty):
            pass  # the round is durable already; a lost goodbye changes nothing
