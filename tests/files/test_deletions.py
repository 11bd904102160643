"""files.deletions: the limit of a round's deletions, counted as the round counts them."""
import os
import shutil

import pytest

from smsrepl import kernels
from smsrepl.codec import Decompressor
from smsrepl.errors import DeletionLimitError, EXIT_USAGE
from smsrepl.files import deletions
from smsrepl.files.deletions import check_deletions, listed_entries, would_delete
from smsrepl.files.decide import delete_gone
from smsrepl.files.describe import describe_tree
from smsrepl.files.listing import Listing
from smsrepl.files.local import sync_tree
from smsrepl.files.roundstats import RoundStats
from smsrepl.files.rules import PathRules
from smsrepl.transport.file_sender import FileSender
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.tls import client_context, server_context

from files.trees import rich_tree


@pytest.mark.parametrize("count,total,limit,refused", [
    (9, 9, None, False),  # below the floor: not guarded
    (5, 10, None, False),  # half may go
    (6, 10, None, True),
    (6, None, None, False),  # a journal round's part of the target: not guarded by default
    (3, 10, 3, False), (4, 10, 3, True), (1, 100, 0, True), (0, 100, 0, False), (100, 100, -1, False),
])
def test_check_deletions(count, total, limit, refused):
    if not refused:
        check_deletions(count, total, limit, "t")
        return
    with pytest.raises(DeletionLimitError, match=f"would delete {count} .*target 't'") as exc:
        check_deletions(count, total, limit, "t")
    assert exc.value.exit_code == EXIT_USAGE and "nothing was changed" in str(exc.value)


@pytest.mark.parametrize("count,walked,last,refused", [
    (30, 50, 100, False),  # the tree turned over but kept half its size: a continuous round goes on
    (30, 100, 100, False),
    (30, 49, 100, True),  # the source lost more than half of its entries: unmounted, emptied
    (30, 1, 100, True),
    (5, 1, 100, False),  # at most half of the target: as without the memory
    (30, 49, None, True),  # no whole-tree round of this sender yet: the target's half
])
def test_a_continuous_senders_default_guard_asks_whether_the_source_collapsed(count, walked, last, refused):
    if not refused:
        check_deletions(count, 40, None, "t", source_entries=walked, last_whole=last)
        return
    with pytest.raises(DeletionLimitError, match=f"would delete {count} of 40 entries on target 't'") as exc:
        check_deletions(count, 40, None, "t", source_entries=walked, last_whole=last)
    if last is not None:
        assert f"the source holds {walked} entries where the last whole-tree round saw {last}" in str(exc.value)
    with pytest.raises(DeletionLimitError, match="more than --max-delete 3"):  # an explicit limit holds as it is
        check_deletions(count, 40, 3, "t", source_entries=100, last_whole=100)


@pytest.mark.parametrize("count,now,last,refused", [
    (18, 1, 34, True),  # more than half of what the last whole-tree round saw, and the source collapsed
    (18, 17, 34, False),  # the source kept half: a tree that moved
    (17, 1, 34, False),  # half at most: not counted
    (18, None, 34, False),  # not counted (an explicit limit, or no memory)
    (9, 1, 9, False),  # a small tree: not guarded
])
def test_a_journal_rounds_deletions_are_held_to_the_collapse_question(count, now, last, refused):
    if not refused:
        check_deletions(count, None, None, "t", changed=True, source_entries=now, last_whole=last)
        return
    with pytest.raises(DeletionLimitError, match=f"would delete {count} entries on target 't', more than half of "
                                                 f"the {last} that the last whole-tree round saw, and the source "
                                                 f"holds {now} entries now"):
        check_deletions(count, None, None, "t", changed=True, source_entries=now, last_whole=last)


def test_source_entries_counts_what_a_whole_round_walks(tmp_path):
    src = os.fsdecode(rich_tree(tmp_path / "src"))
    rules = PathRules.from_configurations({"configurations": [
        {"config_key": "SYNC_EXCLUDE_PATH", "config_value": "/with space"}]})
    for filt in (None, rules.for_round("sync")):
        stats = sync_tree(src, str(tmp_path / f"dst{filt is None}"), rules=None if filt is None else rules,
                          kind="sync")
        assert deletions.source_entries(src, filt) == deletions.source_entries(src, filt, True) == stats.entries


