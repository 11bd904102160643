"""Hostile peers scripted at the protocol level, against a real receiver and a real sender.

Each case checks three things: a clear error (or a dropped connection with a logged
reason), bounded time and threads, and that nothing was written outside the target
(the receiver's directory holds only what it held before).
"""
import logging
import os
import socket
import ssl
import struct
import threading
import time

import numpy as np
import pytest

from smsrepl import kernels
from smsrepl.errors import ConfigError, RemoteProtocolError
from smsrepl.protocol import RECEIVER, SENDER, Connection
from smsrepl.protocol import frames as F
from smsrepl.protocol.writers import frame as _frame
from smsrepl.lab.testdata import write_image
from smsrepl.transport.channel import Channel
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.connect import connect
from smsrepl.transport.sender import Sender
from smsrepl.transport.tls import client_context, server_context
from smsrepl.transport.limits import EVICT_AFTER
from smsrepl.transport.tlsio import TLSStream

from integration.procs import wait_until

reliability = pytest.mark.reliability


@pytest.fixture
def rx(tmp_path, bundle):
    """A receiver with short limits: 2 s to say HELLO, 2 s per frame, 8 connections, 4 before HELLO,
    16 waiting at the door without having said anything."""
    root = tmp_path / "rx"
    root.mkdir()
    dst = root / "target.img"
    receiver = Receiver({"disk0": str(dst)}, server_context(bundle), str(root / "state"), idle_timeout=2,
                        handshake_timeout=2, max_connections=8, max_unauthenticated=4, max_waiting=16, create=True)
    host, port = receiver.start()
    before = set(os.listdir(root))
    yield receiver, (host, port), dst
    receiver.stop()
    assert set(os.listdir(root)) <= before | {"target.img"}, "the receiver wrote outside its target"
    assert not dst.exists() or not any(dst.read_bytes()), "a hostile peer got data into the target"


@pytest.mark.parametrize("limit, value, named", [
    ("idle_timeout", 0, "idle timeout"), ("idle_timeout", -1, "idle timeout"),
    ("idle_timeout", float("nan"), "idle timeout"), ("idle_timeout", "120", "idle timeout"),
    ("handshake_timeout", 0, "handshake timeout"), ("handshake_timeout", float("inf"), "handshake timeout"),
    ("max_connections", 0, "connection limit"), ("max_connections", 2.5, "connection limit"),
    ("max_unauthenticated", -3, "unauthenticated connection limit"),
    ("max_unauthenticated", True, "unauthenticated connection limit"),
    ("max_waiting", 0, "waiting connection limit"), ("max_waiting", 1.5, "waiting connection limit"),
    ("checkpoint_seconds", 0, "checkpoint interval"), ("checkpoint_seconds", 61, "checkpoint interval"),
])
def test_receiver_limits_out_of_range_are_refused_before_any_state_exists(tmp_path, bundle, limit, value, named):
    state = tmp_path / "state"
    with pytest.raises(ConfigError, match=named) as exc:
        Receiver({"disk0": str(tmp_path / "t.img")}, server_context(bundle), str(state), **{limit: value}, create=True)
    assert str(value) in str(exc.value)
    assert not state.exists()


def _session(addr, bundle, *, target="disk0", size=1 << 20, session="hostile"):
    chan = Channel(connect(addr, client_context(bundle)), Connection(SENDER))
    chan.send(F.Hello([F.PROTOCOL_VERSION], "block", target, session, size, 4096, []))
    return chan, chan.recv()


def _closed_within(sock, seconds: float) -> float:
    """Seconds until the peer closed ``sock`` (raw socket); fails after ``seconds``."""
    t0 = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except socket.timeout:
        pytest.fail(f"the receiver kept a hostile connection open for {seconds} s")
    return time.monotonic() - t0


