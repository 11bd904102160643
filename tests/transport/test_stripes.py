"""Parallel streams below the sessions: the sender's Stripes over several connections and the
receiver's FrameOrder, on socket pairs (no TLS)."""
import queue
import socket
import threading
import time

import numpy as np
import pytest

from smsrepl import kernels
from smsrepl.errors import RemoteProtocolError
from smsrepl.protocol import RECEIVER, SENDER, Connection, ConnectionClosed
from smsrepl.protocol import frames as F
from smsrepl.protocol.connection import State
from smsrepl.transport.channel import Channel
from smsrepl.protocol.frames import frame_size
from smsrepl.transport.frame_order import HELD_COST, FrameOrder
from smsrepl.transport.stripes import Stripes


class _Plain:
    """What Channel uses of a TLS stream, over a plain socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.raw = sock

    def sendall(self, data) -> None:
        self.raw.sendall(data)

    def recv_into(self, buf) -> int:
        return self.raw.recv_into(buf)

    def close(self) -> None:
        self.raw.close()


def _pair(main: bool) -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    tx, rx = Channel(_Plain(a), Connection(SENDER)), Channel(_Plain(b), Connection(RECEIVER))
    for chan in (tx, rx):
        chan.conn.state = State.ROUND if main else State.STREAM
    return tx, rx


def _read(chan: Channel, order: FrameOrder) -> None:
    try:
        while True:
            ev = chan.recv()
            if not isinstance(ev, F.Seq):
                return
            if not order.put_seq(ev.seq, chan.recv()):
                return
    except Exception as exc:  # noqa: BLE001
        order.put_nowait(exc)


def _frame(buf: bytearray, offset: int, rng) -> F.BlockData:
    buf[:] = rng.integers(1, 256, len(buf), dtype=np.uint8).tobytes()
    digests = np.empty(len(buf) // 4096, dtype="<u8")
    kernels.block_digests(bytes(buf), 4096, digests)
    return F.BlockData(offset, len(buf), 0, digests, memoryview(buf))


def test_frames_keep_one_order_over_three_connections_and_their_buffers_may_be_reused_at_once():
    pairs = [_pair(True), _pair(False), _pair(False)]
    stripes = Stripes(pairs[0][0], [tx for tx, _ in pairs[1:]])
    order = FrameOrder(depth=4)
    readers = [threading.Thread(target=_read, args=(rx, order), daemon=True) for _, rx in pairs]
    for t in readers:
        t.start()
    rng = np.random.default_rng(7)
    buf = bytearray(256 << 10)  # one read buffer, reused for every frame as the block pipeline does
    sent = []
    got: queue.Queue = queue.Queue()

    def consume() -> None:
        for _ in range(61):
            got.put(order.get())

    threading.Thread(target=consume, daemon=True).start()
    for i in range(60):
        ev = _frame(buf, i * len(buf), rng)
        sent.append((ev.offset, bytes(buf), ev.digests.copy()))
        stripes.send(ev)
        if i == 30:
            stripes.send(F.ZeroRange(1 << 40, 4096))  # a frame of the session's own connection
    stripes.flush()
    frames = [got.get(timeout=30) for _ in range(61)]
    assert not [f for f in frames if isinstance(f, BaseException)]
    assert isinstance(frames[31], F.ZeroRange)
    data = [f for f in frames if isinstance(f, F.BlockData)]
    assert [f.offset for f in data] == [off for off, _, _ in sent]  # one order, as sent
    for f, (_, raw, digests) in zip(data, sent):
        assert bytes(f.payload) == raw, f"frame at {f.offset} was overwritten before it was written"
    assert {lane.chan.wire_sent > 0 for lane in stripes._lanes} == {True}  # every connection carried frames
    stripes.close()


def test_frames_read_ahead_of_their_turn_wait_and_never_hold_up_the_one_in_turn():
    order = FrameOrder(depth=2, hold=1000)
    big = F.Scanned(0)
    assert order.put_seq(2, big) and order.put_seq(3, big)  # 64 bytes each: room
    late = threading.Thread(target=order.put_seq, args=(50, F.Scanned(50)))
    order._held_bytes = 1000  # the hold is full: a later frame waits ...
    late.start()
    late.join(0.3)
    assert late.is_alive()
    assert order.put_seq(0, F.Scanned(0))  # ... the frame in turn does not
    order._held_bytes -= 1000
    assert order.put_seq(1, F.Scanned(1))
    assert [order.get().offset for _ in range(4)] == [0, 1, 0, 0]
    late.join(2)
    assert not late.is_alive()  # the hold has room again


def test_a_frame_numbered_twice_or_without_a_number_is_a_protocol_error():
    order = FrameOrder(depth=4)
    order.put_seq(0, F.Scanned(0))
    with pytest.raises(RemoteProtocolError, match="twice"):
        order.put_seq(0, F.Scanned(0))
    order.put_seq(5, F.Scanned(5))
    with pytest.raises(RemoteProtocolError, match="twice"):
        order.put_seq(5, F.Scanned(5))
    with pytest.raises(RemoteProtocolError, match="without SEQ"):
        order.put(F.Scanned(9))


def test_a_closed_order_lets_its_readers_go():
    order = FrameOrder(depth=1)
    order.put(F.Scanned(0))
    waiting = threading.Thread(target=order.put, args=(F.Scanned(1),))
    waiting.start()
    order.close()
    waiting.join(2)
    assert not waiting.is_alive()


def test_an_idle_extra_connection_sends_keepalives_outside_the_order(monkeypatch):
    from smsrepl.transport import stripes as S

    monkeypatch.setattr(S, "STREAM_KEEPALIVE", 0.1)
    main, extra = _pair(True), _pair(False)
    stripes = Stripes(main[0], [extra[0]])
    for _, rx in (main, extra):
        rx.sock.raw.settimeout(10)
    got = extra[1].recv()  # nothing was sent: the idle connection's keepalive
    assert isinstance(got, F.Ping)
    stripes.send(F.Ping(1, 0))  # not a data frame: the session's own connection, numbered
    assert isinstance(main[1].recv(), F.Seq) and isinstance(main[1].recv(), F.Ping)
    stripes.close()


def test_an_extra_connection_keeps_alive_while_the_session_s_own_connection_is_busy(monkeypatch):
    # frames of the session's own connection wake every writer: an idle extra connection still
    # sends its keepalive in time (the receiver drops a connection silent for its idle timeout)
    from smsrepl.transport import stripes as S

    monkeypatch.setattr(S, "STREAM_KEEPALIVE", 0.5)
    main, extra = _pair(True), _pair(False)
    stripes = Stripes(main[0], [extra[0]])
    extra[1].sock.raw.settimeout(10)

    def drain() -> None:
        try:
            while not isinstance(main[1].recv(), ConnectionClosed):
                pass
        except Exception:  # noqa: BLE001 - the test's end closes it
            pass

    threading.Thread(target=drain, daemon=True).start()
    got: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: got.put(extra[1].recv()), daemon=True).start()
    try:
        for i in range(30):  # a non-data frame every 0.1 s for 3 s, none for the extra connection
            stripes.send(F.Ping(i, 0))
            try:
                ping = got.get(timeout=0.1)
                break
            except queue.Empty:
                continue
        else:
            pytest.fail("the idle extra connection sent no keepalive in 3 s (its limit is 0.5 s)")
        assert isinstance(ping, F.Ping)
    finally:
        stripes.close()


@pytest.mark.parametrize("waits_for", ["the loop", "the hold"])
def test_a_frame_numbered_twice_is_refused_even_when_both_copies_waited(waits_for):
    # two connections of a (hostile) sender carry the same SEQ, and both readers wait: one for
    # room in the loop's queue, or both for room in the hold. The second is a protocol error,
    # never a frame kept (or swapped in) silently, and nothing stays counted in the hold.
    order = FrameOrder(depth=1, hold=1000)
    order.put_seq(0, F.Scanned(0))  # the loop's queue is full
    seq = 1 if waits_for == "the loop" else 5
    if waits_for == "the hold":
        order._held_bytes = 1000
    results: queue.Queue = queue.Queue()

    def put(frame: F.Event) -> None:
        try:
            results.put(order.put_seq(seq, frame))
        except RemoteProtocolError as exc:
            results.put(exc)

    readers = [threading.Thread(target=put, args=(F.Scanned(i),), daemon=True) for i in (4096, 8192)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(0.3)
        assert t.is_alive()
    if waits_for == "the hold":
        with order._cond:  # the hold has room again
            order._held_bytes = 0
            order._cond.notify_all()
    else:
        assert order.get().offset == 0
    for t in readers:
        t.join(5)
    outcome = [results.get(timeout=1), results.get(timeout=1)]
    assert sorted(type(r).__name__ for r in outcome) == ["RemoteProtocolError", "bool"]
    if waits_for == "the hold":
        assert list(order._held) == [5] and order._held_bytes == frame_size(F.Scanned(0)) + HELD_COST
    else:
        assert order.get().offset in (4096, 8192)
        assert not order._held and order._held_bytes == 0


def test_close_lets_no_writer_hang_on_a_peer_that_stopped_reading():
    # a sender that fails mid-round (a source read error) closes its connections while their
    # writers are blocked on a receiver that reads nothing: close() returns in bounded time and
    # the writers end with it, rather than blocking on their sockets after they were closed
    import time

    pairs = [_pair(True), _pair(False), _pair(False)]
    for tx, _ in pairs:
        tx.sock.raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    stripes = Stripes(pairs[0][0], [tx for tx, _ in pairs[1:]])
    frame = F.BlockData(0, 4 << 20, 0, np.ones(1024, dtype="<u8"), bytes(4 << 20))

    def fill() -> None:
        try:
            for _ in range(12):
                stripes.send(frame)
        except Exception:  # noqa: BLE001 - closed meanwhile
            pass

    threading.Thread(target=fill, daemon=True).start()
    writers = [lane.thread for lane in stripes._lanes]
    time.sleep(1.0)  # every writer is blocked now, in the middle of a frame
    t0 = time.monotonic()
    stripes.close()
    took = time.monotonic() - t0
    for t in writers:
        t.join(5)
    assert not [t for t in writers if t.is_alive()], "a writer is still blocked on its closed connection"
    assert took < 10, f"close() took {took:.1f} s"


def test_the_hold_bounds_the_memory_of_small_frames_read_ahead_too():
    # a (hostile) sender that never sends the frame in turn and many small ones after it: what
    # the receiver holds stays about the hold, not a multiple of it (a small frame is not 64 bytes
    # held: its event, its entry and its number are more)
    import tracemalloc

    hold = 2 << 20
    order = FrameOrder(depth=4, hold=hold)
    filled = threading.Event()

    def read_ahead() -> None:
        for i in range(1, 1 << 20):
            if order._held_bytes >= hold:
                filled.set()
            if not order.put_seq(i, F.Scanned(i * 4096)):
                return

    tracemalloc.start()
    try:
        reader = threading.Thread(target=read_ahead, daemon=True)
        reader.start()
        assert filled.wait(60)
        reader.join(0.5)
        assert reader.is_alive()  # held up by the full hold
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        order.close()
    assert held < 1.5 * hold, f"{held / hold:.1f} times the hold"


def test_a_connection_that_joins_while_the_speed_limit_is_set_gets_it_too():
    # the speed limit (and the over-speed guard) are set when the round begins, while extra
    # connections may be joining on another thread: one that read the session's limiter just
    # before it was set must not run unlimited
    class _Main(Channel):
        hook = None

        @property
        def limiter(self):
            value = self.__dict__.get("_lim")
            if _Main.hook is not None:  # the other thread runs right after the read
                hook, _Main.hook = _Main.hook, None
                hook()
            return value

        @limiter.setter
        def limiter(self, value):
            self.__dict__["_lim"] = value

    a, b = socket.socketpair()
    main = _Main(_Plain(a), Connection(SENDER))
    main.conn.state = State.ROUND
    extra, extra_rx = _pair(False)
    stripes = Stripes(main, [])
    limit = object()
    setter = threading.Thread(target=setattr, args=(stripes, "limiter", limit), daemon=True)

    def set_limit_meanwhile() -> None:
        setter.start()
        setter.join(0.5)  # done by now, unless it waits for the joining connection

    _Main.hook = set_limit_meanwhile
    stripes.add(extra)
    setter.join(5)
    try:
        assert [lane.chan.limiter is limit for lane in stripes._lanes] == [True, True]
    finally:
        stripes.close()
        for s in (b, extra_rx.sock.raw):
            s.close()


def test_the_session_s_own_connection_carries_a_frame_at_least_every_keepalive(monkeypatch):
    # the session's own connection takes no keepalive outside the order (its frames are all
    # numbered): a sender that sends a data frame every few seconds, spread over 8 connections,
    # must not leave it silent for 8 times as long (the receiver drops a connection silent for
    # its idle timeout, 120 s: one SCANNED per 64 MiB of a slowly read source, or a file round's
    # operations found every 15 s, did so over 8 or 16 connections)
    import time

    from smsrepl.transport import stripes as S

    monkeypatch.setattr(S, "STREAM_KEEPALIVE", 0.5)
    pairs = [_pair(True)] + [_pair(False) for _ in range(7)]
    stripes = Stripes(pairs[0][0], [tx for tx, _ in pairs[1:]])
    arrivals: list[float] = []

    def read_main() -> None:
        try:
            while True:
                ev = pairs[0][1].recv()
                if isinstance(ev, ConnectionClosed):
                    return
                if isinstance(ev, F.Scanned):
                    arrivals.append(time.monotonic())
        except Exception:  # noqa: BLE001 - closed at the test's end
            pass

    def drain(rx) -> None:
        try:
            while not isinstance(rx.recv(), ConnectionClosed):
                pass
        except Exception:  # noqa: BLE001
            pass

    threading.Thread(target=read_main, daemon=True).start()
    for _, rx in pairs[1:]:
        threading.Thread(target=drain, args=(rx,), daemon=True).start()
    start = time.monotonic()
    try:
        for i in range(25):  # a data frame every 0.2 s for 5 s
            stripes.send(F.Scanned(i * 4096))
            time.sleep(0.2)
        end = time.monotonic()
    finally:
        stripes.close()
    times = [start] + arrivals + [end]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) < 1.2, f"the session's own connection was silent for {max(gaps):.1f} s (limit 0.5 s)"


def test_a_session_whose_streams_request_fails_leaves_no_writer_behind():
    # the connection breaks as the sender asks for more: the session fails (resumably), and
    # what its run() closes is every connection of it, the stripes' writer included
    from smsrepl.errors import TransportError
    from smsrepl.transport.sender_base import SenderBase

    tx, rx = _pair(True)
    tx.conn.state = State.IDLE
    rx.sock.raw.close()  # the receiver is gone
    sender = SenderBase("disk0", ("127.0.0.1", 1), None, speed_limit=None, cpu_cap=None, streams=3)
    sender._chan = tx
    sender._planned = 3  # what _prejoin counted (its early connections are not this test's)
    before = {t for t in threading.enumerate() if t.name.startswith("smsrepl-stream")}
    with pytest.raises(TransportError):
        sender._spread(tx, "s1", 1 << 20, frozenset({"streams"}))
    (sender._chan or tx).close()  # what Sender.run and FileSender.run do at the end
    left = [t for t in threading.enumerate() if t.name.startswith("smsrepl-stream") and t not in before]
    for t in left:
        t.join(5)
    assert not [t for t in left if t.is_alive()], "a writer of the failed session's stripes runs on"


def test_the_over_speed_guard_stops_a_session_over_several_connections_with_its_own_error():
    # the guard runs as each frame was written, on the connection's writer: its error is the
    # session's (exit code 3, no SMS.0807 "connection lost" code for the control plane)
    from smsrepl.errors import OverSpeedError

    pairs = [_pair(True), _pair(False)]
    stripes = Stripes(pairs[0][0], [pairs[1][0]])

    def guard(size: int) -> None:
        raise OverSpeedError(3e6, 1e6, 50, 5.0)

    stripes.on_sent = guard
    def drain(rx) -> None:
        try:
            while not isinstance(rx.recv(), ConnectionClosed):
                pass
        except Exception:  # noqa: BLE001 - cut when the session fails
            pass

    for _, rx in pairs:
        threading.Thread(target=drain, args=(rx,), daemon=True).start()
    try:
        with pytest.raises(OverSpeedError, match="over speed"):
            for i in range(100):
                stripes.send(F.Scanned(i * 4096))
                stripes.flush(10)
    finally:
        stripes.close()


def test_what_a_reader_hands_over_after_the_loop_is_gone_is_dropped():
    # a reader whose recv() fails once its session ended (the receiver ended it) hands its error
    # over: kept by a closed order, the error's traceback (the reader's frame: the session, its
    # channel and their 1 MiB buffers) and the order would hold each other until a full gc
    import gc
    import weakref

    order = FrameOrder(depth=2)
    order.close()

    def reader(frames: FrameOrder) -> None:
        try:
            raise OSError("connection reset")
        except OSError as exc:
            frames.put_nowait(exc)

    reader(order)
    gone = weakref.ref(order)
    gc.disable()
    try:
        del order
        assert gone() is None
    finally:
        gc.enable()


def test_a_connection_joining_as_the_session_closes_is_closed_with_it(monkeypatch):
    """close() while the join thread adds a connection (the session ends as it joins): the
    new connection's writer is started before close() can see it, and both end."""
    adding = threading.Event()

    def slow_start(self, lane):  # Stripes._start on a busy host: the thread made, not yet started
        adding.set()
        lane.thread = threading.Thread(target=self._write, args=(lane,), daemon=True)
        time.sleep(0.3)
        lane.thread.start()

    main_tx, main_rx = _pair(True)
    extra_tx, extra_rx = _pair(False)
    stripes = Stripes(main_tx, [])
    monkeypatch.setattr(Stripes, "_start", slow_start)
    joiner = threading.Thread(target=stripes.add, args=(extra_tx,))
    joiner.start()
    assert adding.wait(5)
    stripes.close()  # raised "cannot join thread before it is started"
    joiner.join(5)
    assert not joiner.is_alive()
    for chan in (main_rx, extra_rx):
        chan.close()