def test_delete_gone_refused_deletes_nothing():
    class Target:
        deleted = []

        def delete(self, path):
            self.deleted.append(path)

        def deletion_limit(self, count, walked):
            check_deletions(count, 20, None, "t", changed=True, source_entries=walked, last_whole=last_whole)

    t = Target()
    last_whole = None
    with pytest.raises(DeletionLimitError, match="nothing was deleted .the round's other changes were made"):
        delete_gone(t, [b"x%d" % i for i in range(11)], RoundStats())
    assert t.deleted == []
    delete_gone(t, [b"x%d" % i for i in range(10)], RoundStats())
    assert len(t.deleted) == 10
    # a continuous round: the source as the round walked it, against the last whole-tree round's
    last_whole, t.deleted = 30, []
    with pytest.raises(DeletionLimitError, match="the source holds 14 entries where the last whole-tree round saw 30"):
        delete_gone(t, [b"x%d" % i for i in range(11)], RoundStats(entries=14))
    assert t.deleted == []
    delete_gone(t, [b"x%d" % i for i in range(11)], RoundStats(entries=15))
    assert len(t.deleted) == 11


def _listing(root, checksum):
    listing, decomp = Listing(), Decompressor()
    for frame in describe_tree(root, checksum=checksum):
        listing.add(frame, decomp)
    return listing


@pytest.mark.parametrize("checksum", [False, True])  # a directory at a time (native) and entry by entry
def test_would_delete_counts_what_a_round_deletes(tmp_path, checksum):
    src = os.fsdecode(rich_tree(tmp_path / "src"))
    dst = str(tmp_path / "dst")
    sync_tree(src, dst)
    shutil.rmtree(os.path.join(src, "with space", "deeper"))
    os.unlink(os.path.join(src, "fifo"))
    os.makedirs(os.path.join(src, "cache", "x"))
    os.makedirs(os.path.join(dst, "cache", "kept"))  # excluded: never deleted, never counted
    rules = PathRules.from_configurations({"configurations": [
        {"config_key": "SYNC_EXCLUDE_PATH", "config_value": "/cache"}]})
    listing = _listing(dst, checksum)
    total = listed_entries(listing)
    assert total == sum(len(d) + len(f) for _, d, f in os.walk(dst))
    count = would_delete(src, listing, rules.for_round("sync"), checksum)
    stats = sync_tree(src, dst, rules=rules, kind="sync", checksum=checksum)
    assert count.deletions == stats.deleted == 43
    assert count.source_entries == stats.entries
    assert os.path.isdir(os.path.join(dst, "cache", "kept"))


def test_a_round_past_its_limit_at_the_deletion_step_deletes_nothing(tmp_path, bundle, monkeypatch):
    """The source may lose entries after the count (or a journal round is not counted ahead): the
    round's deletion step checks again."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    for i in range(12):
        (src / "d").mkdir(parents=True, exist_ok=True)
        (src / "d" / f"f{i}").write_bytes(b"x" * i)
    rx = Receiver({"tree": str(dst)}, server_context(bundle), str(tmp_path / "rx"), idle_timeout=10, create=True)
    addr = rx.start()
    try:
        def send(**kw):
            return FileSender(str(src), "tree", addr, client_context(bundle), **kw).run()

        send()
        for i in range(5):
            (src / "d" / f"f{i}").unlink()
        # as if counted before they went
        monkeypatch.setattr(deletions, "would_delete", lambda *a, **kw: deletions.Count(0, 14))
        with pytest.raises(DeletionLimitError, match="would delete 5 entries on target 'tree', more than "
                                                     "--max-delete 2: nothing was deleted"):
            send(max_delete=2)
        assert sorted(os.listdir(dst / "d")) == sorted(f"f{i}" for i in range(12))
        monkeypatch.undo()
        assert send(max_delete=5).stats.deleted == 5
    finally:
        rx.stop()
