"""`smsrepl status`: a receiver's targets and running sessions, asked over the same mutual TLS as
a transfer (a HELLO of kind "status", answered by WELCOME and one STATUS frame; see
protocol/frames.py). Both ends are here: what the receiver reports, and the asking client."""
from __future__ import annotations

import datetime
import json
import os
import ssl
import stat
import uuid
from collections.abc import Mapping
from typing import Protocol

from smsrepl.errors import RefusedError, RemoteProtocolError, TransportError
from smsrepl.protocol import CAPABILITIES, PROTOCOL_VERSION, SENDER, Connection, ConnectionClosed
from smsrepl.protocol import frames as F
from smsrepl.transport.connect import TARGET_NAME

CAPABILITY = "status"
#: most targets one report lists (a --root receiver's directory may hold many names)
MAX_TARGETS = 4096


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds") \
        .replace("+00:00", "Z")


# --- the receiver's side ------------------------------------------------------------------
def _kind_and_size(path: str) -> tuple[str, int | None]:
    """("block", bytes) for a device or an image file, ("directory", None), or ("missing", None)."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing", None
    if stat.S_ISDIR(st.st_mode):
        return "directory", None
    if stat.S_ISBLK(st.st_mode):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return "block", None
        try:
            return "block", os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
    return "block", st.st_size


def _read_json(path: str) -> tuple[dict, float] | None:
    try:
        with open(path, "rb") as fh:
            rec = json.load(fh)
            mtime = os.fstat(fh.fileno()).st_mtime
    except (OSError, ValueError):
        return None
    return (rec, mtime) if isinstance(rec, dict) else None


def last_round(state_dir: str, name: str, kind: str) -> dict | None:
    """The target's round record: id, kind, when it was last written, and whether the round
    completed (``verified``: everything it wrote was checked against the sender's digests before
    it counted). None when no round ever began."""
    if kind == "directory":
        got = _read_json(os.path.join(state_dir, f"{name}.files.json"))
        if got is None:
            return None
        rec, mtime = got
        done = bool(rec.get("complete"))
        return {"round_id": rec.get("round_id"), "kind": "files", "time": _iso(mtime), "complete": done,
                "verified": done}
    got = _read_json(os.path.join(state_dir, name, "state.json"))
    if got is None:
        return None
    rec, mtime = got
    done = not rec.get("active", True)
    return {"round_id": rec.get("round_id"), "kind": rec.get("round_kind"), "time": _iso(mtime), "complete": done,
            "verified": done, "checkpoint": rec.get("checkpoint"), "source_size": rec.get("source_size")}


class Running(Protocol):
    """What a report says of a running session."""

    peer: str
    started: float
    rounds: int


def describe(targets: Mapping[str, str], busy: Mapping[str, Running], state_dir: str,
             root: str | None = None) -> tuple[list, list]:
    """(targets, sessions) of a STATUS frame. ``busy``: target name -> the session holding it;
    ``root``: a --root receiver's directory, whose valid names are its targets."""
    names = list(targets)
    if root is not None:
        try:
            names = sorted(n for n in os.listdir(root) if TARGET_NAME.match(n))
        except OSError:
            names = []
        names = sorted(set(names) | set(busy))
    out = []
    for name in names[:MAX_TARGETS]:
        path = targets[name]
        kind, size = _kind_and_size(path)
        session = busy.get(name)
        hello = getattr(session, "hello", None)
        if kind == "missing" and hello is not None:
            kind = "directory" if hello.kind == "files" else "block"
        out.append({"name": name, "path": path, "kind": kind, "size": size, "busy": session is not None,
                    "last_round": last_round(state_dir, name, kind)})
    sessions = []
    for name, session in sorted(busy.items()):
        hello = getattr(session, "hello", None)
        chan = getattr(session, "chan", None)
        sessions.append({"target": name, "peer": session.peer, "kind": hello.kind if hello else "?",
                         "started": _iso(session.started), "bytes_received": getattr(chan, "wire_received", 0),
                         "rounds": session.rounds})
    return out, sessions


# --- the asking side --------------------------------------------------------------------
def fetch_status(address: tuple[str, int], context: ssl.SSLContext) -> dict:
    """The report of the receiver at ``address``: {"targets": [...], "sessions": [...]}."""
    from smsrepl.transport.channel import Channel
    from smsrepl.transport.connect import connect

    where = f"{address[0]}:{address[1]}"
    too_old = RefusedError(f"the receiver at {where} cannot report its status (it does not list the "
                           f"{CAPABILITY!r} capability: its smsrepl is older than this one)")
    chan = Channel(connect(address, context), Connection(SENDER))
    try:
        chan.send(F.Hello([PROTOCOL_VERSION], CAPABILITY, "", uuid.uuid4().hex, 0, F.FINE_BLOCK, list(CAPABILITIES)))
        welcome = chan.recv()
        if isinstance(welcome, F.Error):
            if "session kind" in welcome.message:  # what a receiver without the capability says
                raise too_old
            raise RefusedError(f"the receiver at {where} refused the status request: {welcome.message}")
        if isinstance(welcome, ConnectionClosed):
            raise TransportError(f"the receiver at {where} closed the connection before answering")
        if not isinstance(welcome, F.Welcome):
            raise RemoteProtocolError(f"expected WELCOME, got {type(welcome).__name__}")
        if CAPABILITY not in welcome.capabilities:
            raise too_old
        report = chan.recv()
        if isinstance(report, F.Error):
            raise RefusedError(f"the receiver at {where} refused the status request: {report.message}")
        if not isinstance(report, F.Status):
            raise RemoteProtocolError(f"expected STATUS, got {type(report).__name__}")
        chan.goodbye(F.Close("status done"))
    finally:
        chan.close()
    return {"targets": report.targets, "sessions": report.sessions}


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    n = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def format_report(report: dict) -> str:
    """The report as two tables: targets, then running sessions."""
    rows = [["TARGET", "KIND", "SIZE", "SESSION", "LAST ROUND", "KIND", "TIME", "VERIFIED"]]
    for t in report["targets"]:
        r = t.get("last_round") or {}
        rows.append([t["name"], t["kind"], _size(t.get("size")), "running" if t.get("busy") else "-",
                     str(r.get("round_id", "-")), str(r.get("kind") or "-"), r.get("time", "-"),
                     ("yes" if r.get("verified") else "no") if r else "-"])
    lines = _table(rows) if report["targets"] else ["no targets"]
    lines.append("")
    if report["sessions"]:
        rows = [["TARGET", "PEER", "KIND", "RECEIVED", "ROUNDS", "STARTED"]]
        rows += [[s["target"], s["peer"], s["kind"], _size(s.get("bytes_received")), str(s.get("rounds", 0)),
                  s["started"]] for s in report["sessions"]]
        lines += _table(rows)
    else:
        lines.append("no running sessions")
    return "\n".join(lines)
