"""The receiver's file sessions: rounds of a directory tree applied to a directory target.

A file session (HELLO kind "files") claims its directory target (made where it is missing and
the receiver may create it), says in WELCOME whether a round completed before, lists the tree
when asked (the whole tree, or the directories a journal round names), and applies each
round's file operations (files/opapply.py, files/apply.py): files replaced atomically, the
round record written only once the round is durable. A dry run lists and changes nothing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator

from smsrepl import kernels
from smsrepl.durable import write_json_atomic
from smsrepl.errors import RemoteProtocolError, ReplicationError, TargetKindError, TargetWriteError
from smsrepl.files.apply import TreeWriter
from smsrepl.files.names import remove_temporaries
from smsrepl.files.signatures import signature_frames
from smsrepl.files.opapply import OpApplier
from smsrepl.files.describe import describe_tree
from smsrepl.protocol import CAPABILITIES, PROTOCOL_VERSION
from smsrepl.protocol import frames as F
from smsrepl.transport import limits
from smsrepl.transport import targets as target_checks
from smsrepl.transport.session import CONTROL, Handler

log = logging.getLogger("smsrepl.receiver")


class FileSession(Handler):
    """HELLO kind "files"."""

    def serve(self) -> bool:
        self._open()
        return self._loop()

    def _open(self) -> None:
        """Claim a directory target and welcome the sender, saying whether a round completed before."""
        ev, host = self.hello, self.host
        if ev.target not in host.targets:
            raise target_checks.unknown(ev.target, host.targets)
        root = self.root = host.targets[ev.target]
        target_checks.check_kind(ev.target, root, "files")
        if os.path.islink(root):  # a --root name, or a target made a symlink since the start
            raise TargetKindError(f"target {ev.target!r} ({root}) is a symlink (to {os.readlink(root)}): the receiver "
                                  f"follows no symlink in a tree target; nothing was written")
        if os.path.lexists(root) and not os.path.isdir(root):
            raise TargetKindError(f"target {ev.target!r} ({root}) is not a directory: file sessions need one")
        if not host.create and not os.path.lexists(root):
            raise target_checks.missing(ev.target, root)
        self.session.claim(ev.target)
        self._dry = F.DRY_RUN in ev.capabilities  # a dry run: list, change nothing
        try:
            if not self._dry:
                os.mkdir(root, 0o755)
        except FileExistsError:
            pass
        except OSError as exc:
            raise TargetWriteError(f"target {ev.target!r}: cannot create {root!r}: {exc.strerror}") from None
        self._described = False  # describe_tree removes what a killed round left
        self._files_state = os.path.join(host.state_dir, f"{ev.target}.files.json")
        rec = _read_record(self._files_state)
        last = int(rec.get("round_id", 0))
        caps = [c for c in CAPABILITIES if kernels.TREE or c != "tree-subset"]  # listed by directory scans
        self.chan.send(F.Welcome(PROTOCOL_VERSION, ev.session_id, 0, "synced" if rec.get("complete") else "new",
                                 last, "files", 0, "", capabilities=caps))
        log.info("%s: file session %s for target %s (%s)", self.peer, ev.session_id, ev.target, root)

    def _loop(self) -> bool:
        root, session, chan = self.root, self.session, self.chan
        stream = "tree-stream" in self.hello.capabilities
        applier: OpApplier | None = None
        round_id = 0
        # the next frame is read and decrypted while this one's files are written
        frames = session.start_reader(2)
        session.grant_hello_ask()
        try:
            while True:
                ev = session.next_frame(frames)
                if isinstance(ev, F.TreeRequest) and applier is None:
                    with self._keeping_alive():
                        for frame in describe_tree(root, checksum=ev.checksum, keep_temporaries=self._dry,
                                                   stream=stream):
                            chan.send(frame)
                    self._described = True
                elif isinstance(ev, F.TreeSubset) and applier is None and kernels.TREE:
                    # temporaries a killed round left are removed by the listing of a whole-tree
                    # round, and a failed round is always followed by one (files.journal)
                    for frame in describe_tree(root, dirs=ev.dirs, keep_temporaries=self._dry, stream=stream):
                        chan.send(frame)
                    self._described = True
                elif isinstance(ev, F.RoundBegin) and self._dry:
                    raise RemoteProtocolError("a dry run may not begin a round")
                elif isinstance(ev, F.RoundBegin) and applier is None:
                    if not self._described:  # a sender that did not ask for the tree first
                        remove_temporaries(root)
                        self._described = True
                    rec = _read_record(self._files_state)
                    write_json_atomic(self._files_state, {**rec, "round_id": ev.round_id, "complete": rec.get(
                        "complete", False) and ev.kind == "sync"})
                    applier, round_id = OpApplier(TreeWriter(root)), ev.round_id
                elif isinstance(ev, F.FileOps) and applier is not None:
                    applier.apply(ev)
                elif isinstance(ev, F.SigRequest) and applier is not None:
                    for sig in signature_frames(applier.w, ev):
                        chan.send(sig)
                elif isinstance(ev, F.RoundEnd) and applier is not None and ev.round_id == round_id:
                    with self._keeping_alive():  # syncfs waits for every writer of the file system
                        applier.w.finish()
                    _log_reported(self.peer, self.hello.target, applier.w.reported)
                    applier.w.close()
                    session.written += applier.bytes
                    applier = None
                    write_json_atomic(self._files_state, {"round_id": round_id, "complete": True})
                    session.rounds += 1
                    chan.send(F.RoundDone(round_id, ""))
                elif isinstance(ev, CONTROL):
                    if session.control(ev, " mid-round" if applier else ""):
                        return True
                else:
                    raise RemoteProtocolError(f"{type(ev).__name__} out of place in a file session")
        except OSError as exc:  # listing, signatures, temporaries: the sender hears SMS.2007
            where = f" {os.fsdecode(exc.filename)!r}" if exc.filename else ""
            raise TargetWriteError(f"target {self.hello.target!r} ({root}):{where} {exc.strerror or exc}") from None
        finally:
            if applier is not None:
                applier.close()
                try:  # files received whole and checked keep their names, even in a cut round
                    applier.w.keep_cut()  # and the new directories holding them theirs
                except (ReplicationError, OSError) as exc:
                    log.warning("%s: files of the cut round not kept: %s", self.peer, exc)
                applier.w.close()

    @contextlib.contextmanager
    def _keeping_alive(self) -> Iterator[None]:
        """While the body runs, a PONG to the sender every KEEPALIVE seconds it sent nothing
        else, so that a long wait for the disk is not taken for a dead peer."""
        done = threading.Event()
        chan, every = self.chan, limits.KEEPALIVE

        def beat() -> None:
            while not done.wait(every):
                if time.monotonic() - chan.sent_at >= every:
                    try:
                        chan.send(F.Pong(0, time.monotonic_ns(), 0))
                    except (ReplicationError, OSError):
                        return

        thread = threading.Thread(target=beat, name="keepalive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


#: lines of what a round could not keep (a device node made by a receiver not root, an xattr
#: the target's file system refused) logged per round: the sender's summary does not get them
REPORTED_LINES = 20


def _log_reported(peer: str, target: str, reported: list[str]) -> None:
    for line in reported[:REPORTED_LINES]:
        log.warning("%s: target %s: %s", peer, target, line)
    if len(reported) > REPORTED_LINES:
        log.warning("%s: target %s: %d more such", peer, target, len(reported) - REPORTED_LINES)


def _read_record(path: str) -> dict:
    """A file target's round record; a missing or damaged one means no completed round (a full copy)."""
    try:
        with open(path, "rb") as fh:
            rec = json.load(fh)
        return rec if isinstance(rec, dict) and isinstance(rec.get("round_id", 0), int) else {}
    except (OSError, ValueError):
        return {}
