"""The target side of block replication, without sockets: apply frames, checkpoint, recover.

State of one target lives in ``STATE_DIR/<target name>/``:

* ``manifest``: the fine and coarse digests of what the target holds
  (see manifest.py); only ever describes data already made durable.
* ``state.json``: session id, source size, the current round (id, kind,
  active or done), its durable ``checkpoint`` and its ``intent`` mark.

Ordering at a checkpoint: fdatasync the target, then write and fsync the
digests of the applied blocks into the manifest, then replace state.json
atomically. A crash at any point leaves a manifest that describes only
durable data, and a checkpoint no later than what is durable.

Within a round the sender sends changes in increasing offset order, so
"everything below the checkpoint" is a complete statement. Blocks above the
checkpoint may have been written without their digests reaching the
manifest. For a full round nothing above the checkpoint is trusted (the
sender resumes there). For a sync round, in the manner of DRBD's activity
log, the receiver durably records an ``intent`` mark before writing past it
(in 1 GiB steps); on recovery the target is made durable and the digests of
[checkpoint, intent) are computed again from what it holds, so the manifest
describes the target exactly and the next round sends what differs (where
the target cannot be read, they are UNKNOWN: the next round resends them).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass

from smsrepl._lazy import np

from smsrepl import faults, kernels
from smsrepl.stages import StageClock
from smsrepl.codec import RAW, Decompressor
from smsrepl.errors import DecompressionError, ManifestError, RemoteProtocolError, TargetWriteError
from smsrepl.protocol.frames import MAX_RAW, frame_digest
from smsrepl.blocks.target import BlockTarget
from smsrepl.blocks.manifest import ManifestFile, block_count
from smsrepl.blocks.sampled import sample_blocks
from smsrepl.durable import private_makedirs, write_json_atomic
from smsrepl.kernels import FINE_BLOCK, UNKNOWN_DIGEST

log = logging.getLogger("smsrepl.receiver")

#: how far past a sync round's writes its durable intent mark runs ahead. Each move costs
#: a durable state write, which waits behind the round's own writeback (measured: 6 moves
#: of 64 MiB steps held a 1 GiB, 1% round's receiving thread 14-27 ms); a cut round costs
#: reading up to one step of the target again at recovery
INTENT_STEP = 1 << 30
#: bytes of the target read at a time when a cut round's digests are computed again
REHASH_CHUNK = 8 << 20
STATE_VERSION = 1


@dataclass(slots=True)
class ReplicaRecord:
    version: int
    session_id: str
    source_size: int
    round_id: int
    round_kind: str  # "full" or "sync"
    active: bool
    checkpoint: int
    intent: int
    completed_rounds: int
    #: BlockTarget.identity() of the target the state describes (None: recorded before it was kept)
    target_id: list[int] | None = None


class Replica:
    """A target and its replication state; applies one round at a time."""

    def __init__(self, target: BlockTarget, state_dir: str) -> None:
        self.target = target
        self.dir = state_dir
        private_makedirs(state_dir)
        self.state_path = os.path.join(state_dir, "state.json")
        self.manifest_path = os.path.join(state_dir, "manifest")
        self.record: ReplicaRecord | None = None
        self.manifest: ManifestFile | None = None
        self._decomp = Decompressor()
        #: seconds per receiver stage (decompress, verify, write, flush)
        self.clock = StageClock()
        self._digests = np.empty(kernels_max_blocks(), dtype="<u8")
        self._range = np.empty(kernels_max_blocks() * FINE_BLOCK, dtype=np.uint8)
        #: where a compressed payload that is not decoded straight into a write buffer is
        #: decoded: a fresh buffer per frame cost a page fault per 4 KiB
        self._unpacked = np.empty(kernels_max_blocks() * FINE_BLOCK, dtype=np.uint8)
        self._pending: list[tuple[int, np.ndarray, np.ndarray | None]] = []
        #: why a sync of the target or the manifest failed in this session: a second one would
        #: succeed without what the first could not write (the error is reported once), so no
        #: later checkpoint is recorded
        self._sync_failed: str | None = None
        self.pos = 0
        self.bytes_written = 0
        self._load()

    # --- loading and recovery ---------------------------------------------
    def _load(self) -> None:
        try:
            with open(self.state_path, "rb") as fh:
                raw = json.load(fh)
            rec = ReplicaRecord(**raw)
            if rec.version != STATE_VERSION:
                raise ValueError(f"state version {rec.version}")
        except FileNotFoundError:
            return
        except (ValueError, TypeError, json.JSONDecodeError):
            # a damaged record cannot be trusted: start over with a full copy
            self._forget()
            return
        try:
            man = ManifestFile.open(self.manifest_path, writable=True, expect_size=rec.source_size)
        except ManifestError:
            self._forget()
            return
        self.record, self.manifest = rec, man
        # what a cut round applied durably: a session that begins no round ends with a checkpoint
        # too (close()), which must not move the cut round's back to 0
        self.pos = rec.checkpoint
        if rec.active and rec.round_kind == "sync" and rec.intent > rec.checkpoint:
            self._rehash(man, rec.source_size, rec.checkpoint // FINE_BLOCK, min(block_count(rec.intent), man.nblocks))
            man.commit()
            rec.intent = rec.checkpoint
            self._save()
        if not self._same_target(rec, man):  # after the rehash: then the manifest says what a cut round wrote
            man.close()
            self._forget()

    def _same_target(self, rec: ReplicaRecord, man: ManifestFile) -> bool:
        """Whether the state describes this target. Blocks sampled over what the manifest vouches
        for must hold what it says (a target re-pointed to a blank disk, an image deleted and made
        again by --create, one written over by hand); and a target that is not the device or file
        the state was recorded for must pass that check before it is taken for it (a device that
        has a new number after a reboot does, and is recorded anew)."""
        here = self.target.identity()
        vouched = rec.checkpoint if rec.active and rec.round_kind == "full" else rec.source_size
        differ, sampled = sample_blocks(self.target, man, min(vouched, rec.source_size))
        if differ:
            log.warning("%s: %d of %d blocks sampled differ from what its replication state says it holds "
                        "(%s): the state is dropped and the next round copies everything", self.target.what,
                        differ, sampled, "another device or file than the state was recorded for"
                        if rec.target_id not in (None, here) else "written since by something else")
            return False
        if rec.target_id != here:
            if rec.target_id is not None:
                log.info("%s is not the device or file its state was recorded for, but holds what the state "
                         "says (%d blocks sampled): taken for it", self.target.what, sampled)
            rec.target_id = here
            self._save()
        return True

    def _rehash(self, man: ManifestFile, size: int, first: int, last: int) -> None:
        """Digests of blocks [first, last) of a source of ``size`` bytes from what the target holds,
        made durable first (a cut sync round may have written them without their digests), into
        ``man``; UNKNOWN where it cannot be read."""
        if last <= first:
            return
        per = REHASH_CHUNK // FINE_BLOCK
        buf = memoryview(bytearray(min(REHASH_CHUNK, (last - first) * FINE_BLOCK)))
        digests = np.empty(per, dtype="<u8")
        try:
            self.target.flush()
            for b in range(first, last, per):
                n = min(per, last - b)
                off = b * FINE_BLOCK
                length = min(n * FINE_BLOCK, size - off)
                if self.target.readinto(buf[:length], off) < length:
                    raise TargetWriteError(f"{self.target.what} ends before {off + length}")
                kernels.block_digests(buf[:length], FINE_BLOCK, digests[:n])
                man.write_fine(b, digests[:n])
        except (OSError, TargetWriteError) as exc:
            log.warning("target %s: the digests of a cut round cannot be computed again (%s); its "
                        "blocks will be sent again", self.target.path, exc)
            man.fill_fine(first, last - first, UNKNOWN_DIGEST)

    def _forget(self) -> None:
        for path in (self.state_path, self.manifest_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.record = None
        self.manifest = None

    def _save(self) -> None:
        assert self.record is not None
        try:
            write_json_atomic(self.state_path, asdict(self.record))
        except OSError as exc:
            raise self._state_failed("the round's record", exc) from None

    def _state_failed(self, what: str, exc: OSError) -> TargetWriteError:
        """A write to the state directory (full, or its disk failing): the target's, as far as the
        sender is concerned (it reruns later), naming the directory; not an internal error."""
        return TargetWriteError(f"cannot write {what} in {self.dir!r}: {exc.strerror or exc}")

    def describe(self, session_id: str, source_size: int, *, any_session: bool = False) -> dict:
        """What the WELCOME frame tells a sender of ``session_id`` (of any, for a check)."""
        rec = self.record
        if rec is None or (rec.session_id != session_id and not any_session) or rec.source_size != source_size or self.manifest is None:
            return {"state": "new", "round_id": 0, "round_kind": "full", "checkpoint": 0, "manifest_root": ""}
        if rec.round_kind == "full" and rec.active:
            state = "partial"
        elif rec.completed_rounds == 0:
            state = "new"
        else:
            state = "synced" if not rec.active else "partial"
        return {
            "state": state,
            "round_id": rec.round_id,
            "round_kind": rec.round_kind,
            "checkpoint": rec.checkpoint,
            "manifest_root": self.manifest.root.hex(),
        }

    def why_not_reconcilable(self, source_size: int) -> str:
        """Why a sender of another session (one that lost its own state) cannot take this
        target's session over with a sync round against its manifest; "" when it can.

        It can once a round completed for a source of this size: the manifest then holds the
        digests of what was verified on arrival and made durable, and a cut sync round's were
        computed again from the target when it was opened (``_load``). A sync round reads the
        whole source and sends every block whose digest differs, so whatever source wrote the
        target, what it holds afterwards is the new source. An unfinished first copy is not
        taken over: resuming it would keep, below its checkpoint, data of a source nobody
        knows to be this one."""
        rec = self.record
        if rec is None or self.manifest is None:
            return "it holds no replication state"
        if rec.source_size != source_size:
            return f"its last copy is of a {rec.source_size}-byte source, not {source_size} bytes"
        if rec.completed_rounds == 0:
            return "its first copy never completed"
        return ""

    # --- rounds -------------------------------------------------------------
    def begin(self, session_id: str, source_size: int, round_id: int, kind: str, start: int) -> None:
        rec = self.record
        if kind == "full":
            if start:
                if not (rec and rec.active and rec.round_kind == "full" and rec.session_id == session_id
                        and rec.round_id == round_id and rec.checkpoint == start):
                    raise RemoteProtocolError(f"cannot resume full round {round_id} at {start}: no such checkpoint")
            else:
                if self.manifest is not None:
                    self.manifest.close()
                    self.manifest = None
                try:
                    self.manifest = ManifestFile.create(self.manifest_path, source_size)
                except OSError as exc:
                    raise self._state_failed("the manifest", exc) from None
                rec = ReplicaRecord(STATE_VERSION, session_id, source_size, round_id, "full", True, 0, 0, 0,
                                    self.target.identity())
        elif kind == "sync":
            if start != 0:
                raise RemoteProtocolError("a sync round starts at offset 0")
            if not (rec and rec.session_id == session_id and rec.completed_rounds > 0 and round_id > rec.round_id):
                raise RemoteProtocolError(f"sync round {round_id} needs a completed earlier round of this session")
            # the first intent step goes with the round's own record: no state write of its own
            rec.round_id, rec.round_kind, rec.active, rec.checkpoint = round_id, "sync", True, 0
            rec.intent = min(source_size, INTENT_STEP)
        else:
            raise RemoteProtocolError(f"unknown round kind {kind!r}")
        self.record = rec
        self._save()
        self.pos = start
        self.bytes_written = 0
        self._pending.clear()

    def _check_order(self, offset: int, length: int) -> None:
        rec = self.record
        if rec is None or not rec.active:
            raise RemoteProtocolError("data outside a round")
        if offset < self.pos:
            raise RemoteProtocolError(f"data at {offset} goes backwards (already at {self.pos})")
        if offset % FINE_BLOCK or length <= 0 or offset + length > rec.source_size:
            raise RemoteProtocolError(f"range {offset}+{length} is misaligned or outside the source size {rec.source_size}")
        if rec.round_kind == "sync" and offset + length > rec.intent:
            rec.intent = min(rec.source_size, max(offset + length, rec.intent) + INTENT_STEP)
            self._save()

    def apply_data(self, offset: int, raw_len: int, codec: int, digests: np.ndarray | None, payload, *,
                   zeros: np.ndarray | None = None, check: bytes = b"") -> None:
        """Set [offset, offset+raw_len) from a BLOCK_DATA frame (zero blocks are not in the payload).

        Either ``digests`` (every block's, 0 for zero blocks) or, as the frame
        carries them, the zero map ``zeros`` and the frame digest ``check``."""
        rec = self.record
        size = rec.source_size if rec else -1
        end = offset + raw_len
        if end % FINE_BLOCK and end != size:
            raise RemoteProtocolError(f"data at {offset} of {raw_len} bytes does not end on a block boundary")
        self._check_order(offset, raw_len)
        # the frame is built in the direct writer's buffer: a frame without zero blocks is
        # decompressed straight into it, one with zero blocks has its blocks spread into it
        solid = bool(digests.all()) if digests is not None else zeros is not None and not zeros.any()
        stage = self.target.reserve(offset, raw_len)
        into = stage if solid else None
        try:
            if digests is None:
                raw, nonzero, digests = self._decode_framed(offset, end, codec, zeros, check, payload, into)
            else:
                raw, nonzero = self._decode_checked(offset, None, end, codec, digests, payload, into)
            if stage is not None and not solid:
                with self.clock.timing("write"):
                    _spread_blocks(stage, raw, nonzero)
        except BaseException:
            if stage is not None:
                self.target.release()
            raise
        with self.clock.timing("write"):
            if stage is not None:
                self.target.commit(offset, raw_len)
            else:
                self._write_run(offset, end, digests, nonzero, raw)
        self._pending.append((offset // FINE_BLOCK, digests.copy(), None))
        self.pos = end
        self.bytes_written += raw_len

    def apply_set(self, offset: int, index: np.ndarray, codec: int, digests: np.ndarray, payload) -> None:
        """Set the scattered blocks of a BLOCK_SET frame: block i at offset + index[i] * 4 KiB."""
        rec = self.record
        size = rec.source_size if rec else -1
        last = offset + int(index[-1]) * FINE_BLOCK
        if last >= size:
            raise RemoteProtocolError(f"block set at {offset} reaches past the source size {size}")
        end = min(last + FINE_BLOCK, size)
        self._check_order(offset, end - offset)
        raw, nonzero = self._decode_checked(offset, index, end, codec, digests, payload)
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        stops = np.concatenate((breaks, [len(index)])).tolist()
        if nonzero.all():  # the usual set: every run's data lies in the payload in order
            r_off = offset + index[starts] * FINE_BLOCK
            r_end = np.minimum(offset + (index[np.array(stops) - 1] + 1) * FINE_BLOCK, size)
            with self.clock.timing("write"):
                self.target.write_ranges(raw, r_off.astype(np.int64), (r_end - r_off).astype(np.int64))
        else:
            before = np.concatenate(([0], np.cumsum(nonzero))).tolist()  # non-zero blocks before position i
            for i0, i1 in zip(starts, stops):
                r_off = offset + int(index[i0]) * FINE_BLOCK
                r_end = min(offset + (int(index[i1 - 1]) + 1) * FINE_BLOCK, size)
                part = raw[before[i0] * FINE_BLOCK:before[i1] * FINE_BLOCK]
                with self.clock.timing("write"):
                    self._write_run(r_off, r_end, digests[i0:i1], nonzero[i0:i1], part)
        self.target.write_behind()
        self._pending.append((offset // FINE_BLOCK, digests.copy(), np.array(index, dtype=np.int64)))
        self.pos = end
        self.bytes_written += len(index) * FINE_BLOCK

    def _decode_blocks(self, offset: int, end: int, codec: int, nonzero: np.ndarray, payload, into=None):
        """Decompress a frame's payload (its non-zero blocks); returns it and their digests."""
        count = int(nonzero.sum())
        if not count:
            raise RemoteProtocolError(f"data frame at {offset} carries no data")
        expect = count * FINE_BLOCK
        if nonzero[-1] and end % FINE_BLOCK:
            expect -= FINE_BLOCK - end % FINE_BLOCK
        if into is None and codec != RAW:
            into = self._unpacked.data  # used before the next frame is decoded
        t0 = time.perf_counter()
        raw = self._decomp.decode(codec, payload, expect, into)
        t1 = time.perf_counter()
        got = self._digests[:count]
        kernels.block_digests(raw, FINE_BLOCK, got)
        self.clock.add("decompress", t1 - t0)
        self.clock.add("verify", time.perf_counter() - t1)
        return memoryview(raw).cast("B"), got

    def _decode_checked(self, offset: int, index: np.ndarray | None, end: int, codec: int,
                        digests: np.ndarray, payload, into=None) -> tuple[memoryview, np.ndarray]:
        """Decompress a frame's payload and check every non-zero block against its digest."""
        nonzero = digests != 0
        raw, got = self._decode_blocks(offset, end, codec, nonzero, payload, into)
        want = digests[nonzero]
        if not np.array_equal(got, want):
            i = int(np.flatnonzero(nonzero)[int(np.flatnonzero(got != want)[0])])
            block = i if index is None else int(index[i])
            raise DecompressionError(f"block at offset {offset + block * FINE_BLOCK} does not match its digest")
        return raw, nonzero

    def _decode_framed(self, offset: int, end: int, codec: int, zeros: np.ndarray | None, check: bytes,
                       payload, into=None) -> tuple[memoryview, np.ndarray, np.ndarray]:
        """Decompress a BLOCK_DATA payload, digest its blocks, and check them against the frame digest."""
        if zeros is None:
            raise RemoteProtocolError(f"data at {offset} carries neither digests nor a zero map")
        nonzero = ~zeros
        raw, got = self._decode_blocks(offset, end, codec, nonzero, payload, into)
        digests = np.zeros(len(zeros), dtype="<u8")
        digests[nonzero] = got
        if frame_digest(digests) != check or not got.all():
            raise DecompressionError(f"data frame at offset {offset} does not match its digest")
        return raw, nonzero, digests

    def _write_run(self, offset: int, end: int, digests: np.ndarray, nonzero: np.ndarray, raw: memoryview) -> None:
        """Write the consecutive blocks [offset, end); ``raw`` holds their non-zero blocks in order."""
        if nonzero.all():
            self.target.write(offset, raw)
            return
        # zero blocks among them: write the whole range once, zeros included
        length = end - offset
        buf = self._range[:length]
        buf[:] = 0
        blocks = np.flatnonzero(nonzero)
        src = np.frombuffer(raw, dtype=np.uint8)
        full = length // FINE_BLOCK
        whole = blocks[blocks < full]
        if len(whole):
            buf[:full * FINE_BLOCK].reshape(full, FINE_BLOCK)[whole] = src[:len(whole) * FINE_BLOCK].reshape(-1, FINE_BLOCK)
        if len(whole) < len(blocks):  # the source's short last block
            buf[full * FINE_BLOCK:] = src[len(whole) * FINE_BLOCK:]
        self.target.write(offset, buf.data)

    def apply_zero(self, offset: int, length: int) -> None:
        self._check_order(offset, length)
        end = offset + length
        if end % FINE_BLOCK and end != (self.record.source_size if self.record else -1):
            raise RemoteProtocolError(f"zero range {offset}+{length} does not end on a block boundary")
        with self.clock.timing("write"):
            self.target.zero(offset, length)
        self._pending.append((offset // FINE_BLOCK, np.zeros(block_count(length), dtype="<u8"), None))
        self.pos = end

    def scanned(self, offset: int) -> None:
        rec = self.record
        if rec is None or not rec.active or offset < self.pos or offset > rec.source_size:
            raise RemoteProtocolError(f"SCANNED {offset} is out of order")
        self.pos = offset

    def checkpoint(self, *, ending: bool = False) -> int:
        """Make everything applied so far durable; return the durable offset. ``ending``: the
        round is over, which the same state write records."""
        rec = self.record
        if rec is None or not rec.active:
            return rec.checkpoint if rec else 0
        if self.pos == rec.checkpoint and not self._pending and not ending:
            return rec.checkpoint
        if self._sync_failed is not None:
            raise TargetWriteError(f"no checkpoint after a failed sync ({self._sync_failed})")
        t0 = time.perf_counter()
        assert self.manifest is not None
        try:
            self.target.flush()
            for first, digests, index in self._pending:
                if index is None:
                    self.manifest.write_fine(first, digests)
                else:
                    self.manifest.write_fine_at(first, index, digests)
            self._pending.clear()
            self.manifest.commit()
        except TargetWriteError as exc:
            self._sync_failed = exc.message
            raise
        except OSError as exc:
            err = self._state_failed("the manifest", exc)
            self._sync_failed = err.message
            raise err from None
        faults.point("receiver.checkpoint")  # data and manifest durable, the record not yet
        rec.checkpoint = self.pos
        if ending:
            rec.active, rec.intent = False, 0
            rec.completed_rounds += 1
        self._save()
        self.clock.add("flush", time.perf_counter() - t0)
        return rec.checkpoint

    def finish(self, round_id: int) -> str:
        rec = self.record
        if rec is None or not rec.active or rec.round_id != round_id:
            raise RemoteProtocolError(f"ROUND_END for round {round_id}, which is not running")
        self.pos = rec.source_size  # ROUND_END: the sender covered everything
        self.checkpoint(ending=True)
        assert self.manifest is not None
        return self.manifest.root.hex()

    def close(self) -> None:
        if self.manifest is not None:
            self.manifest.close()
            self.manifest = None


def _spread_blocks(stage, raw: memoryview, nonzero: np.ndarray) -> None:
    """Fill ``stage`` (whole 4 KiB blocks, ``nonzero`` tells which) from ``raw``, which holds
    the non-zero ones in order; the others become zeros."""
    blocks = np.frombuffer(stage, dtype=np.uint8, count=len(nonzero) * FINE_BLOCK).reshape(-1, FINE_BLOCK)
    blocks[~nonzero] = 0
    blocks[np.flatnonzero(nonzero)] = np.frombuffer(raw, dtype=np.uint8).reshape(-1, FINE_BLOCK)


def kernels_max_blocks() -> int:
    return MAX_RAW // FINE_BLOCK
