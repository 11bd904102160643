"""What a file round would change, itemized as ``rsync -i`` does (``send files --dry-run``).

Each change is one line ``YXcstpoguax path``: Y is ``>`` (file data sent), ``c``
(created or changed: a directory, symlink, device or special file), ``h`` (a hard
link to another name), ``.`` (only attributes change) or ``*deleting``; X the kind
(``f`` file, ``d`` directory, ``L`` symlink, ``D`` device, ``S`` fifo or socket);
then ``+`` everywhere for a new entry, else a letter for each attribute that
differs: ``c`` content (with --checksum) or a symlink's target, ``s`` size, ``t``
mtime, ``p`` permissions, ``o`` owner, ``g`` group, ``a`` ACL, ``x`` xattrs
(``u`` is always ``.``). Directories end with ``/``, symlinks show ``-> target``,
hard links ``=> other name``. Entries alike on both sides are not shown.

The decisions are files.decide's (size and mtime, or content with --checksum),
against the receiver's listing, without reading any file data (except for
--checksum digests, as a round would).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from smsrepl.files.digests import content_digest
from smsrepl.files.rules import RoundFilter
from smsrepl.files.scan import Entry

_KIND = {"file": "f", "dir": "d", "symlink": "L", "chardev": "D", "blockdev": "D", "fifo": "S", "socket": "S"}
_ACL = b"system.posix_acl_"


def shown(path: bytes) -> str:
    """A path as rsync prints it: bytes that are not UTF-8, and control characters, as ``\\#ooo``."""
    out = []
    for ch in path.decode("utf-8", "surrogateescape"):
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:
            out.append(f"\\#{o - 0xDC00:03o}")
        elif o < 32 or o == 127:
            out.append(f"\\#{o:03o}")
        else:
            out.append(ch)
    return "".join(out)


@dataclass(slots=True)
class Item:
    code: str  # the 11 characters
    entry: Entry | None  # None for a deletion (then ``path`` and ``is_dir`` say what)
    path: bytes
    is_dir: bool = False
    other: bytes | None = None  # a hard link's other name

    def line(self) -> str:
        name = shown(self.path) if self.path else "."
        if self.is_dir:
            name += "/"
        if self.entry is not None and self.entry.kind == "symlink":
            name += " -> " + shown(self.entry.link or b"")
        elif self.other is not None:
            name += " => " + shown(self.other)
        return f"{self.code} {name}"


@dataclass
class Plan:
    kind: str  # "full" or "sync"
    round_id: int
    items: list[Item] = field(default_factory=list)
    deletions: list[Item] = field(default_factory=list)
    new: int = 0
    changed: int = 0  # files whose data would be sent again
    attributes: int = 0  # entries whose attributes only would change
    file_bytes: int = 0  # data of the new and changed files (before deltas and compression)
    target_entries: int = 0
    reported: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [i.line() for i in self.items] + [i.line() for i in self.deletions]

    def summary(self, target: str) -> str:
        return (f"dry run, {self.kind} round {self.round_id} to target {target!r}: {self.new} new, "
                f"{self.changed} changed, {self.attributes} with new attributes, {len(self.deletions)} to delete "
                f"(of {self.target_entries} target entries); {_units(self.file_bytes)} of file data to send; "
                f"nothing was changed")


