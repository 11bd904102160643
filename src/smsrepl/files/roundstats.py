"""What a round did, counted: entries, files and bytes sent, deletions, and what the
source did meanwhile (entries that vanished, files that kept changing)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smsrepl.files.scan import Entry

#: paths named per round for each kind of source change (the counts cover them all)
EXAMPLES = 5


@dataclass
class RoundStats:
    entries: int = 0
    files_sent: int = 0
    bytes_sent: int = 0
    unchanged: int = 0
    deleted: int = 0
    temporaries_removed: int = 0
    reread: int = 0
    #: listed, then gone (or replaced by another kind) before it was read: the next round sees it
    vanished: int = 0
    #: kept changing through every read: not sent (the target keeps its copy); the next round sends it
    changed_during_read: int = 0
    #: files with other names (hard links) sent or linked: a journal round may not see the others
    hard_links_changed: int = 0
    #: (entry, basis, ctime) of files changed too recently to trust, read again at the round's end
    deferred: list[tuple[Entry, Entry | None, int]] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)
    #: (config key, rule) of the round's path rules that matched nothing in the source (rules.
    #: RoundFilter.unmatched); rounds that walk a part of the tree (a journal's) leave it empty
    unmatched_rules: list[tuple[str, str]] = field(default_factory=list)

    @property
    def source_moved(self) -> bool:
        """The round completed, but the source changed under it: the target matches the source
        as read, not as it is now (the next round catches up)."""
        return bool(self.vanished or self.changed_during_read)

    def gone(self, path: bytes) -> None:
        self.vanished += 1
        if self.vanished <= EXAMPLES:
            self.reported.append(f"{os.fsdecode(path)}: vanished before it was read; the next round deals with it")

    def unsettled(self, path: bytes) -> None:
        self.changed_during_read += 1
        if self.changed_during_read <= EXAMPLES:
            self.reported.append(f"{os.fsdecode(path)}: kept changing while being read; not sent this round "
                                 f"(the target keeps its copy)")