def _block(data: bytes) -> np.ndarray:
    d = np.empty(len(data) // 4096, dtype="<u8")
    kernels.block_digests(data, 4096, d)
    return d


@reliability("hostile peer", "sender trickles its TLS handshake one byte at a time")
def test_a_handshake_trickled_byte_by_byte_is_dropped_at_the_deadline(rx, bundle, caplog):
    receiver, addr, _ = rx
    # a real ClientHello, sent one byte a second: each byte resets a per-read timeout,
    # so only a deadline on the whole handshake ends it
    obj = client_context(bundle).wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO())
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = out.read()
    sock = socket.create_connection(addr)
    stop = threading.Event()

    def trickle():
        for b in hello:
            if stop.wait(1.0):
                return
            try:
                sock.send(bytes([b]))
            except OSError:
                return

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    with caplog.at_level(logging.WARNING, logger="smsrepl.receiver"):
        took = _closed_within(sock, 6)
    stop.set()
    sock.close()
    assert 1.5 < took < 5.5, took  # without the deadline the trickle would go on for minutes
    assert "no HELLO within 2 s" in caplog.text


@reliability("hostile peer", "sender trickles a data frame one byte at a time")
def test_a_frame_trickled_byte_by_byte_is_dropped(rx, bundle, caplog):
    _, addr, dst = rx
    chan, ev = _session(addr, bundle)
    assert isinstance(ev, F.Welcome)
    chan.send(F.RoundBegin(1, "full", 0))
    data = os.urandom(8192)
    parts = chan.conn.send(F.BlockData(0, len(data), 0, _block(data), data))
    wire = b"".join(bytes(p) for p in parts)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="smsrepl.receiver"):
        with pytest.raises(OSError):
            for i in range(len(wire)):
                chan.sock.sendall(wire[i:i + 1])  # one TLS record per byte
                time.sleep(0.05)
        took = time.monotonic() - t0
    chan.close()
    # 2 s without a complete frame, plus the watchdog's tick (room for a loaded machine: the
    # trickle would otherwise go on for 400 s)
    assert took < 10, took
    assert "completed no frame and sent less than 64 KiB in 2 s" in caplog.text


@reliability("hostile peer", "many idle authenticated connections")
def test_idle_network_checks_are_capped_and_keep_no_data_session_out(rx, bundle):
    from smsrepl.transport.limits import MAX_NETCHECKS

    receiver, addr, _ = rx
    threads0 = threading.active_count()
    chans, welcomed, busy = [], 0, 0
    for i in range(MAX_NETCHECKS + 12):
        try:
            chan = Channel(connect(addr, client_context(bundle)), Connection(SENDER))
            chan.send(F.Hello([F.PROTOCOL_VERSION], "netcheck", "", f"idle-{i}", 0, 4096, []))
            ev = chan.recv()
        except Exception:  # noqa: BLE001 - shed at the door: refused before or during TLS
            continue
        if isinstance(ev, F.Welcome):
            welcomed += 1
            chans.append(chan)
        else:  # busy: for now, not for good
            assert isinstance(ev, F.Error) and ev.exit_code == 3 and "network checks" in ev.message, ev
            busy += 1
            chan.close()
    assert welcomed == MAX_NETCHECKS and busy >= 12, (welcomed, busy)
    # the checks idling in their own pool keep no data session out
    chan, ev = _session(addr, bundle, session="while-idle")
    chan.close()
    assert isinstance(ev, F.Welcome)
    assert threading.active_count() <= threads0 + MAX_NETCHECKS + 6  # one thread per served connection
    # idle past the frame deadline: all of them are dropped
    wait_until(lambda: not receiver.connections()[0], timeout=6)
    assert receiver.connections() == (0, 0)
    for chan in chans:
        chan.close()