def _units(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    x = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        x /= 1024
        if x < 1024 or unit == "TiB":
            return f"{x:.1f} {unit}"
    return ""  # pragma: no cover


def _xattrs(e: Entry, acl: bool) -> dict:
    return {k: v for k, v in (e.xattrs or {}).items() if k.startswith(_ACL) == acl}


def _attrs(have: Entry, e: Entry) -> str:
    """``pogua x`` part: the attributes a round would set (files.remote._same_meta's)."""
    return ("p" if have.mode != e.mode and e.kind != "symlink" else ".") + \
        ("o" if have.uid != e.uid else ".") + ("g" if have.gid != e.gid else ".") + "." + \
        ("a" if _xattrs(have, True) != _xattrs(e, True) else ".") + \
        ("x" if _xattrs(have, False) != _xattrs(e, False) else ".")


def _code(y: str, e: Entry, c: bool, s: bool, t: bool, have: Entry) -> str:
    return y + _KIND.get(e.kind, "S") + ("c" if c else ".") + ("s" if s else ".") + ("t" if t else ".") + \
        _attrs(have, e)


def plan_round(src: bytes, entries: Iterable[Entry], lookup, target_paths: Iterable[bytes],
               filt: RoundFilter | None, kind: str, round_id: int, *, checksum: bool = False,
               target_digest=None) -> Plan:
    """The plan of a round of ``kind`` taking ``entries`` (walk_round's) to the target where
    ``lookup(path)`` gives its entry (or None) and ``target_paths`` are all its paths;
    ``target_digest(path)``: its content digest (--checksum)."""
    plan = Plan(kind, round_id)
    seen: set[bytes] = set()
    links: dict[tuple[int, int], bytes] = {}
    for e in entries:
        seen.add(e.path)
        have = lookup(e.path)
        item = _item(src, e, have, filt, checksum, links, target_digest, lookup, plan)
        if item is not None:
            plan.items.append(item)
    all_paths = sorted(p for p in target_paths if p)
    plan.target_entries = len(all_paths)
    for path in all_paths:
        if path not in seen and (filt is None or filt.includes(tuple(path.split(b"/")))):
            got = lookup(path)
            plan.deletions.append(Item("*deleting  ", None, path, is_dir=got is not None and got.kind == "dir"))
    return plan


def _item(src: bytes, e: Entry, have: Entry | None, filt, checksum: bool, links: dict, target_digest, lookup,
          plan: Plan) -> Item | None:
    is_dir = e.kind == "dir"
    if not e.path:  # the root: listed only by the pure backend's receivers; one plan for both
        return None
    if e.implied:  # on the way to an ONLY_SYNC path: made to exist, left alone otherwise
        if have is None or have.kind != "dir":
            plan.new += 1
            return Item("cd+++++++++", e, e.path, is_dir=True)
        return None
    if (have is not None and have.kind == "dir" and e.kind != "dir" and filt is not None
            and any(p.may_be_below(e.parts) or p.covers(e.parts) for p in filt.exclude)):
        plan.reported.append(f"{os.fsdecode(e.path)}: a directory here that may hold excluded entries; "
                             f"not replaced by the source's {e.kind}")
        return None
    if e.kind == "file":
        key = (e.dev, e.ino)
        if e.nlink > 1 and key in links:
            first = links[key]
            there = lookup(first)
            if (have is None or have.kind != "file" or have.nlink < 2 or there is None
                    or (have.size, have.mtime_ns) != (there.size, there.mtime_ns)):
                plan.new += 1
                return Item("hf+++++++++", e, e.path, other=first)
            return None
        if e.nlink > 1:
            links[key] = e.path
    if have is None or have.kind != e.kind:
        plan.new += 1
        if e.kind == "file":
            plan.file_bytes += e.size
            return Item(">f+++++++++", e, e.path)
        return Item("c" + _KIND.get(e.kind, "S") + "+" * 9, e, e.path, is_dir=is_dir)
    t = have.mtime_ns != e.mtime_ns
    if e.kind == "file":
        s = have.size != e.size
        same = not s and not (have.nlink > 1 and e.nlink == 1)
        c = False
        if checksum and not s:
            try:
                c = target_digest(e.path) != content_digest(src, e.path)
            except OSError:
                c = True
            same = same and not c
        elif same:
            same = not t
        if not same:
            plan.changed += 1
            plan.file_bytes += e.size
            return Item(_code(">", e, c, s, t, have), e, e.path)
        return _attr_item(_code(".", e, False, False, t, have), e, plan)
    if e.kind == "symlink":
        if have.link != e.link:
            plan.changed += 1
            return Item(_code("c", e, True, False, t, have), e, e.path)
        return _attr_item(_code(".", e, False, False, t, have), e, plan)
    if e.kind in ("chardev", "blockdev") and have.rdev != e.rdev:
        plan.changed += 1
        return Item(_code("c", e, True, False, t, have), e, e.path)
    return _attr_item(_code(".", e, False, False, t, have), e, plan, is_dir=is_dir)


def _attr_item(code: str, e: Entry, plan: Plan, *, is_dir: bool | None = None) -> Item | None:
    if code[2:].strip(".") == "":
        return None
    plan.attributes += 1
    return Item(code, e, e.path, is_dir=e.kind == "dir" if is_dir is None else is_dir)
