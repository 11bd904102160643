"""A streamed listing (ordered TREE_DATA frames): the sender's Listing gives a directory's
records as soon as they are final, waits for no more than that, and refuses a listing
that breaks the order."""
import os
import queue
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from smsrepl import kernels
from smsrepl.codec import RAW, Decompressor
from smsrepl.errors import RemoteError, RemoteProtocolError
from smsrepl.files import describe
from smsrepl.files.describe import describe_tree
from smsrepl.files.listing import Listing
from smsrepl.protocol import frames as F

native = pytest.mark.skipif(not kernels.TREE, reason="ordered listings come from the native scan")


def _tree(root):
    for d in ("a", "b", "c"):
        for s in ("x", "y"):
            os.makedirs(root / d / s)
            for k in range(3):
                (root / d / s / f"f{k}").write_bytes(b"%s/%s/%d" % (d.encode(), s.encode(), k))
    os.makedirs(root / "b" / "empty")
    return root


def _frames(root, monkeypatch):
    monkeypatch.setattr(describe, "STREAM_BATCH", 1)  # one directory per frame
    return list(describe_tree(str(root), stream=True))


def _waiter(listing, rel):
    box = []
    t = threading.Thread(target=lambda: box.append(listing.records(rel)), daemon=True)
    t.start()
    return t, box


@native
def test_each_directory_is_given_once_its_records_are_final(tmp_path, monkeypatch):
    root = _tree(tmp_path / "t")
    frames = _frames(root, monkeypatch)
    assert all(ev.ordered for ev in frames) and [ev.last for ev in frames].count(True) == 1
    # root, a, b, c, a/x, a/y, b/x, b/y, c/x, c/y (b/empty has no records), breadth first,
    # then the (empty) last
    assert len(frames) == 11 and frames[-1].raw_len == 1
    whole = Listing()
    for ev in frames:
        whole.add(ev, Decompressor())

    listing, q = Listing(), queue.Queue()
    for ev in frames[:2]:  # the root's and a's records
        q.put(ev)
    thread = listing.follow(q.get, Decompressor())
    assert listing.records(b"a") == whole.records(b"a") != b""
    later, box = _waiter(listing, b"b")
    deeper, box2 = _waiter(listing, b"a/x")
    later.join(0.3)
    deeper.join(0.01)
    assert later.is_alive() and deeper.is_alive(), "gave records that were not final yet"
    for ev in frames[2:5]:  # b, c, a/x
        q.put(ev)
    later.join(5)
    deeper.join(5)
    assert box == [whole.records(b"b")] and box2 == [whole.records(b"a/x")]
    empty, box3 = _waiter(listing, b"b/empty")  # listed nowhere: final once b/x arrives
    empty.join(0.2)
    assert empty.is_alive()
    for ev in frames[5:]:
        q.put(ev)
    empty.join(5)
    thread.join(5)
    assert box3 == [b""] and listing.done
    assert listing.entries.keys() == whole.entries.keys()
    assert sorted(listing.below(b"b")) == sorted(p for p in whole.entries if p.startswith(b"b/"))


@native
def test_a_listing_out_of_order_is_refused(tmp_path, monkeypatch):
    frames = _frames(_tree(tmp_path / "t"), monkeypatch)
    listing = Listing()
    listing.add(frames[0], Decompressor())
    listing.add(frames[2], Decompressor())  # b
    with pytest.raises(RemoteProtocolError, match="out of order"):
        listing.add(frames[1], Decompressor())  # a, after b
    again = Listing()
    again.add(frames[0], Decompressor())
    with pytest.raises(RemoteProtocolError, match="out of order"):
        again.add(frames[0], Decompressor())  # a directory twice


@native
def test_ordered_and_unordered_frames_do_not_mix(tmp_path, monkeypatch):
    frames = _frames(_tree(tmp_path / "t"), monkeypatch)
    listing = Listing()
    listing.add(frames[0], Decompressor())
    ev = frames[1]
    with pytest.raises(RemoteProtocolError, match="both ordered and not"):
        listing.add(F.TreeData(False, ev.codec, ev.raw_len, ev.payload, ordered=False), Decompressor())


