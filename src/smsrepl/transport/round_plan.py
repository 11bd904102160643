"""Planning a block round: which round the receiver's WELCOME calls for, which blocks it reads,
and what a dry run of it would send.

The receiver describes its target in WELCOME: a full round cut short resumes at its
checkpoint, a target with a completed round gets a sync round, anything else a new full copy.
A sync round with a trusted dirty map reads only the blocks the map marked since the last
round (frozen at the round's start; later writes are the next round's); otherwise it reads
the whole source, and the reason is reported.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from smsrepl.blocks.dirtymap import ChangeMap, FrozenMarks
from smsrepl.errors import RemoteProtocolError
from smsrepl.kernels import FINE_BLOCK
from smsrepl.protocol import frames as F

log = logging.getLogger("smsrepl.sender")


@dataclass(frozen=True, slots=True)
class RoundPlan:
    kind: str  # "full" or "sync"
    round_id: int
    start: int  # the source offset it begins at (a resumed full round's checkpoint)
    #: a full round cut short, resumed: its local manifest copy is kept
    resumed: bool = False


def plan_round(welcome: F.Welcome, *, known: bool = True) -> RoundPlan:
    """The round that WELCOME calls for. ``known``: the receiver's session is one this sender
    has state for (or took over); a dry run without state plans a new full copy."""
    if welcome.state == "partial" and welcome.round_kind == "full":
        return RoundPlan("full", welcome.round_id, welcome.checkpoint, resumed=True)
    if welcome.state in ("synced", "partial") and known:
        return RoundPlan("sync", welcome.round_id + 1, 0)
    return RoundPlan("full", max(1, welcome.round_id + 1), 0)


def check_resume_offset(welcome: F.Welcome, source_size: int) -> None:
    """Refuse a resume offset that is not a block boundary of the source."""
    if welcome.state == "partial" and not (
            welcome.checkpoint <= source_size  # not negative: the event checks its own fields
            and (welcome.checkpoint % FINE_BLOCK == 0 or welcome.checkpoint == source_size)):
        raise RemoteProtocolError(f"the receiver offers to resume at {welcome.checkpoint}, which is not "
                                  f"a block boundary of the {source_size}-byte source")


@dataclass
class ReadScope:
    """Which blocks a round reads: those a frozen dirty map names (``map_driven``), or the
    whole source (``whole_reason`` says why, for a sync round with a map)."""

    dirty_map: ChangeMap | None = None
    frozen: FrozenMarks | None = None
    map_driven: bool = False
    whole_reason: str | None = None

    def done(self, start: int) -> int | None:
        """The round is durable on the target: its marks may go. Returns the blocks the map
        named, for a map-driven round. A round that read the whole source after the freeze
        also makes an untrusted map trustworthy; a resumed full round did not (writes below its
        start before the freeze may be unmarked), so the next round scans again."""
        frozen, dm = self.frozen, self.dirty_map
        if frozen is None or dm is None or not (self.map_driven or start == 0):
            return None
        dirty_blocks = frozen.dirty_blocks() if self.map_driven else None
        frozen.release()
        if not dm.trusted:
            dm.trust()
        return dirty_blocks


def read_scope(dm: ChangeMap | None, kind: str, not_ours: str | None) -> ReadScope:
    """Freeze the dirty map (writes from here on go to a fresh slot and are the next round's)
    and say whether the round may read only what it marked. ``not_ours``: why the target may hold
    what this sender's rounds did not write (a session taken over, or written by another sender
    of it since this sender's last round): the map marks writes since that round, not since what
    the target holds, and the round reads the whole source."""
    if dm is None:
        return ReadScope()
    frozen = dm.freeze()
    map_driven = kind == "sync" and dm.trusted and not_ours is None
    whole_reason = None
    if not map_driven:
        whole_reason = not_ours or dm.reason
        log.info("dirty map not used for this round (%s): reading the whole source", whole_reason)
    return ReadScope(dm, frozen, map_driven, whole_reason)


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

    def add(self, ev: object) -> None:
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
