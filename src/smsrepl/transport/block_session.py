"""The receiver's block sessions: rounds of a disk image applied to a target, and consistency checks.

A block session (HELLO kind "block") claims its target, opens it (exclusively: a mounted or
claimed device is refused) with its replica (manifest and round record, blocks/replica.py),
and applies the sender's rounds: data verified against its digests on arrival, durable
checkpoints every few seconds, ROUND_DONE once the round is durable and recorded. A
consistency check (kind "verify") opens the same target read-only in effect and answers
manifest requests only.
"""
from __future__ import annotations

import logging
import os
import time

from smsrepl import faults
from smsrepl.blocks.target import BlockTarget
from smsrepl.blocks.manifest import GROUP_BLOCKS
from smsrepl.blocks.replica import Replica
from smsrepl.errors import RefusedError, RemoteProtocolError, ReplicationError
from smsrepl.protocol import CAPABILITIES, PROTOCOL_VERSION
from smsrepl.protocol import frames as F
from smsrepl.transport import targets as target_checks
from smsrepl.transport.limits import MAX_MANIFEST_ENTRIES
from smsrepl.transport.session import CONTROL, Handler

log = logging.getLogger("smsrepl.receiver")
#: one line per completed block round, with its stage breakdown (`smsrepl receive` shows it)
rounds_log = logging.getLogger("smsrepl.receiver.rounds")


class _BlockTarget(Handler):
    """What block sessions and consistency checks share: the claimed target and its replica."""

    verify = False
    replica: Replica | None = None
    #: the block session whose rounds this connection runs: the HELLO's, or the one a sender
    #: without state of its own took over (_adopt)
    session_id = ""

    def _open(self) -> bool:
        """Claim the target, open it and its replica, and welcome the sender.

        For a consistency check (``verify``: by any sender of the source certificate, whatever
        its session) the target is opened read-only in effect (no round may begin), and one that
        does not exist is described as new without being created. False when there is none."""
        ev, host, verify = self.hello, self.host, self.verify
        if ev.target not in host.targets:
            raise target_checks.unknown(ev.target, host.targets)
        if ev.block_size != F.FINE_BLOCK:
            raise RefusedError(f"block size {ev.block_size} unsupported (need {F.FINE_BLOCK})")
        self.session.claim(ev.target)
        path = host.targets[ev.target]
        target_checks.check_kind(ev.target, path, ev.kind)
        if ev.kind == "block":
            target_checks.check_no_loop_device(ev.target, path)  # attached since the receiver started
        if not (verify or host.create or os.path.exists(path)):
            raise target_checks.missing(ev.target, path)
        if verify and not os.path.exists(path):
            self.chan.send(F.Welcome(PROTOCOL_VERSION, ev.session_id, 0, "new", 0, "full", 0, "",
                                     capabilities=list(CAPABILITIES)))
            return False
        # exclusive: a mounted or claimed device is refused, and stays claimed while the session writes
        target = BlockTarget(path, need_size=None if verify else ev.source_size, create=host.create and not verify,
                             direct=not verify, name=ev.target, exclusive=not verify)
        try:
            replica = self.replica = Replica(target, os.path.join(host.state_dir, ev.target))
        except BaseException:
            target.close()
            raise
        self.session_id = ev.session_id
        if F.ADOPT_SESSION in ev.capabilities and (not verify or F.DRY_RUN in ev.capabilities):
            self._adopt(replica)  # a dry run is told what its round would be told (nothing is kept)
        # a dry run (a check that says what a round of this session would send) is described
        # as the session's round would be
        desc = replica.describe(self.session_id, ev.source_size,
                                any_session=verify and F.DRY_RUN not in ev.capabilities)
        self.chan.send(F.Welcome(PROTOCOL_VERSION, self.session_id, target.size, capabilities=list(CAPABILITIES),
                                 **desc))
        faults.point("receiver.welcome")
        log.info("%s: %s %s for target %s (%s)", self.peer, "consistency check" if verify else "session",
                 self.session_id, ev.target, desc["state"])
        return True

    def _adopt(self, replica: Replica) -> None:
        """A sender without a completed round of its own (its state lost, or another host's)
        takes this target's session over where the manifest allows (Replica.why_not_reconcilable):
        its next round is a sync round against what the target holds, not a full copy."""
        ev, rec = self.hello, replica.record
        if rec is None or rec.session_id == ev.session_id:
            return  # nothing to take over, or its own session: a resume as usual
        why = replica.why_not_reconcilable(ev.source_size)
        if why:
            log.warning("%s: target %s: a sender without local state cannot reconcile with this target (%s); "
                        "it copies the whole source", self.peer, ev.target, why)
            return
        log.info("%s: target %s: session %s, without local state, takes over session %s and reconciles "
                 "with its manifest", self.peer, ev.target, ev.session_id, rec.session_id)
        self.session_id = rec.session_id

    def _answer_manifest(self, req: F.ManifestRequest) -> None:
        man = self.replica.manifest if self.replica else None
        if man is None:
            raise RemoteProtocolError("manifest requested but this target has none")
        total = man.ngroups if req.level == "coarse" else man.nblocks
        if req.count > MAX_MANIFEST_ENTRIES or req.first + req.count > total:
            raise RemoteProtocolError(f"manifest request {req.level} {req.first}+{req.count} is out of range")
        if req.level == "coarse":
            entries = man.coarse[req.first:req.first + req.count]
        else:
            entries = man.read_fine(req.first, req.count, verify=req.first % GROUP_BLOCKS == 0)
        self.chan.send(F.ManifestData(req.level, req.first, entries))

    def ended(self, why: ReplicationError) -> ReplicationError:
        """``why``, with where a cut block round stands now that its data is durable (the
        sender resumes there)."""
        replica = self.replica
        rec = replica.record if replica is not None else None
        if replica is None or rec is None or not rec.active:
            return why
        try:
            offset = replica.checkpoint()
        except ReplicationError:
            return why  # close() says so
        return type(why)(f"{why.message} (round {rec.round_id} of target {self.hello.target!r} "
                         f"checkpointed at {offset} of {rec.source_size} bytes)")

    def close(self) -> None:
        replica = self.replica
        if replica is None:
            return
        rec = replica.record
        try:
            offset = replica.checkpoint()  # keep what arrived intact before the cut
            if rec is not None and rec.active:
                (log.warning if self.session.ended is not None else log.info)(
                    "%s: target %s: round %d checkpointed at %d of %d bytes", self.peer, self.hello.target,
                    rec.round_id, offset, rec.source_size)
        except ReplicationError as exc:
            log.warning("%s: final checkpoint failed: %s", self.peer, exc)
        try:
            replica.close()
        finally:
            replica.target.close()


