"""The file-tree kernels (fstree.h) against the per-entry Python code they stand in for,
and their answers to bad input."""
from __future__ import annotations

import errno
import os
import stat

import pytest

from smsrepl.files import wire as W
from smsrepl.files.scan import walk

try:
    from smsrepl._native import _core as native
except ImportError:  # pragma: no cover
    native = None

pytestmark = pytest.mark.skipif(native is None, reason="native core not built")
ODD = [b"plain.txt", b"with space", b"new\nline", b"\xff\xfenot-utf8", b"x" * 255, b"-dash", b"Upper"]


def _dirfd(path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    for i, name in enumerate(ODD):
        (root / os.fsdecode(name)).write_bytes(b"d" * (i * 100))
    os.symlink(b"target\xff", os.path.join(os.fsencode(root), b"link"))
    os.mkfifo(root / "fifo")
    (root / "sub").mkdir()
    try:
        os.setxattr(root / "plain.txt", "user.b", b"2")
        os.setxattr(root / "plain.txt", "user.a", b"")
    except OSError:
        pass  # a file system without user xattrs: records carry none, on both sides
    return root


def _python_records(root, prefix: bytes) -> bytes:
    out = b""
    for e in walk(root, xattrs=True):
        if e.path and b"/" not in e.path:
            e.path = prefix + b"/" + e.path if prefix else e.path
            out += W.encode_entry(e)
    return out


@pytest.mark.parametrize("prefix", [b"", b"a/b"])
def test_scan_dir_makes_the_records_the_python_walk_does(tree, prefix):
    fd = _dirfd(tree)
    try:
        records, names, kinds, ends, errors, sizes = native.scan_dir(fd, prefix, os.fsencode(tree))
    finally:
        os.close(fd)
    assert records == _python_records(tree, prefix)
    assert names == sorted(names) and set(ODD) <= set(names)
    assert len(kinds) == len(names) == len(ends) and ends[-1] == len(records)
    assert errors == []
    assert sizes == sum(i * 100 for i in range(len(ODD)))


def test_scan_dir_of_something_that_is_not_a_directory_is_an_oserror(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x")
    fd = os.open(f, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as err:
            native.scan_dir(fd, b"", None)
        assert err.value.errno == errno.ENOTDIR
    finally:
        os.close(fd)
    with pytest.raises(ValueError, match="NUL"):
        native.scan_dir(0, b"", b"a\0b")


def _records_of(root) -> bytes:
    fd = _dirfd(root)
    try:
        return native.scan_dir(fd, b"", os.fsencode(root))[0]
    finally:
        os.close(fd)


def test_diff_records_verdicts(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    for d in (src, dst):
        d.mkdir()
        for name in ("same", "meta", "data", "kind", "link_old", "gone"):
            if d == src and name == "gone":
                continue
            (d / name).write_bytes(b"12345")
            os.utime(d / name, ns=(10**18, 10**18))
        os.symlink("to-a", d / "sym")
    (src / "new").write_bytes(b"n")
    os.chmod(src / "meta", 0o600)
    (src / "data").write_bytes(b"123456")
    os.utime(src / "data", ns=(10**18, 10**18))
    (src / "kind").unlink()
    (src / "kind").mkdir()
    os.link(src / "link_old", src / "link_new")  # a hard link on the source: the careful path
    (dst / "sym").unlink()
    os.symlink("to-b", dst / "sym")
    names = sorted(os.fsencode(n) for n in os.listdir(src))
    actions, gone = native.diff_records(_records_of(src), _records_of(dst))
    got = dict(zip(names, actions))
    assert got == {b"same": 0, b"meta": 3, b"data": 4, b"kind": 1, b"link_old": 1, b"link_new": 2, b"new": 2,
                   b"sym": 1}
    dst_names = sorted(os.fsencode(n) for n in os.listdir(dst))
    assert [dst_names[j] for j in gone] == [b"gone"]


def test_diff_records_refuses_unsorted_duplicate_and_truncated_listings(tmp_path):
    for n in ("a", "b"):
        (tmp_path / n).write_bytes(b"")
    recs = _records_of(tmp_path)
    a_end = W.Reader(recs)
    a_end.entry()
    first, second = recs[:a_end.pos], recs[a_end.pos:]
    with pytest.raises(ValueError, match="sorted"):
        native.diff_records(recs, second + first)
    with pytest.raises(ValueError, match="sorted"):
        native.diff_records(first + first, recs)
    with pytest.raises(ValueError, match="past the end"):
        native.diff_records(recs[:-1], b"")


def test_group_records_splits_by_parent_and_keeps_the_root_apart(tmp_path):
    e = next(walk(tmp_path))
    root_rec = W.encode_entry(e)  # path b""
    (tmp_path / "x").write_bytes(b"")
    fd = _dirfd(tmp_path)
    try:
        top = native.scan_dir(fd, b"", None)[0]
        deep = native.scan_dir(fd, b"d/e", None)[0]
    finally:
        os.close(fd)
    body = root_rec + top + deep
    assert native.group_records(body) == [(None, 0, len(root_rec)), (b"", len(root_rec), len(root_rec) + len(top)),
                                          (b"d/e", len(root_rec) + len(top), len(body))]
    with pytest.raises(ValueError):
        native.group_records(body[:-3])


def test_read_files_reads_into_the_buffer_and_leaves_what_it_cannot(tmp_path):
    for name, size in (("a", 10), ("b", 5000), ("c", 3)):
        (tmp_path / name).write_bytes(bytes([65 + len(name)]) * size)
    (tmp_path / "big").write_bytes(b"B" * 70_000)
    os.mkfifo(tmp_path / "p")
    recs = _records_of(tmp_path)  # a b big c p
    fd = _dirfd(tmp_path)
    try:
        os.unlink(tmp_path / "c")
        os.mkfifo(tmp_path / "c")  # a file swapped for a FIFO after the scan: never opened blocking
        buf = bytearray(1 << 20)
        end, taken, left, files, nbytes = native.read_files(fd, recs, [0, 1, 2, 3, 4], 65536, buf, 7)
        assert (taken, sorted(left), files, nbytes) == (5, [2, 3, 4], 2, 5010)
        ops = list(W.decode_ops(bytes(buf[7:end])))
        assert [(op, e.path, len(d)) for op, e, d in ops] == [(W.FILE, b"a", 10), (W.FILE, b"b", 5000)]
        small = bytearray(200)  # room for a, not for b: stops there
        end, taken, left, files, _ = native.read_files(fd, recs, [0, 1], 65536, small, 0)
        assert (taken, left, files) == (1, [], 1)
        with pytest.raises(ValueError, match="outside the buffer"):
            native.read_files(fd, recs, [0], 65536, small, 201)
        with pytest.raises(IndexError):
            native.read_files(fd, recs, [5], 65536, buf, 0)
        with pytest.raises(TypeError):
            native.read_files(fd, recs, [0], 65536, b"read-only", 0)
    finally:
        os.close(fd)


def test_read_files_of_many_files_reads_with_threads_what_one_at_a_time_reads(tmp_path):
    """Many files are read by threads, each into the place its record's size gives it: the
    operations come out as a file at a time makes them, in order, closed up where a file was
    left (its size changed since the scan, not a regular file, too large), and a buffer that
    runs out stops the call at the file that does not fit."""
    import random

    rng = random.Random(4)
    names = [f"f{i:03}" for i in range(120)]
    for name in names:
        (tmp_path / name).write_bytes(rng.randbytes(rng.randint(0, 3000)))
    (tmp_path / "f050").write_bytes(b"B" * 70_000)  # larger than max_size
    recs = _records_of(tmp_path)
    (tmp_path / "f007").write_bytes(b"grew since the scan" * 300)
    (tmp_path / "f090").write_bytes(b"shrank")
    os.unlink(tmp_path / "f100")  # vanished
    fd = _dirfd(tmp_path)
    try:
        every = list(range(len(names)))
        serial, left_serial = bytearray(), []
        for first in range(0, len(every), 10):  # 10 at a time: one thread
            buf = bytearray(1 << 20)
            end, taken, left, _, _ = native.read_files(fd, recs, every[first:first + 10], 65536, buf, 0)
            assert taken == len(every[first:first + 10])
            serial += buf[:end]
            left_serial += left
        buf = bytearray(1 << 20)
        end, taken, left, files, nbytes = native.read_files(fd, recs, every, 65536, buf, 5)
        assert taken == len(every) and sorted(left) == [7, 50, 90, 100]
        ops = list(W.decode_ops(bytes(buf[5:end])))
        assert [e.path for _, e, _ in ops] == [n.encode() for i, n in enumerate(names) if i not in (7, 50, 90, 100)]
        assert all(bytes(d) == (tmp_path / os.fsdecode(e.path)).read_bytes() for _, e, d in ops)
        assert files == len(ops) and nbytes == sum(len(d) for _, _, d in ops)
        assert sorted(left_serial) == [50, 100]  # one at a time reads what changed since the scan
        ops_serial = [op for op in W.decode_ops(bytes(serial)) if op[1].path not in (b"f007", b"f090")]
        assert [(e, bytes(d)) for _, e, d in ops_serial] == [(e, bytes(d)) for _, e, d in ops]
        small = bytearray(20_000)  # room for a few: stops at the first that does not fit
        end, taken, left, files, _ = native.read_files(fd, recs, every, 65536, small, 0)
        assert 0 < taken < len(every) and files == taken - len(left)
        assert [e.path for _, e, _ in W.decode_ops(bytes(small[:end]))] == [
            n.encode() for i, n in enumerate(names[:taken]) if i not in left]
    finally:
        os.close(fd)


def test_read_files_trusts_a_recent_change_only_under_a_lease(tmp_path):
    """A file changed after settle_before_ns is read only under a read lease, which nobody
    holding it open for writing lets us take; one older than that is read either way (a write
    starting during the read would change its ctime, which is checked after it)."""
    import time

    for name in ("held", "quiet"):
        (tmp_path / name).write_bytes(name.encode() * 100)
    recs = _records_of(tmp_path)  # held quiet
    fd = _dirfd(tmp_path)
    writer = open(tmp_path / "held", "ab")  # open for writing elsewhere: no lease on it
    try:
        buf = bytearray(1 << 16)
        recent = time.time_ns() - 60 * 10**9  # both changed after it
        _, taken, left, files, _ = native.read_files(fd, recs, [0, 1], 65536, buf, 0, recent)
        assert (taken, left, files) == (2, [0], 1)  # quiet was leased, held could not be
        settled = time.time_ns() + 60 * 10**9  # both changed before it
        end, taken, left, files, _ = native.read_files(fd, recs, [0, 1], 65536, buf, 0, settled)
        assert (taken, left, files) == (2, [], 2)
        assert [e.path for _, e, _ in W.decode_ops(bytes(buf[:end]))] == [b"held", b"quiet"]
    finally:
        writer.close()
        os.close(fd)


def _file_op(path: bytes, data: bytes, mode: int = 0o640, mtime: int = 1_500_000_000_123_456_789,
             uid: int | None = None, gid: int | None = None) -> bytes:
    from smsrepl.files.scan import Entry

    e = Entry(path, "file", mode, os.getuid() if uid is None else uid, os.getgid() if gid is None else gid,
              len(data), mtime, 0, 0, 1, 0)
    return b"".join(bytes(p) for p in W.encode_op(W.FILE, e, data=data))


def test_write_files_then_link_files_make_the_files_with_their_metadata(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "old").write_bytes(b"previous")
    (tmp_path / "adir").mkdir()  # a directory where a file goes: left to the caller, named temporarily
    sparse = b"s" * 10 + bytes(3 * 4096) + b"e"
    body = (_file_op(b"new", b"hello") + _file_op(b"sub/deep", sparse, 0o600) + _file_op(b"old", b"replaced")
            + _file_op(b"adir", b"x") + _file_op(b"../escape", b"no"))
    fds = {b"": _dirfd(tmp_path), b"sub": _dirfd(tmp_path / "sub")}
    try:
        end, n, nbytes, files, dirs, fdirs, names, paths = native.write_files(body, 0, fds.__getitem__, False, 100, 2)
        assert end == len(body) - len(_file_op(b"../escape", b"no"))  # stops before the bad path
        assert (n, nbytes, paths) == (4, 5 + len(sparse) + 8 + 1, [b"new", b"sub/deep", b"old", b"adir"])
        assert not (tmp_path / "new").exists()  # nameless until linked
        failures = native.link_files(files, dirs, fdirs, names, 0xABC)
    finally:
        for fd in fds.values():
            os.close(fd)
    assert [(i, err) for i, err, _ in failures] == [(3, errno.EISDIR)]
    assert failures[0][2].startswith(b".smsrepl~00000abc")
    assert (tmp_path / "new").read_bytes() == b"hello" and (tmp_path / "old").read_bytes() == b"replaced"
    deep = os.stat(tmp_path / "sub" / "deep")
    assert (tmp_path / "sub" / "deep").read_bytes() == sparse
    assert stat.S_IMODE(deep.st_mode) == 0o600 and deep.st_mtime_ns == 1_500_000_000_123_456_789
    assert deep.st_blocks * 512 < len(sparse)  # the zero blocks stayed holes
    assert not (tmp_path.parent / "escape").exists()


def test_write_files_gives_every_mode_and_owner_whatever_the_umask(tmp_path):
    """Files are made with their permission bits (the umask may take some away) and chowned and
    chmodded only where they differ: every mode comes out whole, set-id bits after a chown too."""
    cases = [(b"plain", 0o644, None, None), (b"umasked", 0o666, None, None), (b"private", 0o600, None, None),
             (b"setid", 0o6755, None, None), (b"sticky", 0o1777, None, None), (b"none", 0o000, None, None)]
    root = os.geteuid() == 0
    if root:  # another owner: chown, which would clear set-id bits set before it
        cases += [(b"theirs", 0o4750, 1234, 5678), (b"group", 0o2770, None, 5678)]
    body = b"".join(_file_op(p, b"data", mode, uid=uid, gid=gid) for p, mode, uid, gid in cases)
    old = os.umask(0o077)
    fd = _dirfd(tmp_path)
    try:
        _, n, _, files, dirs, fdirs, names, _ = native.write_files(body, 0, lambda parent: fd, root, 100, 2)
        assert n == len(cases)
        assert native.link_files(files, dirs, fdirs, names, 1) == []
    finally:
        os.umask(old)
        os.close(fd)
    for path, mode, uid, gid in cases:
        st = os.stat(tmp_path / os.fsdecode(path))
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (
            mode, os.getuid() if uid is None else uid, os.getgid() if gid is None else gid), path


def test_write_files_stops_at_operations_for_the_careful_path_and_cleans_up_on_errors(tmp_path):
    from smsrepl.files.scan import Entry

    e = Entry(b"x", "file", 0o644, 0, 0, 1, 0, 0, 0, 1, 0, xattrs={b"user.k": b"v"})
    with_xattrs = b"".join(bytes(p) for p in W.encode_op(W.FILE, e, data=b"1"))
    body = _file_op(b"a", b"1") + with_xattrs
    fd = _dirfd(tmp_path)
    try:
        got = native.write_files(body, 0, lambda parent: fd, False, 100, 1)
        assert got[0] == len(_file_op(b"a", b"1")) and got[1] == 1
        native.link_files(*got[3:7], 1)
        assert native.write_files(with_xattrs, 0, lambda parent: fd, False, 100, 1)[1] == 0
        assert native.write_files(body, 0, lambda parent: fd, False, 0, 1)[1] == 0  # max_files 0

        def refuse(parent):
            raise PermissionError("no")

        with pytest.raises(PermissionError):
            native.write_files(_file_op(b"d/b", b"2"), 0, refuse, False, 100, 1)
        with pytest.raises(ValueError):
            native.write_files(body, len(body) + 1, lambda parent: fd, False, 100, 1)
        with pytest.raises(ValueError):
            native.link_files([1], [], [0], [b"x"], 0)
        with pytest.raises(ValueError, match="bad name"):
            native.link_files([os.dup(fd)], [os.dup(fd)], [0], [b".."], 0)
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == ["a"]  # nothing else was named


@pytest.fixture
def xattr_cache():
    """The no-xattrs cache, empty, keeping entries of any age; as it was afterwards."""
    native.xattr_cache(clear=True)
    yield native
    native.xattr_cache(clear=True, min_age=2.0)


def _xattrs_supported(path) -> bool:
    try:
        os.setxattr(path, "user.probe", b"1")
        os.removexattr(path, "user.probe")
        return True
    except OSError:
        return False


def test_scans_skip_the_xattr_probe_of_entries_known_bare_and_see_every_change(tmp_path, xattr_cache):
    import time

    root = tmp_path / "t"
    root.mkdir()
    for i in range(20):
        (root / f"f{i:02}").write_bytes(b"x" * i)
    if not _xattrs_supported(root / "f00"):
        pytest.skip("no user xattrs on this file system")
    time.sleep(0.05)  # past the ctime clock's tick: the probe's own ctime change is behind us
    xattr_cache.xattr_cache(min_age=0)
    first = _records_of(root)
    assert xattr_cache.xattr_cache() == (20, 0)
    assert _records_of(root) == first
    assert xattr_cache.xattr_cache()[1] == 20  # the second scan probed none of them
    time.sleep(0.05)
    os.setxattr(root / "f03", "user.added", b"later")  # changes f03's ctime
    with_xattr = _records_of(root)
    assert with_xattr != first and b"user.added" in with_xattr
    assert with_xattr == _python_records(root, b"")
    time.sleep(0.05)
    os.removexattr(root / "f03", "user.added")
    assert _records_of(root) == first


def test_entries_changed_within_the_last_seconds_are_not_kept(tmp_path, xattr_cache):
    root = tmp_path / "t"
    root.mkdir()
    for i in range(5):
        (root / f"f{i}").write_bytes(b"new")
    xattr_cache.xattr_cache(min_age=2.0)  # the default: ctimes this young are not trusted
    _records_of(root)
    _records_of(root)
    assert xattr_cache.xattr_cache() == (0, 0)


@pytest.mark.parametrize("bad", [-1, 1e9, float("nan"), "soon"])
def test_xattr_cache_refuses_a_bad_age(bad):
    with pytest.raises((ValueError, TypeError)):
        native.xattr_cache(min_age=bad)


def test_link_files_refusing_a_name_still_closes_every_descriptor_it_was_given(tmp_path):
    fd = _dirfd(tmp_path)
    try:
        files = [os.open(tmp_path, os.O_WRONLY | os.O_TMPFILE, 0o600) for _ in range(3)]
        dirs = [os.dup(fd)]
        bystander = os.dup(fd)
        with pytest.raises(ValueError, match="bad name"):
            native.link_files(files, dirs, [0, 0, 0], [b"ok", b"..", b"late"], 0)
        for given in files + dirs:
            with pytest.raises(OSError) as e:
                os.fstat(given)
            assert e.value.errno == errno.EBADF
        os.fstat(bystander)  # only its own descriptors were closed
        os.close(bystander)
    finally:
        os.close(fd)
    assert os.listdir(tmp_path) == []  # nothing was named
