"""The file-level side of an agent's task (MIGRATE_FILE): the source tree's rounds and its check.

A :class:`FileTask` builds each round the agent's session runs (a TreeRound: the
source tree, under the task's path rules, to the receiver's directory target; the
cutover round walks the whole tree), keeps the tree's change journal from before
the first copy on when the task syncs, so that sync rounds scan only what it names,
and compares the tree with the receiver's listing for the consistency result (5.4.14).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from smsrepl.agent.link import TaskLink, TaskSide
from smsrepl.agent.server import TreeResult, TreeRound
from smsrepl.control.state import SessionStateMachine
from smsrepl.files.deletions import LastWholeRound

if TYPE_CHECKING:
    from smsrepl.files.journal import ChangeJournal
    from smsrepl.files.rules import PathRules

log = logging.getLogger("smsrepl.agent")


class FileTask:
    def __init__(self, tree: str, target: str, rules: PathRules, link: TaskLink) -> None:
        self.tree = tree
        #: the receiver's directory target
        self.target = target
        #: the task's path rules (5.10.2), anchored at the tree
        self.rules = rules
        self.link = link
        self.journal: ChangeJournal | None = None
        #: the deletion guard's memory of the tree from round to round (files.deletions)
        self.last_whole = LastWholeRound()

    def track_changes(self) -> None:
        """The tree's change journal (files.journal) from before the first copy on: SYNC_LINUX_FILE
        rounds scan what it names (where it cannot run: rounds that walk the whole tree, and one notice)."""
        from smsrepl.files.journal import open_journal

        if self.journal is None:
            self.journal = open_journal(self.tree, notice=log.warning)

    def make_round(self, states: SessionStateMachine, *, first_copy: bool, cutover: bool) -> TreeRound:
        from smsrepl.transport.file_sender import FileSender

        link = self.link
        return TreeRound(lambda: FileSender(self.tree, self.target, link.address, link.context, rules=self.rules,
                                            speed_limit=link.speed_limit(), cpu_cap=link.cpu_cap,
                                            streams=link.streams,
                                            on_report=link.on_report, host_sampler=link.sampler,
                                            journal=self.journal, last_whole=self.last_whole,
                                            whole="the cutover round walks the whole tree" if cutover else None),
                         link.state_dir, states=states, first_copy=first_copy, cutover=cutover)

    def round_done(self, result: TreeResult) -> None:
        """Nothing to keep: file rounds measure no replication lag."""

    def consistency(self) -> dict:
        """The 5.4.14 body: the tree against the receiver's listing, under the rules' CONSISTENCY_DIRs."""
        from smsrepl.control.consistency import for_upload
        from smsrepl.files.compare import compare_with_listing
        from smsrepl.transport.file_sender import FileSender

        sender = FileSender(self.tree, self.target, self.link.address, self.link.context, rules=self.rules)
        result, _ = compare_with_listing(self.tree, sender.describe_target, self.rules.consistency_dirs,
                                         rules=self.rules, list_paths=False)
        for note in result.get("notes", []):
            log.warning("consistency check: %s", note)
        return for_upload(result["consistency_result"])

    def adopt(self, old: TaskSide) -> None:
        """Take over the change journal of the task prepared before this one, when it watches
        the same tree (a START that failed is prepared again); stop anything else it ran."""
        if isinstance(old, FileTask) and old.tree == self.tree:
            self.journal, old.journal = old.journal, None
        old.close()

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None