class BlockSession(_BlockTarget):
    """HELLO kind "block": rounds applied to the target."""

    def serve(self) -> bool:
        self._open()
        replica = self.replica
        assert replica is not None
        session, hello = self.session, self.hello
        frames = session.start_reader(3, replica.clock)
        session.grant_hello_ask()
        last_ckpt = time.monotonic()
        in_round: F.RoundBegin | None = None
        try:
            while True:
                ev = session.next_frame(frames)
                if isinstance(ev, F.BlockData):
                    replica.apply_data(ev.offset, ev.raw_len, ev.codec, ev.digests, ev.payload,
                                       zeros=ev.zeros, check=ev.check)
                    faults.point("receiver.data")
                elif isinstance(ev, F.BlockSet):
                    replica.apply_set(ev.offset, ev.index, ev.codec, ev.digests, ev.payload)
                    faults.point("receiver.data")
                    faults.point("receiver.set")  # a map-driven sync round's scattered blocks
                elif isinstance(ev, F.ZeroRange):
                    replica.apply_zero(ev.offset, ev.length)
                elif isinstance(ev, F.Scanned):
                    replica.scanned(ev.offset)
                elif isinstance(ev, F.RoundBegin):
                    replica.begin(self.session_id, hello.source_size, ev.round_id, ev.kind, ev.start)
                    in_round = ev
                    last_ckpt = time.monotonic()
                elif isinstance(ev, F.RoundEnd):
                    root = replica.finish(ev.round_id)
                    session.written += replica.bytes_written
                    session.rounds += 1
                    in_round = None
                    faults.point("receiver.round_done")  # durable and recorded, not yet confirmed
                    self.chan.send(F.RoundDone(ev.round_id, root))
                    rounds_log.info("%s: round %d done, %d bytes written; stage seconds: %s", hello.target,
                                    ev.round_id, replica.bytes_written, replica.clock.line(),
                                    extra={"target": hello.target, "peer": self.peer, "round_id": ev.round_id,
                                           "bytes_written": replica.bytes_written})
                elif isinstance(ev, F.ManifestRequest):
                    self._answer_manifest(ev)
                elif isinstance(ev, CONTROL):
                    if session.control(ev, " mid-round" if in_round else ""):
                        return True
                if in_round is not None and time.monotonic() - last_ckpt >= self.host.checkpoint_seconds:
                    offset = replica.checkpoint()
                    self.chan.send(F.Checkpoint(in_round.round_id, offset, replica.bytes_written))
                    last_ckpt = time.monotonic()
        finally:
            session.written += replica.bytes_written if in_round is not None else 0


class ConsistencyCheck(_BlockTarget):
    """HELLO kind "verify": manifest requests answered until the sender closes; no data, no round."""

    verify = True

    def serve(self) -> bool:
        self._open()
        while True:
            ev = self.chan.recv()
            if isinstance(ev, F.ManifestRequest):
                self._answer_manifest(ev)
            elif isinstance(ev, CONTROL):
                if self.session.control(ev, ""):
                    return True
            else:
                raise RemoteProtocolError(f"{type(ev).__name__} in a consistency check session")