@reliability("hostile peer", "connection flood (500 TCP connections)")
def test_a_connection_flood_is_shed_and_the_receiver_still_serves(rx, bundle):
    receiver, addr, _ = rx
    threads0 = threading.active_count()
    socks, peak = [], 0
    for _ in range(500):
        try:
            socks.append(socket.create_connection(addr, timeout=2))
        except OSError:
            pass
        peak = max(peak, threading.active_count())
    # connections that say nothing wait at the door without a thread: 16 of them, the rest closed
    assert peak <= threads0 + 2, peak
    assert len(socks) >= 300  # the flood happened (a connect the kernel's backlog dropped is not counted)
    wait_until(lambda: receiver.shed >= len(socks) - 16, timeout=5)  # the accept loop catches up
    assert receiver.shed >= len(socks) - 16 - 64, (receiver.shed, len(socks))  # 64: the listen backlog
    assert receiver.connections()[1] <= 16
    for s in socks:
        s.close()
    wait_until(lambda: not receiver.connections()[0], timeout=5)
    assert threading.active_count() <= threads0 + 1
    time.sleep(0.2)  # the flood spent this address's connection rate: it refills at 20 a second
    chan, ev = _session(addr, bundle, session="after-flood")
    chan.close()
    assert isinstance(ev, F.Welcome)


@reliability("hostile peer", "idle connections holding every place at the door")
def test_idle_connections_at_the_door_cannot_keep_a_real_sender_out(rx, bundle):
    receiver, addr, _ = rx
    squatters = [socket.create_connection(addr) for _ in range(4)]
    for s in squatters:
        s.sendall(b"\x16")  # they spoke (a TLS record begins) and say no more: all 4 places before HELLO
    time.sleep(0.2)
    assert receiver.connections() == (4, 4)
    assert receiver.admission.counts() == (4, 4)  # admitted, not waiting at the door
    t0 = time.monotonic()
    chan, ev = _session(addr, bundle, session="past-the-squatters")  # the oldest goes once EVICT_AFTER old
    chan.close()
    assert time.monotonic() - t0 < EVICT_AFTER + 1.5
    for s in squatters:
        s.close()
    assert isinstance(ev, F.Welcome), ev


@reliability("hostile peer", "slow but steady link (a frame takes longer than the idle limit)")
def test_a_slow_but_steady_frame_is_not_dropped(rx, bundle):
    _, addr, dst = rx
    chan, ev = _session(addr, bundle, session="slow-link")
    chan.send(F.RoundBegin(1, "full", 0))
    data = os.urandom(1 << 20)
    wire = _wire(F.BlockData(0, len(data), 0, _block(data), data))
    t0 = time.monotonic()
    for i in range(0, len(wire), 32 << 10):  # ~200 KiB/s: the frame takes ~5 s, the limit is 2 s
        chan.sock.sendall(wire[i:i + (32 << 10)])
        time.sleep(0.15)
    assert time.monotonic() - t0 > 4
    chan.send(F.RoundEnd(1))
    ev = chan.recv()
    while isinstance(ev, F.Checkpoint):
        ev = chan.recv()
    chan.close()
    assert isinstance(ev, F.RoundDone), ev
    dst.write_bytes(b"")  # the fixture checks the target holds nothing from hostile peers; this one was not


def _wire(event) -> bytes:
    """A frame as the encoder makes it, past any state machine."""
    return b"".join(bytes(p) for p in F.encode(event))


def _body(event) -> bytes:
    return _wire(event)[F.HEADER_SIZE:]


@reliability("hostile peer", "frame length that lies (huge declared size)")
def test_a_huge_declared_frame_length_is_refused_before_buffering(rx, bundle):
    _, addr, _ = rx
    chan, ev = _session(addr, bundle)
    t0 = time.monotonic()
    chan.sock.sendall(struct.pack(">IB", 0xFFFFFFF0, F.BlockData.TYPE) + b"\0" * 64)
    ev = chan.recv()
    chan.close()
    assert isinstance(ev, F.Error) and ev.code == "SMS.1908", ev
    # the code says it was refused for its length (a receiver waiting for the body would drop
    # it at the 2 s idle deadline, without SMS.1908); the bound leaves room for a loaded machine
    assert "frame" in ev.message and time.monotonic() - t0 < 5


@reliability("hostile peer", "frame length that lies (body shorter than its fields)")
@pytest.mark.parametrize("cut", [1, 7, 40])
def test_a_body_shorter_than_its_fields_is_refused(rx, bundle, cut):
    _, addr, _ = rx
    chan, _ = _session(addr, bundle)
    chan.send(F.RoundBegin(1, "full", 0))
    data = os.urandom(4096)
    body = _body(F.BlockData(0, 4096, 0, _block(data), data))
    chan.sock.sendall(_frame(F.BlockData.TYPE, body[:cut]))  # a valid header and check
    ev = chan.recv()
    chan.close()
    assert isinstance(ev, F.Error) and ev.code == "SMS.1908", ev


