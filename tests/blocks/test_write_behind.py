"""BlockTarget.write_behind: writeback starts on a thread of its own, never on the caller's."""
import threading

import numpy as np

from smsrepl.blocks import target as device
from smsrepl.blocks.target import BlockTarget


def test_write_behind_leaves_the_caller_free_and_close_waits_for_it(tmp_path, monkeypatch):
    started, release, calls = threading.Event(), threading.Event(), []

    def slow_writeback(fd, offset, nbytes, flags):  # a disk busy with the round's writes
        calls.append(fd)
        started.set()
        release.wait(10)
        return 0

    monkeypatch.setattr(device, "_sync_file_range", slow_writeback)
    t = BlockTarget(str(tmp_path / "t.img"), need_size=1 << 20)
    data = np.full(2 * 4096, 7, dtype=np.uint8)
    t.write_ranges(data, np.array([0, 65536], dtype=np.int64), np.array([4096, 4096], dtype=np.int64))
    t.write_behind()  # returns while the writeback is held
    assert started.wait(10)
    t.write_behind()  # folded into the next writeback, still without waiting
    closer = threading.Thread(target=t.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive()  # the descriptor stays open while a writeback runs on it
    release.set()
    closer.join(10)
    assert not closer.is_alive() and t.fd == -1
    assert 1 <= len(calls) <= 2
    assert (tmp_path / "t.img").read_bytes()[65536:65536 + 4096] == b"\x07" * 4096
