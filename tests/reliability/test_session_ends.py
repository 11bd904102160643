"""However a block session ends, the receiver releases its target and what it held, and the same
receiver (not a restarted one) serves the rerun, which ends identical. The full disk case is in
tests/blocks/test_direct.py and tests/live/test_full_target.py; a file target dropped silently in
tests/integration/test_file_sessions.py."""
import json
import os
import threading

import pytest

from smsrepl import faults
from smsrepl.blocks.replica import Replica
from smsrepl.errors import ReplicationError
from smsrepl.protocol import SENDER, Connection
from smsrepl.protocol import frames as F
from smsrepl.transport.channel import Channel
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.connect import connect
from smsrepl.transport.sender import Sender
from smsrepl.transport.tls import client_context, server_context

from integration.procs import CuttingProxy, wait_until

MiB = 1 << 20
SIZE = 24 * MiB


def _fds() -> int:
    """Descriptors of files, sockets and pipes (the door's selector comes as the receiver starts)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += not os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:")
        except OSError:
            pass  # the listing's own descriptor, closed by now
    return n


def _eio(src, addr, bundle, tmp_path, monkeypatch):
    faults.configure(f"eio@target.write:{8 * MiB}")
    try:
        with pytest.raises(ReplicationError, match="Input/output error"):
            _sender(src, addr, bundle, tmp_path).run()
    finally:
        faults.configure("")


def _crash(src, addr, bundle, tmp_path, monkeypatch):
    real = Replica.apply_data

    def broken(self, offset, *args, **kw):
        if offset >= 8 * MiB:
            raise RuntimeError("a bug in the session's thread")
        return real(self, offset, *args, **kw)

    monkeypatch.setattr(Replica, "apply_data", broken)
    with pytest.raises(ReplicationError, match="internal error"):
        _sender(src, addr, bundle, tmp_path).run()
    monkeypatch.setattr(Replica, "apply_data", real)


def _protocol(src, addr, bundle, tmp_path, monkeypatch):
    # the rerun's own session (its id in the sender's state) breaks the protocol mid-round
    _sender(src, addr, bundle, tmp_path).run()  # a first round, so the session id exists
    session = json.loads((tmp_path / "tx" / "disk0" / "session.json").read_text())["session_id"]
    host, port = addr
    chan = Channel(connect((host, port), client_context(bundle)), Connection(SENDER))
    chan.send(F.Hello([F.PROTOCOL_VERSION], "block", "disk0", session, SIZE, F.FINE_BLOCK, []))
    welcome = chan.recv()
    assert isinstance(welcome, F.Welcome), welcome
    chan.send(F.RoundBegin(welcome.round_id + 1, "sync", 0))
    chan.send(F.ZeroRange(8 * MiB, 4096))
    chan.send(F.ZeroRange(4 * MiB, 4096))  # backwards: a protocol violation
    ev = chan.recv()
    chan.close()
    assert isinstance(ev, F.Error) and "backwards" in ev.message, ev


def _cut(src, addr, bundle, tmp_path, monkeypatch):
    proxy = CuttingProxy(addr[1], 10 * MiB)
    try:
        with pytest.raises(ReplicationError):
            _sender(src, ("127.0.0.1", proxy.port), bundle, tmp_path).run()
    finally:
        proxy.close()


def _vanished(src, addr, bundle, tmp_path, monkeypatch):
    # the peer goes silent mid-copy (a middlebox lost its state); the sender gives up, closes
    # nothing on the receiver's side, and reruns at once
    proxy = CuttingProxy(addr[1], 10 * MiB, silent=True)
    sender = _sender(src, ("127.0.0.1", proxy.port), bundle, tmp_path)
    threading.Thread(target=lambda: proxy.stalled.wait(30) and sender.stop(), daemon=True).start()
    with pytest.raises(ReplicationError):
        sender.run()
    return proxy  # it keeps the receiver's side of that connection open until after the rerun


def _sender(src, addr, bundle, tmp_path):
    return Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx"), level=0)


@pytest.mark.reliability("receiver under faults", "every way a session ends: target released, same receiver reruns")
@pytest.mark.parametrize("end", [_eio, _crash, _protocol, _cut, _vanished],
                         ids=["eio", "thread crash", "protocol error", "cut", "peer vanished"])
def test_however_a_session_ends_the_same_receiver_serves_the_rerun(tmp_path, bundle, monkeypatch, end):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(os.urandom(SIZE))
    rx = Receiver({"disk0": str(dst)}, server_context(bundle), str(tmp_path / "rx"), create=True)
    addr = rx.start()
    idle = _fds()
    proxy = None
    try:
        proxy = end(src, addr, bundle, tmp_path, monkeypatch)
        with open(src, "r+b") as fh:  # the source moved on meanwhile
            fh.seek(12 * MiB)
            fh.write(os.urandom(MiB))
        _sender(src, addr, bundle, tmp_path).run()
        if proxy is not None:
            proxy.close()
        # every session over, its descriptors closed (the receiver's and this test's senders')
        assert wait_until(lambda: rx.connections()[0] == 0 and _fds() <= idle, 15), (rx.connections(), _fds(), idle)
    finally:
        if proxy is not None:
            proxy.close()
        rx.stop()
    assert dst.read_bytes() == src.read_bytes()


def _tree(root, rng):
    for d in range(12):
        os.makedirs(root / f"d{d}", exist_ok=True)
        for f in range(6):
            (root / f"d{d}" / f"f{f}").write_bytes(rng.randbytes(rng.randint(1, 300 << 10)))


def _file_eio(src, addr, bundle, monkeypatch):
    import errno

    from smsrepl.files.opapply import OpApplier

    real, calls = OpApplier._apply, [0]

    def failing(self, *args):
        calls[0] += 1
        if calls[0] == 5:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(self, *args)

    monkeypatch.setattr(OpApplier, "_apply", failing)
    with pytest.raises(ReplicationError, match="Input/output error"):
        _file_sender(src, addr, bundle).run()
    monkeypatch.setattr(OpApplier, "_apply", real)


def _file_crash(src, addr, bundle, monkeypatch):
    from smsrepl.files.opapply import OpApplier

    real, calls = OpApplier.apply, [0]

    def broken(self, ev):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("a bug in the session's thread")
        return real(self, ev)

    monkeypatch.setattr(OpApplier, "apply", broken)
    with pytest.raises(ReplicationError, match="internal error"):
        _file_sender(src, addr, bundle).run()
    monkeypatch.setattr(OpApplier, "apply", real)


def _file_cut(src, addr, bundle, monkeypatch):
    proxy = CuttingProxy(addr[1], 4 * MiB)
    try:
        with pytest.raises(ReplicationError):
            _file_sender(src, ("127.0.0.1", proxy.port), bundle).run()
    finally:
        proxy.close()


def _file_sender(src, addr, bundle):
    from smsrepl.transport.file_sender import FileSender

    return FileSender(str(src), "tree", addr, client_context(bundle), level=0)


@pytest.mark.reliability("receiver under faults", "every way a session ends: target released, same receiver reruns")
@pytest.mark.parametrize("end", [_file_eio, _file_crash, _file_cut], ids=["eio", "thread crash", "cut"])
def test_however_a_file_session_ends_the_same_receiver_serves_the_rerun(tmp_path, bundle, monkeypatch, end):
    import random

    from files.trees import oracle

    src, dst = tmp_path / "src", tmp_path / "dst"
    rng = random.Random(11)
    _tree(src, rng)
    rx = Receiver({"tree": str(dst)}, server_context(bundle), str(tmp_path / "rx"), create=True)
    addr = rx.start()
    idle = _fds()
    try:
        end(src, addr, bundle, monkeypatch)
        (src / "d3" / "f1").write_bytes(rng.randbytes(100 << 10))  # the source moved on meanwhile
        _file_sender(src, addr, bundle).run()
        assert wait_until(lambda: rx.connections()[0] == 0 and _fds() <= idle, 15), (rx.connections(), _fds(), idle)
    finally:
        rx.stop()
    assert oracle(str(src), dst) == ""
    assert not [n for _, _, names in os.walk(dst) for n in names if n.startswith(".smsrepl~")]  # no temporaries