@reliability("hostile peer", "huge declared sizes (source, manifest request, block length)")
def test_huge_declared_sizes_are_refused(rx, bundle):
    _, addr, dst = rx
    chan, ev = _session(addr, bundle, size=1 << 62, session="huge-source")
    chan.close()
    # an image target that does not exist yet is created at the source's size: here it cannot be
    assert isinstance(ev, F.Error) and ev.code == "SMS.2007" and str(1 << 62) in ev.message, ev
    with open(dst, "wb") as fh:
        fh.truncate(1 << 20)
    chan, ev = _session(addr, bundle, size=2 << 20, session="larger-source")
    chan.close()
    assert isinstance(ev, F.Error) and ev.code == "SMS.1504", ev
    chan, ev = _session(addr, bundle, session="huge-request")
    assert isinstance(ev, F.Welcome)
    chan.send(F.ManifestRequest("fine", 0, 1 << 40))
    ev = chan.recv()
    chan.close()
    assert isinstance(ev, F.Error), ev
    chan, ev = _session(addr, bundle, session="huge-block")
    chan.send(F.RoundBegin(1, "full", 0))
    body = bytearray(_body(F.BlockData(0, 4096, 0, _block(b"\1" * 4096), b"\1" * 4096)))
    struct.pack_into(">I", body, 8, 1 << 31)  # raw length far past the frame limit
    chan.sock.sendall(_frame(F.BlockData.TYPE, bytes(body)))
    ev = chan.recv()
    chan.close()
    assert isinstance(ev, F.Error) and ev.code == "SMS.1908", ev


@reliability("hostile peer", "frames out of order")
@pytest.mark.parametrize("script", ["end-before-begin", "data-goes-backwards", "receiver-only-frame", "second-hello"])
def test_frames_out_of_order_are_refused_without_writing(rx, bundle, script):
    _, addr, dst = rx
    chan, ev = _session(addr, bundle, session=f"order-{script}")
    assert isinstance(ev, F.Welcome)
    data = os.urandom(8192)
    if script == "end-before-begin":
        chan.sock.sendall(_wire(F.RoundEnd(1)))
    elif script == "data-goes-backwards":
        chan.send(F.RoundBegin(1, "full", 0))
        zero = bytes(4096)  # valid, so it is applied: zeros keep the target's check simple
        chan.send(F.BlockData(65536, 4096, 0, _block(zero), zero))
        chan.sock.sendall(_wire(F.BlockData(0, 4096, 0, _block(data[4096:]), data[4096:])))  # backwards
    elif script == "receiver-only-frame":
        chan.send(F.RoundBegin(1, "full", 0))
        chan.sock.sendall(_wire(F.Checkpoint(1, 4096, 4096)))
    else:
        chan.sock.sendall(_wire(F.Hello([F.PROTOCOL_VERSION], "block", "disk0", "x", 1 << 20, 4096, [])))
    ev = chan.recv()
    chan.close()
    assert isinstance(ev, F.Error) and ev.code == "SMS.1908", ev


# --- a hostile receiver against a real sender ----------------------------------------------

class ScriptedReceiver:
    """A TLS server that speaks the protocol's receiver side as ``script(chan, hello)`` says."""

    def __init__(self, bundle, script) -> None:
        self.ctx = server_context(bundle)
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        raw, _ = self.listener.accept()
        raw.settimeout(10)
        stream = TLSStream(raw, self.ctx, server_side=True)
        chan = Channel(stream, Connection(RECEIVER))
        try:
            stream.handshake()
            hello = chan.recv()
            self.script(chan, hello)
        except Exception as exc:  # noqa: BLE001 - the sender's view is what the test checks
            self.error = exc
        finally:
            chan.close()
            self.listener.close()


