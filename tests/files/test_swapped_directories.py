"""A live source swaps a directory for a symlink between the listing and the read (``mv d x;
ln -s /etc d``): no source path is followed through it, so nothing from outside the tree
reaches the target (the files there vanished for this round; the next round copies what the
tree then holds)."""
import errno
import os
import subprocess

import pytest

from smsrepl import kernels
from smsrepl.files import beneath
from smsrepl.files.local import sync_tree
from smsrepl.files.source import SourceWalkErrors, scan_round, walk_round

from .test_source_moves import remote_round

SECRET = b"root:$6$not-for-the-target:20228:0:99999:7:::\n"
native = pytest.mark.skipif(not kernels.TREE, reason="directory-at-a-time rounds need the native kernels")


def _lab(tmp_path):
    """src/d holds a small and a large file; outside/ holds files of the same names, sizes
    and times with SECRET in them: what the tree's user would like copied."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    for root, fill in ((src / "d", b"A"), (outside, None)):
        root.mkdir(parents=True)
    for name, size in (("shadow", 4096), ("big", 3 << 20)):  # a FILE op of its own; a large file's path
        secret = (SECRET * (size // len(SECRET) + 1))[:size]
        (outside / name).write_bytes(secret)
        (src / "d" / name).write_bytes(b"A" * size)
        st = os.stat(outside / name)
        os.utime(src / "d" / name, ns=(st.st_atime_ns, st.st_mtime_ns))
    return src, outside


def _swap(src, outside):
    os.rename(src / "d", src / "d.moved")
    os.symlink(outside, src / "d")


def _leaked(dst) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(dst) for f in files
            if SECRET[:20] in open(os.path.join(d, f), "rb").read(64)]


@pytest.fixture(params=["openat2", "walk"])
def resolve(request, monkeypatch):
    """Both ways beneath.py resolves a path: openat2, and one component at a time (kernels
    without openat2)."""
    if request.param == "walk":
        monkeypatch.setattr(beneath, "_have_openat2", False)
    return request.param


@pytest.mark.parametrize("listing", ["walk", pytest.param("scan", marks=native)])
def test_files_listed_before_their_directory_became_a_symlink_are_not_read_through_it(tmp_path, listing, resolve):
    src, outside = _lab(tmp_path)
    dst = tmp_path / "dst"
    errors = SourceWalkErrors(os.fsencode(src))
    entries = list((walk_round if listing == "walk" else scan_round)(str(src), None, "full", errors))
    _swap(src, outside)
    if listing == "walk":
        stats = sync_tree(str(src), str(dst), entries=entries, walk_errors=errors)
    else:
        stats = remote_round(src, dst, entries=entries, walk_errors=errors)
    assert _leaked(dst) == []
    assert stats.source_moved and stats.vanished >= 1, stats.reported
    # the next round copies what the tree holds then: d is a symlink, d.moved the user's files
    sync_tree(str(src), str(dst))
    assert os.readlink(dst / "d") == str(outside) and (dst / "d.moved" / "big").read_bytes()[:1] == b"A"
    assert _leaked(dst) == []


@native
def test_a_directory_below_one_that_became_a_symlink_is_not_scanned_through_it(tmp_path, monkeypatch, resolve):
    monkeypatch.setenv("SMSREPL_SCAN_THREADS", "1")  # directories are scanned as the round asks
    src, outside = _lab(tmp_path / "lab")
    os.mkdir(src / "d" / "e")
    os.mkdir(outside / "e")
    for name in ("shadow", "big"):
        os.rename(src / "d" / name, src / "d" / "e" / name)
        os.rename(outside / name, outside / "e" / name)
    dst = tmp_path / "dst"
    errors = SourceWalkErrors(os.fsencode(src))
    batches = scan_round(str(src), None, "full", errors)
    listed = [next(batches), next(batches)]  # the root's and d's: e is still to be scanned
    assert [b.rel for b in listed] == [b"", b"d"]
    _swap(src, outside)

    def rest():
        yield from listed
        yield from batches

    stats = remote_round(src, dst, entries=rest(), walk_errors=errors)
    assert _leaked(dst) == [] and not (dst / "d" / "e" / "shadow").exists()
    assert stats.vanished >= 1 and any(r.startswith("d/e: vanished") for r in stats.reported), stats.reported


def test_open_beneath_follows_no_symlink_below_the_root_but_the_root_s_own(tmp_path, resolve):
    (tmp_path / "real" / "a" / "b").mkdir(parents=True)
    (tmp_path / "real" / "a" / "b" / "f").write_bytes(b"f")
    (tmp_path / "real" / "link").symlink_to(tmp_path / "real" / "a")
    (tmp_path / "real" / "a" / "lf").symlink_to("b/f")
    (tmp_path / "top").symlink_to(tmp_path / "real")  # the root named through a symlink of its own
    top = os.fsencode(tmp_path / "top")
    fd = beneath.open_beneath(top, b"a/b/f", os.O_RDONLY)
    try:
        assert os.read(fd, 8) == b"f"
    finally:
        os.close(fd)
    for rel in (b"link/b/f", b"a/lf", b"link"):
        with pytest.raises(OSError) as got:
            os.close(beneath.open_beneath(top, rel, os.O_RDONLY))
        assert got.value.errno in (errno.ELOOP, errno.ENOTDIR), rel
    assert beneath.lstat_beneath(top, b"a/lf").st_size == 3
    with pytest.raises(OSError) as got:
        beneath.lstat_beneath(top, b"link/b")
    assert got.value.errno in (errno.ELOOP, errno.ENOTDIR)


def _deep_tree(top, depth=20) -> bytes:
    """A file below ``depth`` directories of 244-byte names (4,900 bytes of path: more than
    the kernel takes in one call); its path relative to ``top``."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    parts = [b"d%03d" % i + b"x" * 240 for i in range(depth)]
    try:
        for p in parts:  # made relative to each parent: the whole path is too long for mkdir
            os.mkdir(p, dir_fd=fd)
            nxt = os.open(p, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        w = os.open(b"f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(w, b"deep")
        os.close(w)
    finally:
        os.close(fd)
    return b"/".join(parts) + b"/f"


def _read_beneath(top, rel) -> bytes:
    fd = beneath.open_beneath(os.fsencode(top), rel, os.O_RDONLY)
    try:
        return os.read(fd, 64)
    finally:
        os.close(fd)


def test_paths_longer_than_the_kernel_takes_at_once_are_opened_a_component_at_a_time(tmp_path):
    rel = _deep_tree(tmp_path / "top")
    assert len(rel) > 4096
    assert _read_beneath(tmp_path / "top", rel) == b"deep"


@pytest.mark.parametrize("listing", ["walk", pytest.param("scan", marks=native)])
def test_a_round_copies_a_file_whose_path_is_longer_than_the_kernel_takes_at_once(tmp_path, listing):
    """One user's deep tree used to stop every round (SMS.1901 ... File name too long)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    rel = _deep_tree(src)
    (src / "top.txt").write_bytes(b"top")
    stats = sync_tree(str(src), str(dst)) if listing == "walk" else remote_round(src, dst)
    assert stats.files_sent == 2 and not stats.reported
    assert _read_beneath(dst, rel) == b"deep" and (dst / "top.txt").read_bytes() == b"top"
    for top in (src, dst):  # rmtree by path cannot go that deep
        subprocess.run(["rm", "-rf", str(top)], check=True)
