"""BodyPool: large frame bodies of all connections, reused, bounded, and handed back."""
import threading
import time

import pytest

from smsrepl.transport.bodies import BodyPool

MiB = 1 << 20


def test_a_body_is_reused_once_nothing_refers_to_it():
    pool = BodyPool(64 * MiB)
    a = pool.get(8 * MiB, "c1")
    a[:3] = b"abc"
    b = pool.get(8 * MiB, "c1")  # a is still in use: a second buffer
    assert pool.held() == (2, 16 * MiB)
    del a
    c = pool.get(4 * MiB, "c2")  # a's buffer, now free, serves another connection
    assert bytes(c[:3]) == b"abc" and pool.held() == (2, 16 * MiB)
    del b, c
    assert pool.trim() == 2 and pool.held() == (0, 0)


def test_free_bodies_beyond_keep_go_back_to_the_system():
    pool = BodyPool(64 * MiB, keep=1)
    views = [pool.get(MiB, f"c{i}") for i in range(4)]
    del views
    pool.get(MiB, "c9")  # takes one free body, drops all free ones but `keep`
    assert pool.held()[0] == 2


def test_a_connection_past_its_floor_waits_for_a_body_when_the_pool_is_full():
    pool = BodyPool(16 * MiB, floor=1, max_wait=30)
    held = pool.get(8 * MiB, "busy")
    mine = pool.get(8 * MiB, "c1")  # below its floor: granted although the pool is now full
    got = []
    t = threading.Thread(target=lambda: got.append(pool.get(8 * MiB, "c1")))
    t.start()
    t.join(0.3)
    assert t.is_alive() and not got and pool.waits == 1  # full, and c1 has its floor in use
    del held  # another connection's frame was applied
    t.join(10)
    assert got and pool.held() == (2, 16 * MiB) and pool.overdrawn == 0
    del mine


def test_a_connection_below_its_floor_never_waits():
    pool = BodyPool(8 * MiB, floor=2, max_wait=30)
    others = [pool.get(8 * MiB, "hog") for _ in range(2)]  # the pool is over its limit already
    t0 = time.monotonic()
    mine = [pool.get(8 * MiB, "c1"), pool.get(8 * MiB, "c1")]
    assert time.monotonic() - t0 < 5 and pool.waits == 0 and pool.overdrawn == 0
    del others, mine


def test_no_wait_outlasts_max_wait():
    pool = BodyPool(8 * MiB, floor=1, max_wait=0.2)
    held = [pool.get(8 * MiB, "c1")]  # the consumer keeps it and asks for more
    t0 = time.monotonic()
    held.append(pool.get(8 * MiB, "c1"))
    assert 0.15 <= time.monotonic() - t0 < 5 and pool.overdrawn == 1
    del held


@pytest.mark.parametrize("n", [64])
def test_many_connections_stay_within_the_limit_plus_their_floors(n):
    pool = BodyPool(32 * MiB, floor=1, max_wait=30)
    stop = threading.Event()
    peak = [0]

    def conn(i):
        for _ in range(20):
            v = pool.get(MiB, f"c{i}")
            v[0] = 1
            peak[0] = max(peak[0], pool.held()[1])
            time.sleep(0.001)
            del v

    threads = [threading.Thread(target=conn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    assert peak[0] <= 32 * MiB + n * MiB and pool.overdrawn == 0


def test_a_receiver_draws_every_session_s_bodies_from_one_bounded_pool(tmp_path, bundle, monkeypatch):
    """Concurrent block sessions against one receiver: their frame bodies come from the process
    pool, which the limit bounds (each connection past its floor waits), and go back when the
    sessions end; every target is identical."""
    import os

    from smsrepl.transport import server
    from smsrepl.transport.receiver import Receiver
    from smsrepl.transport.sender import Sender
    from smsrepl.transport.tls import client_context, server_context

    pool = BodyPool(16 * MiB, max_wait=30)
    monkeypatch.setattr(server, "body_pool", lambda: pool)
    n = 3
    sources = []
    for i in range(n):
        src = tmp_path / f"src{i}.img"
        src.write_bytes(os.urandom(16 * MiB))
        sources.append(src)
    rx = Receiver({f"d{i}": str(tmp_path / f"dst{i}.img") for i in range(n)}, server_context(bundle),
                  str(tmp_path / "rx"), create=True)
    addr = rx.start()
    peak, done, errors = [0], threading.Event(), []

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], pool.held()[1])
            time.sleep(0.002)

    def send(i):
        try:
            Sender(str(sources[i]), f"d{i}", addr, client_context(bundle), str(tmp_path / f"tx{i}"), level=0).run()
        except BaseException as exc:  # reported below
            errors.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    senders = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    try:
        for t in senders:
            t.start()
        for t in senders:
            t.join(300)
    finally:
        done.set()
        watcher.join()
        rx.stop()
    assert not errors, errors
    for i in range(n):
        assert (tmp_path / f"dst{i}.img").read_bytes() == sources[i].read_bytes()
    # bodies of 8 MiB frames (and their digests): the limit plus each connection's floor
    assert 0 < peak[0] <= 16 * MiB + n * pool.floor * 9 * MiB, peak
    assert pool.overdrawn == 0  # no connection was held back for long
    assert pool.held() == (0, 0)  # handed back as the sessions ended