def _welcome(hello, **over):
    fields = dict(version=1, session_id=hello.session_id, target_size=hello.source_size, state="new", round_id=0,
                  round_kind="full", checkpoint=0, manifest_root="", capabilities=["block-set", "frame-8m"])
    fields.update(over)
    return F.Welcome(**fields)


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source.img"
    write_image(str(path), 32 << 20, seed=3, mix={"text": 0.5, "random": 0.5})
    return str(path)


@reliability("hostile peer", "receiver acknowledges data it never received")
def test_a_receiver_acknowledging_what_it_never_got_is_a_protocol_error(tmp_path, bundle, source):
    def script(chan, hello):
        chan.send(_welcome(hello))
        begin = chan.recv()
        chan.send(F.Checkpoint(begin.round_id, hello.source_size, hello.source_size))  # before any data
        while not isinstance(chan.recv(), F.RoundEnd):
            pass

    peer = ScriptedReceiver(bundle, script)
    sender = Sender(source, "disk0", peer.address, client_context(bundle), str(tmp_path / "tx"))
    t0 = time.monotonic()
    with pytest.raises(RemoteProtocolError, match="never got"):
        sender.run()
    assert time.monotonic() - t0 < 10


@reliability("hostile peer", "receiver offers to resume past the end of the source")
@pytest.mark.parametrize("checkpoint", [(32 << 20) + 4096, 12345])
def test_a_resume_offer_outside_the_source_is_refused(tmp_path, bundle, source, checkpoint):
    def script(chan, hello):
        chan.send(_welcome(hello, state="partial", round_id=1, checkpoint=checkpoint))
        chan.recv()

    peer = ScriptedReceiver(bundle, script)
    sender = Sender(source, "disk0", peer.address, client_context(bundle), str(tmp_path / "tx"))
    with pytest.raises(RemoteProtocolError, match="resume at"):
        sender.run()


@reliability("hostile peer", "receiver sends a huge frame length to the sender")
def test_a_receiver_declaring_a_huge_frame_is_refused_quickly(tmp_path, bundle, source):
    def script(chan, hello):
        chan.sock.sendall(struct.pack(">IB", 0xFFFFFF00, F.Welcome.TYPE) + b"{" * 32)
        time.sleep(15)  # far longer than the bound below: only refusing the frame ends it in time

    peer = ScriptedReceiver(bundle, script)
    sender = Sender(source, "disk0", peer.address, client_context(bundle), str(tmp_path / "tx"))
    t0 = time.monotonic()
    with pytest.raises(Exception) as exc:  # noqa: PT011 - the type is checked below
        sender.run()
    assert "frame" in str(exc.value).lower() and time.monotonic() - t0 < 8


@reliability("hostile peer", "a flood of plaintext probes: warnings with counts, not a line each")
def test_a_flood_of_plaintext_probes_is_said_in_a_few_lines(bundle, caplog, tmp_path):
    dst = tmp_path / "target.img"
    receiver = Receiver({"disk0": str(dst)}, server_context(bundle), str(tmp_path / "state"), handshake_timeout=2,
                        max_connections=8, max_unauthenticated=4, create=True)
    addr = receiver.start()
    with caplog.at_level(logging.WARNING, logger="smsrepl.receiver"):
        for _ in range(200):
            s = socket.create_connection(addr)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            s.settimeout(5)
            try:
                s.recv(100)  # the receiver answers the stranger, or closes on it
            except OSError:
                pass
            s.close()
        assert wait_until(lambda: receiver.connections()[0] == 0, 10)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert 1 <= len(lines) <= 3, lines
    assert "TLS" in lines[0] or "SMS.0304" in lines[0], lines
    # a real sender still gets through afterwards, once this address's connection rate refilled
    time.sleep(0.2)
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(1 << 20))
    try:
        Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx")).run()
    finally:
        receiver.stop()
    assert dst.read_bytes() == src.read_bytes()


