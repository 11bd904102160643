"""One round entry by entry: each source entry against the target's, then deletions.

The decisions of a round (``rsync -aHAXS --numeric-ids``'s): an entry the target
lacks or holds as another kind is made; a file alike in size and mtime (or content,
with --checksum) keeps its data and gets its metadata; others are sent
(files.liveread); hard links are linked to their first name; what the source lost
goes last (:func:`delete_gone`). The same decisions serve both kinds of target
(files.target); files.dirround makes them a directory at a time where it can, and
leaves the rest to :func:`bring_entry`.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from smsrepl.files.liveread import send_file, settle_deferred, source_digest
from smsrepl.files.roundstats import RoundStats
from smsrepl.files.rules import PathRules, RoundFilter
from smsrepl.files.scan import Entry
from smsrepl.files.target import RoundTarget


def entry_round(src: bytes, t: RoundTarget, rules: PathRules | None, kind: str, checksum: bool, delete: bool,
                on_done: Callable[[int], None] | None, entries: Iterable[Entry]) -> RoundStats:
    """A round of ``kind`` taking ``entries`` (walk_round()'s) to ``t`` one at a time; with
    ``delete``, what the target holds beyond them goes at the end."""
    stats = RoundStats(temporaries_removed=t.temporaries_removed)
    filt = rules.for_round(kind) if rules else None
    seen: set[bytes] = set()
    links: dict[tuple[int, int], bytes] = {}
    for e in entries:
        stats.entries += 1
        seen.add(e.path)
        bring_entry(src, t, e, filt, checksum, links, stats)
        if on_done is not None:
            on_done(e.size if e.kind == "file" else 0)
    settle_deferred(t, src, stats)
    if delete:
        delete_gone(t, [path for path in t.paths(filt) if path and path not in seen], stats)
    t.finish()
    stats.reported += t.reported
    return stats


def delete_gone(t: RoundTarget, gone: list[bytes], stats: RoundStats) -> None:
    """Remove the target entries the source lost (sorted paths), deepest first: a directory
    goes once empty, so what an exclude rule hides inside it keeps it (as rsync does). A target
    with a ``deletion_limit(count, source_entries)`` (files.deletions) may refuse them all
    first; ``stats.entries`` is the source as the round walked it."""
    if t.deletion_limit is not None and gone:
        t.deletion_limit(len(gone), stats.entries)
    for path in reversed(gone):
        t.delete(path)
    stats.deleted = len(gone)


def bring_entry(src: bytes, t: RoundTarget, e: Entry, filt: RoundFilter | None, checksum: bool,
                links: dict[tuple[int, int], bytes], stats: RoundStats) -> None:
    """Bring one source entry to the target."""
    if not e.path:
        t.set_root_meta(e)
        return
    have = t.existing(e.path)
    if e.implied:  # only on the way to an ONLY_SYNC path: make it exist, leave it alone otherwise
        if have is None or have.kind != "dir":
            t.mkdir(e)
        return
    if (have is not None and have.kind == "dir" and e.kind != "dir" and filt is not None
            and any(p.may_be_below(e.parts) or p.covers(e.parts) for p in filt.exclude)):
        stats.reported.append(f"{os.fsdecode(e.path)}: a directory here that may hold excluded entries; "
                              f"not replaced by the source's {e.kind}")
        return
    if e.kind == "dir":
        t.mkdir(e)
    elif e.kind == "file":
        key = (e.dev, e.ino)
        if e.nlink > 1 and key in links:
            t.hardlink(e, links[key])
            stats.hard_links_changed += 1
            return
        if e.nlink > 1:
            links[key] = e.path
        if (have is not None and have.kind == "file" and have.size == e.size
                and not (have.nlink > 1 and e.nlink == 1)  # a hard link there that is not one here
                and (t.content_digest(e.path) == source_digest(src, e.path) if checksum
                     else have.mtime_ns == e.mtime_ns)):
            stats.unchanged += 1
            t.set_meta(e)
            return
        if e.nlink > 1:
            stats.hard_links_changed += 1
        if send_file(t, src, e, stats, have) is False and e.nlink > 1:
            del links[key]  # not there: its other names get their own copy
    elif e.kind == "symlink":
        if have is not None and have.kind == "symlink" and have.link == e.link:
            t.set_meta(e)
        else:
            t.symlink(e)
    else:
        t.special(e)

