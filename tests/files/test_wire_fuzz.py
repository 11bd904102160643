"""File-session records from a hostile peer: only the documented errors escape, nothing lands
outside the target root."""
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from smsrepl.errors import ReplicationError
from smsrepl.files import wire as W
from smsrepl.files.apply import TreeWriter
from smsrepl.files.opapply import OpApplier
from smsrepl.files.scan import Entry
from smsrepl.protocol import frames as F

names = st.binary(min_size=0, max_size=12)
paths = st.lists(st.sampled_from([b"a", b"b", b"..", b".", b"", b"/", b"c/d", b"\0"]) | names, min_size=1,
                 max_size=4).map(b"/".join)
kinds = st.sampled_from(sorted(W.KIND_CODES))
entries = st.builds(lambda p, k, m, sz, link: Entry(p, k, m, 0, 0, sz, 1_600_000_000_000_000_000, 0, 0, 1, 0, link),
                    paths, kinds, st.integers(0, 0o7777), st.integers(0, 64), st.none() | names)


def op_bytes(op, entry, data):
    kw = {}
    if op == W.FILE:
        entry.size = len(data)
        kw["data"] = data
    elif op in (W.CHUNK, W.END):
        kw["data"] = data if op == W.CHUNK else (data * 16)[:16].ljust(16, b"\0")
    elif op in (W.HARDLINK, W.DELETE):
        kw["path"] = data
    elif op == W.DELTA:
        kw["block_size"] = len(data)
    elif op == W.COPY:
        kw["first"], kw["count"] = len(data), 2
    return b"".join(bytes(b) for b in W.encode_op(op, entry, **kw))


ops = st.lists(st.tuples(st.sampled_from(sorted(W.OP_NAMES)), entries, st.binary(max_size=40)), max_size=8)


@pytest.mark.reliability("fuzzing", "random bytes into the file record decoders (hypothesis)")
@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_decode_only_to_protocol_errors(data):
    try:
        list(W.decode_ops(data))
    except ReplicationError:
        pass
    r = W.Reader(data)
    try:
        while not r.done():
            r.entry()
    except ReplicationError:
        pass


@pytest.mark.reliability("hostile peer", "random file operation sequences (nothing outside the root)")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops)
def test_hostile_operations_stay_inside_the_root(tmp_path_factory, seq):
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "root"
    root.mkdir()
    (base / "outside").mkdir()
    os.symlink(base / "outside", root / "c")  # a planted link: nothing may be written through it
    body = b"".join(op_bytes(op, e, d) for op, e, d in seq)
    with TreeWriter(str(root), preserve_owner=False) as w:
        applier = OpApplier(w)
        try:
            if body:
                applier.apply(F.FileOps(0, len(body), body))
            w.finish()
        except ReplicationError:
            pass
        finally:
            applier.close()
    assert os.listdir(base / "outside") == []
    assert sorted(os.listdir(base)) == ["outside", "root"]