def test_limited_warnings_say_how_many_were_held_back(caplog):
    from smsrepl.transport.loglimit import LimitedWarnings

    now = [100.0]
    w = LimitedWarnings(logging.getLogger("smsrepl.test"), every=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="smsrepl.test"):
        assert w.warning("a", "first %s", 1)
        assert not w.warning("a", "again %s", 2) and not w.warning("a", "again %s", 3)
        assert w.warning("b", "another kind")  # kinds are counted apart
        now[0] += 10.5
        assert w.warning("a", "later %s", 4)
    assert [r.getMessage() for r in caplog.records] == [
        "first 1", "another kind", "later 4 (and 2 more like it in the last 10 s)"]


@reliability("hostile peer", "a connection that says nothing: closed at the deadline, no thread meanwhile")
def test_a_silent_connection_waits_without_a_thread_and_is_closed_at_the_deadline(rx):
    receiver, addr, _ = rx
    s = socket.create_connection(addr)
    s.settimeout(10)
    t0 = time.monotonic()
    time.sleep(0.3)
    # it is open, and no thread serves it (the served ones are the receiver's admitted connections)
    assert receiver.connections() == (1, 1) and not receiver.admission.conns
    assert s.recv(1) == b""  # closed by the receiver ...
    took = time.monotonic() - t0
    s.close()
    assert 1.5 < took < 9, took  # ... at its 2 s deadline (not at the socket's 10 s timeout)
    assert receiver.shed == 1 and receiver.connections() == (0, 0)


def _speak(addr) -> socket.socket:
    """A connection that starts a TLS ClientHello and then stalls (a handshake it begins)."""
    s = socket.create_connection(addr)
    s.sendall(b"\x16\x03\x01\x02\x00")
    return s


@reliability("hostile peer", "one address opening connections faster than its rate: closed before TLS")
def test_handshakes_past_an_addresss_rate_are_closed_before_they_start(tmp_path, bundle):
    from smsrepl.transport.limits import CONNECT_BURST

    receiver = Receiver({"disk0": str(tmp_path / "t.img")}, server_context(bundle), str(tmp_path / "state"),
                        connect_rate=0.01, handshake_timeout=30, max_unauthenticated=CONNECT_BURST + 8, create=True)
    addr = receiver.start()
    try:
        socks = [_speak(addr) for _ in range(CONNECT_BURST)]  # the burst: all get their handshake
        assert wait_until(lambda: receiver.connections()[0] == CONNECT_BURST, 5)
        late = _speak(addr)
        late.settimeout(5)
        t0 = time.monotonic()
        try:
            assert late.recv(1) == b""  # closed at once, before any TLS
        except ConnectionResetError:
            pass  # closed with its ClientHello unread
        assert time.monotonic() - t0 < 10  # not the 30 s handshake deadline
        assert wait_until(lambda: receiver.shed == 1, 5)  # counted just after the close
        late.close()
        for s in socks:
            s.close()
    finally:
        receiver.stop()


@reliability("hostile peer", "silent connections from the sender's own address, reconnecting: it gets through")
def test_silent_connections_from_a_senders_address_use_none_of_its_rate(tmp_path, bundle):
    """100 connections from the sender's address that say nothing, past the address's whole rate:
    they wait at the door, and the sender's session is served."""
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(1 << 20))
    receiver = Receiver({"disk0": str(tmp_path / "t.img")}, server_context(bundle), str(tmp_path / "state"),
                        connect_rate=0.01, handshake_timeout=30, create=True)
    addr = receiver.start()
    try:
        silent = [socket.create_connection(addr) for _ in range(100)]
        assert wait_until(lambda: receiver.connections()[0] == 100, 5)
        Sender(str(src), "disk0", addr, client_context(bundle), str(tmp_path / "tx")).run()
        assert receiver.shed == 0
        for s in silent:
            s.close()
    finally:
        receiver.stop()
    assert (tmp_path / "t.img").read_bytes() == src.read_bytes()


def test_a_connection_rate_out_of_range_is_refused(tmp_path, bundle):
    for bad in (0, -1, float("inf"), "20"):
        with pytest.raises(ConfigError, match="connection rate"):
            Receiver({"disk0": str(tmp_path / "t.img")}, server_context(bundle), str(tmp_path / "s"), connect_rate=bad, create=True)