def test_a_failure_while_following_reaches_the_waiting_question():
    listing = Listing()
    body = b"\0"
    listing.add(F.TreeData(False, RAW, 1, body, ordered=True), Decompressor())
    calls = []

    def next_frame():
        calls.append(1)
        raise RemoteError("receiver: target unreadable", code="SMS.2007", exit_code=5, resumable=True)

    listing.follow(next_frame, Decompressor())
    with pytest.raises(RemoteError, match="target unreadable"):
        listing.records(b"anything")
    with pytest.raises(RemoteError):
        listing.wait(whole=True)
    assert calls == [1]


def test_ordered_flag_survives_the_wire():
    ev = F.TreeData(True, RAW, 3, b"abc", ordered=True)
    parts = F.encode(ev)
    from smsrepl.protocol import RECEIVER, SENDER, Connection

    rx, tx = Connection(SENDER), Connection(RECEIVER)
    tx.state = rx.state = tx.state.__class__.IDLE
    rx.receive_data(b"".join(bytes(p) for p in parts))
    got = rx.next_event()
    assert isinstance(got, F.TreeData) and got.last and got.ordered and bytes(got.payload) == b"abc"


@native
def test_what_is_batched_goes_out_before_waiting_for_the_listing(tmp_path, monkeypatch):
    """A sender ahead of the receiver's listing sends its batched operations before it waits:
    they reach the receiver (on a slow link: cross it) while the receiver still lists."""
    from smsrepl.codec import Compressor
    from smsrepl.files.opstream import OpStream
    from smsrepl.files.remote import RemoteTarget
    from smsrepl.files.scan import root_entry

    frames = _frames(_tree(tmp_path / "t"), monkeypatch)
    sent = []
    ops = OpStream(sent.append, Compressor(1))
    listing, q = Listing(), queue.Queue()
    q.put(frames[0])
    listing.follow(q.get, Decompressor())
    target = RemoteTarget(listing, ops)
    try:
        target.set_root_meta(root_entry(os.fsencode(tmp_path / "t")))
        assert listing.records(b"") and not sent  # batched, not sent: nothing waited yet
        waiter = threading.Thread(target=target.dir_records, args=(b"a",), daemon=True)
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive()
        ops.drain()
        assert [type(ev) for ev in sent] == [F.FileOps]  # went out while waiting
        for ev in frames[1:]:
            q.put(ev)
        waiter.join(5)
        assert not waiter.is_alive()
    finally:
        ops.close()


_NAMES = [b"a", b"a-", b"a.b", b"ab", b"B", b"\xc3\xa9", b"z z", b"\xff"]


@native
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dirs=st.lists(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=3), max_size=12),
       files=st.lists(st.integers(0, 11), max_size=10), batch=st.sampled_from([1, 40, 300, 128 << 10]))
def test_any_tree_streamed_reads_as_the_whole_listing(tmp_path_factory, dirs, files, batch):
    """Whatever the tree and the frame size, every directory's records read from a listing
    that is still arriving equal those of the complete listing."""
    root = tmp_path_factory.mktemp("t")
    top = os.fsencode(root)
    made = sorted({b"/".join(d) for d in dirs})
    for d in made:
        os.makedirs(top + b"/" + d, exist_ok=True)
    for i in files:
        parent = made[i % len(made)] if made else b""
        with open(top + b"/" + parent + b"/f%d" % i if parent else top + b"/f%d" % i, "wb") as fh:
            fh.write(b"x" * i)
    old = describe.STREAM_BATCH
    describe.STREAM_BATCH = batch
    try:
        frames = list(describe_tree(top, stream=True))
    finally:
        describe.STREAM_BATCH = old
    whole = Listing()
    for ev in frames:
        whole.add(ev, Decompressor())
    listing, q = Listing(), queue.Queue()
    listing.add(frames[0], Decompressor())
    if not listing.done:
        listing.follow(q.get, Decompressor())

    def feed():  # the rest arrives while the questions are asked
        for ev in frames[1:]:
            time.sleep(0.001)
            q.put(ev)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    for rel in [b""] + sorted(made, key=lambda d: (d.count(b"/"), d.split(b"/"))):  # as a sender asks
        assert listing.records(rel) == whole.records(rel), rel
    assert listing.entries.keys() == whole.entries.keys()
    feeder.join(5)
