"""How many target entries a file round would delete, and the limit it must stay within.

A round deletes what the target holds and the source lacks. Pointed at the wrong
source (a tiny tree against a big target), or at a source emptied by a mount that
failed, that is most of the target: such a round is refused before it changes
anything. The limit is ``--max-delete N`` (at most N deletions; 0: none; -1: no
limit) or, by default, half of the target's entries, for targets of MIN_GUARDED
entries or more (a handful of entries is quickly copied again, and a lab's tiny tree
is routinely emptied).

A continuous sender's later rounds follow a tree it has already copied: there the
default guard asks instead whether the source itself collapsed (a mount that went
away, a tree emptied) and lets a round delete more than half of the target while
the source still holds at least half the entries of the last whole-tree round
(:class:`LastWholeRound`). A journal round, which lists only part of the target,
is held to the same question once it would delete more than half of the entries
that round saw (the source is counted then: :func:`source_entries`). A small tree with fast turnover (a spool, a cache) or
the rename of a directory holding half the tree leaves more than half of the
target's names gone by the next round without being a wrong source.

:func:`would_delete` counts a whole-tree round's deletions from the receiver's
listing and a walk of the source (the same decisions as files.decide and
files.dirround), before the round begins; the round's own deletion step checks
the limit again (files.decide.delete_gone: the source may change meanwhile, and a
journal round is not counted ahead).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

from smsrepl import kernels
from smsrepl.errors import DeletionLimitError
from smsrepl.files.rules import RoundFilter

#: targets with fewer entries than this are not guarded by default
MIN_GUARDED = 10
#: --max-delete -1: no limit
UNLIMITED = -1


@dataclass
class LastWholeRound:
    """What a continuous sender's last whole-tree round saw of its source, kept from round to
    round: how many entries it walked (None until one completed)."""

    source_entries: int | None = None


class Count(NamedTuple):
    """A whole-tree round's deletions, counted before it begins, and the source entries it walks."""

    deletions: int
    source_entries: int


def check_deletions(count: int, target_entries: int | None, limit: int | None, target: str, *,
                    changed: bool = False, source_entries: int | None = None,
                    last_whole: int | None = None) -> None:
    """Raise DeletionLimitError where ``count`` deletions go beyond ``limit`` (None: the default
    guard, which needs ``target_entries``; UNLIMITED: none). ``changed``: the round's other
    changes were made already (the check at its deletion step). ``source_entries`` and
    ``last_whole``: the entries of the source now and at a continuous sender's last whole-tree
    round; the default guard then refuses only a source that lost more than half of them."""
    done = "nothing was deleted (the round's other changes were made)" if changed else "nothing was changed"
    if limit is None and target_entries is None:  # a journal round: a part of the target listed
        if last_whole is None or source_entries is None or last_whole < MIN_GUARDED or count * 2 <= last_whole \
                or source_entries * 2 >= last_whole:
            return
        raise DeletionLimitError(
            f"would delete {count} entries on target {target!r}, more than half of the {last_whole} that the last "
            f"whole-tree round saw, and the source holds {source_entries} entries now: source unmounted or emptied? "
            f"{done}; rerun with --max-delete {count} (or --max-delete -1 for no limit) to allow it")
    if limit is None:
        if target_entries is None or target_entries < MIN_GUARDED or count * 2 <= target_entries:
            return
        if last_whole is not None and source_entries is not None:
            if source_entries * 2 >= last_whole:
                return  # the tree turned over (or moved) but kept its size
            raise DeletionLimitError(
                f"would delete {count} of {target_entries} entries on target {target!r} (more than half), and "
                f"the source holds {source_entries} entries where the last whole-tree round saw {last_whole}: "
                f"source unmounted or emptied? {done}; rerun with --max-delete {count} (or --max-delete -1 for "
                f"no limit) to allow it")
        raise DeletionLimitError(
            f"would delete {count} of {target_entries} entries on target {target!r} (more than half): "
            f"wrong source? {done}; rerun with --max-delete {count} (or --max-delete -1 for no limit) to allow it")
    if limit == UNLIMITED or count <= limit:
        return
    if limit == 0:
        raise DeletionLimitError(f"would delete {count} entries on target {target!r}, and --max-delete 0 allows "
                                 f"none: {done}; rerun with --max-delete {count} to allow it")
    raise DeletionLimitError(f"would delete {count} entries on target {target!r}, more than --max-delete {limit}: "
                             f"{done}; rerun with --max-delete {count} to allow it")


def listed_entries(listing) -> int:
    """Entries of a receiver's listing (files.listing.Listing), its root not counted."""
    listing.wait(whole=True)
    if listing.ordered and kernels.TREE:  # count records without decoding them
        return sum(len(kernels.diff_records(b"", listing.records(rel))[1])
                   for rel in list(listing.groups) if rel is not None)
    return sum(1 for path in listing.entries if path)


def source_entries(source: str | bytes, filt: RoundFilter | None, checksum: bool = False) -> int:
    """The entries a whole-tree round of ``source`` walks (as RoundStats.entries counts them)."""
    src = os.fsencode(source)
    if kernels.TREE and not checksum:
        from smsrepl.files.dirscan import scan_dirs

        return 1 + sum(len(b.names) for b in scan_dirs(src, filt, xattrs=False, on_error=lambda p, exc: None))
    from smsrepl.files.scan import walk

    return sum(1 for _ in walk(src, filt, implied=True, on_error=lambda p, exc: None))


def would_delete(source: str | bytes, listing, filt: RoundFilter | None, checksum: bool = False) -> Count:
    """How many entries a whole-tree round of ``source`` (as ``filt`` selects it) would delete
    from the target that ``listing`` describes, and how many it walks (as the round's
    RoundStats.entries counts them: its root too)."""
    src = os.fsencode(source)
    if listing.ordered and kernels.TREE and not checksum:
        return _by_dirs(src, listing, filt)
    from smsrepl.files.scan import walk

    seen = {e.path for e in walk(src, filt, implied=True, on_error=lambda p, exc: None)}
    return Count(sum(1 for path in listing.entries
                     if path and path not in seen and (filt is None or filt.includes(tuple(path.split(b"/"))))),
                 len(seen))


def _by_dirs(src: bytes, listing, filt: RoundFilter | None) -> Count:
    """files.dirround's deletions: each source directory's records against the target's."""
    from smsrepl.files.dirscan import scan_dirs

    gone: list[bytes] = []
    emptied: list[bytes] = []
    walked = 1  # the root
    for b in scan_dirs(src, filt, xattrs=False, on_error=lambda p, exc: None):
        walked += len(b.names)
        _, idx = kernels.diff_records(b.records, listing.records(b.rel))
        if idx:
            items = listing.decoded(b.rel)
            gone += [items[j][0].path for j in idx]
            emptied += [items[j][0].path for j in idx if items[j][0].kind == "dir"]
        emptied += b.not_entered
    for path in emptied:
        gone += listing.below(path)
    return Count(sum(1 for p in set(gone) if filt is None or filt.includes(tuple(p.split(b"/")))), walked)
