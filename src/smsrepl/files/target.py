"""What a round needs of its target: the interface both kinds of target implement.

A round (files.decide, files.dirround) scans the source and decides; its target
answers questions about what it holds and takes the decisions. Two kinds exist:
a directory on this host (files.local.LocalTarget, through a TreeWriter) and a
receiver at the far end of a file session (files.remote.RemoteTarget, through
operations on the wire). A target that can answer a directory at a time
(:class:`DirRoundTarget`) gets the directory-at-a-time round.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

from smsrepl.files.rules import RoundFilter
from smsrepl.files.scan import Entry


class Sink(Protocol):
    """A file on its way to the target: its data in order, then commit() or abort()."""

    def write(self, data: bytes) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


@runtime_checkable
class RoundTarget(Protocol):
    """The target of a round taken entry by entry."""

    #: what the target could not do as asked (device files without root, ...), for the round's report
    reported: list[str]
    #: temporaries of a killed round removed before this one
    temporaries_removed: int
    #: deletion_limit(count, source_entries) may refuse a round's deletions before any is made
    #: (files.deletions)
    deletion_limit: Callable[[int, int], None] | None

    def existing(self, path: bytes) -> Entry | None:
        """The target's entry at ``path``, or None."""
        ...

    def content_digest(self, path: bytes) -> bytes | None:
        """XXH3-128 of the target's file at ``path`` (None where it is not known)."""
        ...

    def paths(self, filt: RoundFilter | None) -> Iterable[bytes]:
        """Every path the target holds that ``filt`` includes (the root as b"")."""
        ...

    def set_root_meta(self, e: Entry) -> None: ...

    def mkdir(self, e: Entry) -> None: ...

    def symlink(self, e: Entry) -> None: ...

    def special(self, e: Entry) -> None: ...

    def hardlink(self, e: Entry, to: bytes) -> None:
        """Make ``e`` another name of the already brought ``to``."""
        ...

    def set_meta(self, e: Entry) -> None:
        """Bring an existing entry's metadata to ``e``'s (its data untouched)."""
        ...

    def open_file(self, e: Entry, basis: Entry | None = None) -> Sink:
        """Start sending file ``e``; ``basis``: the target's copy, which a delta may build on."""
        ...

    def delete(self, path: bytes) -> None: ...

    def finish(self) -> None:
        """The round's last call: everything it sent is in place (and durable) once it returns."""
        ...


@runtime_checkable
class DirRoundTarget(RoundTarget, Protocol):
    """A target that answers a directory at a time (files.dirround)."""

    def dir_records(self, rel: bytes) -> bytes:
        """The target's records of directory ``rel`` (files.wire), sorted by name."""
        ...

    def gone(self, rel: bytes, indices: list[int]) -> tuple[list[bytes], list[bytes]]:
        """Paths of the records of directory ``rel`` at ``indices``, and those of them that are
        directories."""
        ...

    def below(self, path: bytes) -> list[bytes]:
        """Everything listed below directory ``path``: asked only after the last directory was
        dealt with, as the target's listing may still be arriving until then."""
        ...

    def read_files(self, dir_fd: int, records: bytes, indices: list[int], max_size: int) -> tuple[list[int], int, int]:
        """kernels.read_files of the source files at ``indices`` of ``records`` (in directory
        ``dir_fd``) into the target: (indices left for the careful path, files sent, bytes sent)."""
        ...
