"""A task prepared again (its START failed after the task was read) keeps its change tracking:
the disks and the tree it still names keep their trackers and journal, so the next sync round
reads only what changed instead of every disk whole; what it no longer names stops."""
from smsrepl.agent.block_task import BlockTask
from smsrepl.agent.file_task import FileTask
from smsrepl.agent.link import TaskLink
from smsrepl.agent.server import DiskPlan


class Tracking:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _link() -> TaskLink:
    return TaskLink("t1", ("127.0.0.1", 1), None, "/nonexistent", None, None, print, lambda: None)


def test_a_block_task_prepared_again_keeps_the_trackers_of_the_disks_it_still_names():
    old = BlockTask([DiskPlan("/dev/vda", "/img/a", "vda"), DiskPlan("/dev/vdb", "/img/b", "vdb")], _link())
    kept, dropped = Tracking(), Tracking()
    old.trackers = {"/img/a": kept, "/img/b": dropped}
    new = BlockTask([DiskPlan("/dev/vda", "/img/a", "vda")], _link())
    new.adopt(old)
    assert new.trackers == {"/img/a": kept} and not kept.closed
    assert dropped.closed and old.trackers == {}


def test_a_file_task_prepared_again_keeps_the_journal_of_the_same_tree_only():
    old = FileTask("/srv/a", "home", None, _link())
    journal = old.journal = Tracking()
    new = FileTask("/srv/a", "home", None, _link())
    new.adopt(old)
    assert new.journal is journal and not journal.closed and old.journal is None
    other = FileTask("/srv/b", "home", None, _link())
    other.adopt(new)
    assert other.journal is None and journal.closed


def test_a_task_of_the_other_kind_stops_what_the_old_one_tracked():
    old = FileTask("/srv/a", "home", None, _link())
    journal = old.journal = Tracking()
    BlockTask([DiskPlan("/dev/vda", "/img/a", "vda")], _link()).adopt(old)
    assert journal.closed
