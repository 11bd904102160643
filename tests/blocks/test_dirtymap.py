"""Dirty map: marks, ranges, freeze-and-swap, and crash safety (kills never lose a mark)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from smsrepl.blocks.dirtymap import DirtyMap, HEADER_SIZE
from smsrepl.kernels import FINE_BLOCK
from smsrepl.errors import ConfigError, ManifestError

SIZE = (40 << 20) - 1000  # a short last block


def _brute(marks, size):
    nb = -(-size // FINE_BLOCK)
    mask = np.zeros(nb, dtype=bool)
    for off, n in marks:
        mask[off // FINE_BLOCK:(off + n - 1) // FINE_BLOCK + 1] = True
    return mask


def _mask(ranges, size):
    mask = np.zeros(-(-size // FINE_BLOCK), dtype=bool)
    for off, n in ranges:
        assert off % FINE_BLOCK == 0 and (n % FINE_BLOCK == 0 or off + n == size)
        mask[off // FINE_BLOCK:-(-(off + n) // FINE_BLOCK)] = True
    return mask


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 300_000)), max_size=40))
def test_marks_and_ranges_match_brute_force(tmp_path_factory, marks):
    marks = [(o, min(n, SIZE - o)) for o, n in marks]
    path = str(tmp_path_factory.mktemp("dm") / "map")
    with DirtyMap.open(path, SIZE) as m:
        for off, n in marks:
            m.mark(off, n)
        got = list(m.ranges())
        assert np.array_equal(_mask(got, SIZE), _brute(marks, SIZE))
        assert m.dirty_blocks() == int(_brute(marks, SIZE).sum())
        assert all(a[0] + a[1] < b[0] for a, b in zip(got, got[1:]))  # runs are joined


def test_new_map_is_untrusted_until_reset_and_bad_input_is_refused(tmp_path):
    path = str(tmp_path / "map")
    m = DirtyMap.open(path, SIZE)
    assert not m.trusted and "new map" in m.reason
    with pytest.raises(ConfigError, match="outside"):
        m.mark(SIZE - 10, 20)
    m.reset()
    assert m.trusted
    m.close()
    with pytest.raises(ManifestError, match="tracks"):
        DirtyMap.open(path, SIZE + 4096 * 64)
    m = DirtyMap.open(path, SIZE)
    assert m.trusted and m.reason == "clean"
    m.close()


def test_freeze_swaps_slots_and_release_clears_the_round(tmp_path):
    m = DirtyMap.open(str(tmp_path / "map"), SIZE)
    m.reset()
    m.mark(0, 10)
    m.mark(8 * FINE_BLOCK, FINE_BLOCK)
    f = m.freeze()
    m.mark(4 * FINE_BLOCK, 1)  # during the round: goes to the next one
    assert list(f.ranges()) == [(0, FINE_BLOCK), (8 * FINE_BLOCK, FINE_BLOCK)]
    assert f.blocks(0, 10).tolist() == [True] + [False] * 7 + [True, False]
    assert m.dirty_blocks() == 3
    f.release()
    assert list(m.ranges()) == [(4 * FINE_BLOCK, FINE_BLOCK)]
    f2 = m.freeze()
    assert list(f2.ranges()) == [(4 * FINE_BLOCK, FINE_BLOCK)]
    f2.release()
    assert list(m.ranges()) == [] and m.dirty_blocks() == 0
    m.close()


def test_a_round_that_never_released_is_merged_into_the_next(tmp_path):
    m = DirtyMap.open(str(tmp_path / "map"), SIZE)
    m.reset()
    m.mark(0, 1)
    m.freeze()  # this round fails: no release
    m.mark(FINE_BLOCK * 3, 1)
    f = m.freeze()
    assert list(f.ranges()) == [(0, FINE_BLOCK), (3 * FINE_BLOCK, FINE_BLOCK)]
    m.close()
    m = DirtyMap.open(str(tmp_path / "map"), SIZE)  # and across a restart
    assert [r[0] for r in m.ranges()] == [0, 3 * FINE_BLOCK]
    m.merge(np.arange(m.nblocks) == 7)
    assert [r[0] for r in m.ranges()] == [0, 3 * FINE_BLOCK, 7 * FINE_BLOCK]
    m.close()


def test_unclean_stop_under_another_boot_is_untrusted(tmp_path):
    path = str(tmp_path / "map")
    m = DirtyMap.open(path, SIZE)
    m.reset()
    m.mark(0, 1)
    m.close()
    with open(path, "r+b") as fh:  # what a machine crash leaves: not closed cleanly, another boot
        fh.seek(26)
        fh.write(b"\0")
        fh.seek(32)
        fh.write(b"0" * 36)
    m = DirtyMap.open(path, SIZE)
    assert not m.trusted and "restarted" in m.reason
    m.close()
    assert not DirtyMap.open(path, SIZE).trusted  # stays untrusted until a full scan resets it


CHILD = r"""
import os, random
from smsrepl.blocks.dirtymap import DirtyMap
m = DirtyMap.open({path!r}, {size})
log = os.open({log!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
rng = random.Random({seed})
frozen = None
while True:
    r = rng.random()
    if r < 0.9:
        off = rng.randrange({size})
        n = min(rng.randrange(1, 200_000), {size} - off)
        m.mark(off, n)
        os.write(log, f"M {{off}} {{n}}\n".encode())
    elif r < 0.95:
        frozen = m.freeze()
        os.write(log, b"F\n")
    elif frozen is not None:
        os.write(log, b"r\n")  # the round is durable on the target: its marks may go
        frozen.release()
        frozen = None
"""


def _kill_run(tmp_path, seed):
    path, log = str(tmp_path / f"map{seed}"), str(tmp_path / f"log{seed}")
    m = DirtyMap.open(path, SIZE)
    m.reset()
    m.close()
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(path=path, size=SIZE, log=log, seed=seed)])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not os.path.exists(log) or os.path.getsize(log) < 2000):
        time.sleep(0.01)  # running: now kill it at a point that differs from seed to seed
    time.sleep((seed % 7) * 0.03)
    child.send_signal(signal.SIGKILL)
    child.wait()
    lines = open(log).read().splitlines()
    # marks logged after the freeze of the last round whose release began must all be dirty
    last_r = max((i for i, l in enumerate(lines) if l == "r"), default=-1)
    last_f = max((i for i, l in enumerate(lines[:last_r]) if l == "F"), default=-1) if last_r >= 0 else -1
    # (a line the kill cut short names no mark: the child logs a mark once it is made)
    must = [tuple(map(int, l.split()[1:])) for l in lines[last_f + 1:] if l.startswith("M") and len(l.split()) == 3]
    m = DirtyMap.open(path, SIZE)
    assert m.trusted, m.reason  # same boot: the page cache kept every bit
    got = _mask(m.ranges(), SIZE)
    want = _brute(must, SIZE)
    m.close()
    assert not (want & ~got).any(), f"seed {seed}: marks lost"
    return len(lines)


@pytest.mark.reliability("fault", "kill -9 while marking the dirty map")
@pytest.mark.parametrize("seed", range(int(os.environ.get("SMSREPL_KILL_RUNS", "3")) * 2))
def test_killed_process_loses_no_mark(tmp_path, seed):
    assert _kill_run(tmp_path, seed) > 10


@pytest.mark.parametrize("damage, message", [
    (lambda p: open(p, "r+b").write(b"NOTAMAP!"), "not a version 1 dirty map"),
    (lambda p: os.truncate(p, HEADER_SIZE + 10), "bytes, a"),
    (lambda p: (lambda fh: (fh.seek(24), fh.write(b"\x07")))(open(p, "r+b")), "damaged header"),
])
def test_damaged_dirty_map_is_a_clear_error_and_left_alone(tmp_path, damage, message):
    path = str(tmp_path / "map")
    DirtyMap.open(path, SIZE).close()
    damage(path)
    before = open(path, "rb").read()
    with pytest.raises(ManifestError, match=message):
        DirtyMap.open(path, SIZE)
    assert open(path, "rb").read() == before


def test_non_positive_size_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="positive"):
        DirtyMap.open(str(tmp_path / "map"), 0)


def test_close_with_a_round_view_still_alive_keeps_the_map_clean(tmp_path):
    # a failed round's traceback can keep a view of the bits alive until the cycle collector
    # runs; closing must neither raise nor lose the clean flag (seen: BufferError at the cutover)
    import gc

    path = str(tmp_path / "map")
    m = DirtyMap.open(path, SIZE)
    m.reset()
    m.mark(8192, 4096)
    held = m._bits[0][:16]  # a view into the mapping, as a round's arrays are
    cycle = [held]
    cycle.append(cycle)  # reachable only through a cycle, as a traceback's frames are
    del held
    gc.disable()
    try:
        del cycle
        m.close()  # must not raise BufferError
    finally:
        gc.enable()
    m = DirtyMap.open(path, SIZE)
    assert m.trusted and m.reason == "clean" and list(m.ranges()) == [(8192, 4096)]
    m.close()
