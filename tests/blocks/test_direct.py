"""DirectWriter: a failed write is reported and closing afterwards frees everything."""
import errno

import pytest

from smsrepl import faults
from smsrepl.blocks.direct import STAGE, DirectWriter, StagePool


@pytest.fixture
def enospc():
    faults.configure(f"enospc@target.write:{STAGE}")
    yield
    faults.configure("")


def test_a_failed_write_is_raised_and_close_still_frees_the_stages(tmp_path, enospc):
    path = tmp_path / "t.img"
    path.write_bytes(b"")
    w = DirectWriter(str(path), lambda off, view: None)
    data = memoryview(bytes(4096) * 512)
    w.write(0, data)
    w.write(STAGE, data)  # past the fault's offset: ENOSPC on the writer thread
    with pytest.raises(OSError) as got:
        w.drain()
    assert got.value.errno == errno.ENOSPC
    # the kept error must not hold the stage's exported view through its traceback: a
    # receiver closes the writer as its session ends, and a BufferError there kept the
    # target claimed until the receiver restarted
    w.close()
    assert w.fd == -1
    assert w._pool.trim(strict=True) >= 1  # BufferError if a kept error still held a view of one


@pytest.mark.reliability("receiver under faults", "full disk: the same receiver serves the rerun")
def test_after_a_full_disk_the_same_receiver_serves_the_rerun(tmp_path, bundle, enospc):
    """ENOSPC during a block session; then space comes back and the rerun, against the receiver
    that saw the failure (not a restarted one), completes identical."""
    import os

    from smsrepl.errors import ReplicationError
    from smsrepl.transport.receiver import Receiver
    from smsrepl.transport.sender import Sender
    from smsrepl.transport.tls import client_context, server_context

    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(os.urandom(3 * STAGE))
    rx = Receiver({"disk0": str(dst)}, server_context(bundle), str(tmp_path / "rx"), create=True)
    addr = rx.start()
    try:
        sender = Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0)
        with pytest.raises(ReplicationError) as got:
            sender.run()
        assert "No space left on device" in str(got.value)
        faults.configure("")  # space freed
        Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0).run()
    finally:
        rx.stop()
    assert dst.read_bytes() == src.read_bytes()


def test_writers_share_a_bounded_pool_of_stages_and_idle_ones_are_unmapped():
    import threading

    pool = StagePool(limit=2, keep=1)
    a, b = pool.get(), pool.get()
    assert pool.made == 2
    got = []
    t = threading.Thread(target=lambda: got.append(pool.get()))
    t.start()
    t.join(0.3)
    assert t.is_alive() and not got  # a third waits: the pool is bounded
    pool.put(a)
    t.join(5)
    assert got == [a] and pool.made == 2
    pool.put(b)
    pool.put(got[0])  # one more free than kept: unmapped
    assert pool.made == 1 and len(pool._free) == 1
    assert pool.trim() == 1 and pool.made == 0
