"""The descriptor budget that the tree writers of one process share."""
import threading
import time

import pytest

from smsrepl.files.fdbudget import MIN_SHARE, DescriptorBudget


def test_each_writer_gets_its_fair_share_and_never_more_than_is_left():
    b = DescriptorBudget(1000)
    b.join()
    assert b.take(5000, 0) == 1000  # alone: all of it
    b.give_back(1000)
    for _ in range(3):
        b.join()
    assert b.share() == 250
    assert b.take(400, 0) == 250  # four writers: a quarter each
    assert b.take(400, 250) == 0  # holding its share already
    assert b.take(100, 0) == 100
    assert b.take(1000, 0) == 250 and b.take(1000, 0) == 250
    assert b.held == 850 and b.take(500, 0) == 150  # the rest, not a whole share
    assert b.take(10, 0) == 0
    b.leave(100)
    assert b.held == 900 and b.writers == 3


def test_a_crowd_still_gets_the_minimum_share():
    b = DescriptorBudget(100)
    for _ in range(50):
        b.join()
    assert b.share() == MIN_SHARE


def test_a_waiting_writer_wakes_when_descriptors_come_back():
    b = DescriptorBudget(10)
    b.join()
    b.join()
    assert b.take(5, 0) == 5 and b.take(5, 0) == 5
    got = []

    def waiter():
        while not (n := b.take(5, 0)):
            b.wait(5)
        got.append(n)

    t = threading.Thread(target=waiter)
    t0 = time.monotonic()
    t.start()
    time.sleep(0.1)
    assert not got
    b.give_back(3)
    t.join(5)
    assert got == [3] and time.monotonic() - t0 < 4.5  # woken, not by its 5 s wait running out


def test_a_budget_of_nothing_is_refused():
    with pytest.raises(ValueError, match="leaves nothing"):
        DescriptorBudget(0)


@pytest.mark.skipif(not __import__("smsrepl.kernels", fromlist=["TREE"]).TREE, reason="runs of files are native")
def test_a_run_that_fails_any_way_gives_its_room_back(tmp_path, monkeypatch):
    """A run's room is taken from the process's budget before its files are written; a run
    stopped by something other than an OSError (a directory of the run that cannot be opened
    raises TargetWriteError through the kernel's callback) must give it back, or every later
    session of the process waits for descriptors that never come (a stress run's receiver
    wrote every file the slow way, 5 s each, until its senders timed out)."""
    from smsrepl import kernels
    from smsrepl.errors import TargetWriteError
    from smsrepl.files import apply
    from smsrepl.files.fdbudget import process_budget

    budget = process_budget()
    before = budget.held

    def failing(body, pos, dir_fd_of, *rest):
        dir_fd_of(b"not/there")  # what the kernel asks for a run's directory
        raise AssertionError("dir_fd_of should have raised")

    monkeypatch.setattr(kernels, "write_files", failing)
    w = apply.TreeWriter(str(tmp_path))
    try:
        with pytest.raises(TargetWriteError):
            w.write_run(b"\0" * 64, 0)
        assert budget.held == before
    finally:
        w.close()
    assert budget.held == before