def test_a_send_waiting_for_room_takes_a_connection_that_joins_meanwhile(monkeypatch):
    # at the start of a copy the session's own connection is full before the extra ones have
    # joined: the data frame waiting for room must go as soon as one joins, not wait until the
    # busy connection finishes its frame (measured: a third of a second on a 50 ms link)
    from smsrepl.transport import stripes as stripes_mod

    monkeypatch.setattr(stripes_mod, "ROOM_WAIT", 60.0)
    monkeypatch.setattr(stripes_mod, "LANE_BYTES", 1 << 20)
    main, main_rx = _pair(True)
    main.sock.raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    stripes = Stripes(main, [])
    frame = F.BlockData(0, 4 << 20, 0, np.ones(1024, dtype="<u8"), bytes(4 << 20))
    stripes.send(frame)  # main's writer blocks in it: its peer reads nothing yet
    sent = threading.Event()

    def send_second() -> None:
        stripes.send(F.BlockData(4 << 20, 4 << 20, 0, np.ones(1024, dtype="<u8"), bytes(4 << 20)))
        sent.set()

    threading.Thread(target=send_second, daemon=True).start()
    time.sleep(0.3)
    assert not sent.is_set(), "the second frame should wait: the only connection is full"
    extra, extra_rx = _pair(False)
    order = FrameOrder(depth=4)
    threading.Thread(target=_read, args=(extra_rx, order), daemon=True).start()
    stripes.add(extra)
    try:
        assert sent.wait(10), "the waiting frame did not take the connection that joined"
        assert stripes._lanes[1].queued or stripes._lanes[1].chan.wire_sent
    finally:
        threading.Thread(target=_read, args=(main_rx, order), daemon=True).start()
        stripes.close()
        for s in (main_rx.sock.raw, extra_rx.sock.raw):
            s.close()
