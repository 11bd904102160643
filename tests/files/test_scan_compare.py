import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from smsrepl.errors import SourceError
from smsrepl.files.compare import compare_trees
from smsrepl.files.rules import PathRules
from smsrepl.files.scan import walk

from .trees import as_nobody


def make_tree(root, n_files=300, seed=1):
    rng = random.Random(seed)
    dirs = [""]
    for i in range(30):
        parent = rng.choice(dirs)
        d = os.path.join(parent, f"dir {i}") if parent else f"dir {i}"
        os.makedirs(os.path.join(root, d))
        dirs.append(d)
    os.makedirs(os.path.join(root, "empty dir"))
    paths = []
    for i in range(n_files):
        p = os.path.join(root, rng.choice(dirs), f"file {i}.dat")
        with open(p, "wb") as fh:
            fh.write(rng.randbytes(rng.randint(0, 5000)))
        paths.append(os.path.relpath(p, root))
    return paths


def test_walk_order_kinds_symlinks_not_followed_and_odd_names(tmp_path):
    root = tmp_path / "t"
    (root / "b").mkdir(parents=True)
    (root / "a").write_bytes(b"x")
    os.symlink("/etc", root / "b" / "etc-link")  # a link to a directory: listed, never entered
    odd = os.fsencode(str(root / "b")) + b"/name\nwith newline \xff\xfe"
    with open(odd, "wb") as fh:
        fh.write(b"y")
    os.link(root / "a", root / "b" / "hard")
    os.mkfifo(root / "fifo")
    got = [(e.path, e.kind) for e in walk(str(root))]
    assert got == [(b"", "dir"), (b"a", "file"), (b"b", "dir"), (b"b/etc-link", "symlink"), (b"b/hard", "file"),
                   (b"b/name\nwith newline \xff\xfe", "file"), (b"fifo", "fifo")]
    entries = {e.path: e for e in walk(str(root))}
    assert entries[b"b/etc-link"].link == b"/etc"
    assert entries[b"a"].ino == entries[b"b/hard"].ino and entries[b"a"].nlink == 2


def test_walk_deeper_than_the_recursion_limit(tmp_path):
    depth = sys.getrecursionlimit() + 200
    path = os.fsencode(str(tmp_path / "deep"))
    os.mkdir(path)
    fds = [os.open(path, os.O_RDONLY)]
    try:
        for _ in range(depth):  # relative to directory descriptors: the whole path is too long for one call
            os.mkdir(b"d", dir_fd=fds[-1])
            fds.append(os.open(b"d", os.O_RDONLY, dir_fd=fds[-1]))
        try:
            n = sum(1 for _ in walk(path))
        except SourceError as exc:  # the kernel's PATH_MAX, not Python's stack, may end the walk
            assert "File name too long" in str(exc)
        else:
            assert n == depth + 1
    finally:  # bottom-up: pytest's own clean-up recurses and would fail on this tree
        os.close(fds.pop())
        while fds:
            fd = fds.pop()
            os.rmdir(b"d", dir_fd=fd)
            os.close(fd)


def test_walk_prunes_excluded_directories(tmp_path):
    root = tmp_path / "t"
    for d in ("var/log/nginx", "var/lib", "home/ann/cache", "home/ann/docs"):
        (root / d).mkdir(parents=True)
        (root / d / "f").write_bytes(b"1")
    rules = PathRules.from_configurations({"configurations": [
        {"config_key": "EXCLUDE_MIGRATE_PATH", "config_value": "/var/log,/home/*/cache"},
        {"config_key": "ONLY_SYNC_PATH", "config_value": "/home/ann/docs"}]})
    full = [e.path for e in walk(str(root), rules.for_round("full"))]
    assert b"var/log" not in full and b"var/log/nginx/f" not in full and b"home/ann/cache/f" not in full
    assert b"var/lib/f" in full and b"home/ann/docs/f" in full
    sync = [e.path for e in walk(str(root), rules.for_round("sync"))]
    assert sync == [b"", b"home/ann/docs", b"home/ann/docs/f"]


def test_unreadable_directory_is_an_error_or_reported(tmp_path):
    import pathlib
    import tempfile

    base = pathlib.Path(tempfile.mkdtemp(prefix="smsrepl-scan-"))  # pytest's tmp_path is root's alone
    os.chmod(base, 0o755)
    root = base / "t"
    (root / "locked").mkdir(parents=True)
    (root / "locked" / "f").write_bytes(b"1")
    os.chmod(root / "locked", 0)
    def scan():
        seen = []
        paths = [e.path for e in walk(str(root), on_error=lambda p, e: seen.append(p))]
        try:
            list(walk(str(root)))
            err = "no error"
        except SourceError as exc:
            err = str(exc)
        return paths, seen, err

    try:
        paths, seen, err = as_nobody(scan)
    finally:
        os.chmod(root / "locked", 0o755)
        shutil.rmtree(base)
    assert paths == [b"", b"locked"] and seen == [b"locked"]
    assert err.startswith("SMS.1901") and "t/locked': Permission denied" in err


def rclone_counts(src, dst):
    cp = subprocess.run(["rclone", "check", str(src), str(dst), "--combined", "-", "--config", "/dev/null"],
                        capture_output=True, text=True)
    marks = [line[0] for line in cp.stdout.splitlines() if line]
    assert "!" not in marks, cp.stdout + cp.stderr
    # rclone's marks: "+" only in the source (missing on the target), "-" only in the destination
    return {"total": marks.count("=") + marks.count("*") + marks.count("+"), "different": marks.count("*"),
            "missing": marks.count("+"), "extra": marks.count("-")}


@pytest.mark.skipif(shutil.which("rclone") is None, reason="rclone (Debian package) is not installed")
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_counts_equal_rclone_check(tmp_path, seed):
    src, dst = tmp_path / "src", tmp_path / "dst"
    paths = make_tree(src, seed=seed)
    shutil.copytree(src, dst, symlinks=True)
    rng = random.Random(seed)
    picked = rng.sample(paths, 40)
    for p in picked[:10]:
        os.unlink(dst / p)
    for p in picked[10:25]:  # different content: some the same size, some not
        data = bytearray((dst / p).read_bytes() or b"\0")
        data[len(data) // 2] ^= 1
        (dst / p).write_bytes(bytes(data) if rng.random() < 0.5 else bytes(data) + b"more")
    for i in range(7):
        (dst / f"extra {i}").write_bytes(b"e")
    (dst / "dir 0" / "extra dir").mkdir()
    (dst / "dir 0" / "extra dir" / "x").write_bytes(b"x")
    body, checks = compare_trees(str(src), str(dst))
    ours = body["consistency_result"][0]
    theirs = rclone_counts(src, dst)
    assert (ours["num_total_files"], ours["num_different_files"], ours["num_target_miss_files"],
            ours["num_target_more_files"]) == (theirs["total"], theirs["different"], theirs["missing"], theirs["extra"])
    assert (theirs["different"], theirs["missing"], theirs["extra"]) == (15, 10, 8)
    assert body["check_result"] == "inconsistent"


def test_metadata_differences_count_and_dir_checks_limit_the_count(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for d in ("etc", "var/lib", "home"):
        (src / d).mkdir(parents=True)
        for i in range(3):
            (src / d / f"f{i}").write_bytes(b"data %d" % i)
    os.symlink("f0", src / "etc" / "link")
    shutil.copytree(src, dst, symlinks=True)
    body, _ = compare_trees(str(src), str(dst), ["/etc", "/var/*"])
    assert body["check_result"] == "consistent"
    assert [c["num_total_files"] for c in body["consistency_result"]] == [4, 3]
    os.chmod(dst / "etc" / "f1", 0o600)  # metadata only
    os.unlink(dst / "etc" / "link")
    os.symlink("f2", dst / "etc" / "link")  # another target
    os.utime(dst / "var" / "lib" / "f0", ns=(0, 123456789))
    (dst / "home" / "f0").write_bytes(b"changed")  # outside the checked directories
    body, checks = compare_trees(str(src), str(dst), ["/etc", "/var/*"])  # data: as rclone check
    assert [c["num_different_files"] for c in body["consistency_result"]] == [1, 0]
    assert checks[0].combined() == ["= etc/f0", "= etc/f1", "= etc/f2", "* etc/link"]
    for mode in ("all", "metadata"):  # permissions and times count too
        body, checks = compare_trees(str(src), str(dst), ["/etc", "/var/*"], mode=mode)
        assert [c["num_different_files"] for c in body["consistency_result"]] == [2, 1], mode
        assert body["check_result"] == "inconsistent"
        assert checks[0].combined() == ["= etc/f0", "* etc/f1", "= etc/f2", "* etc/link"]
    (dst / "etc" / "f2").write_bytes(b"DATA 2")  # same size, same mtime, other content
    os.utime(dst / "etc" / "f2", ns=(0, os.stat(src / "etc" / "f2").st_mtime_ns))
    got = {mode: compare_trees(str(src), str(dst), ["/etc"], mode=mode)[1][0].different
           for mode in ("data", "metadata", "all")}
    assert got == {"data": [b"etc/f2", b"etc/link"], "metadata": [b"etc/f1", b"etc/link"],
                   "all": [b"etc/f1", b"etc/f2", b"etc/link"]}


def test_metadata_includes_the_xattrs_of_files_and_symlinks(tmp_path):
    """An ACL or a SELinux label the copy lost is a metadata difference (data ignores it)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    os.symlink("f", src / "link")
    os.setxattr(src / "f", b"user.acl-like", b"1")
    attrs = ["f"]
    if os.geteuid() == 0:  # user.* is refused on a symlink; trusted.* needs root
        os.setxattr(src / "link", b"trusted.label", b"etc_t", follow_symlinks=False)
        attrs.append("link")
    shutil.copytree(src, dst, symlinks=True)
    for name in attrs:  # a copy that lost them
        for attr in os.listxattr(dst / name, follow_symlinks=False):
            os.removexattr(dst / name, attr, follow_symlinks=False)
    expected = [os.fsencode(n) for n in attrs]
    for mode, different in (("data", []), ("metadata", expected), ("all", expected)):
        body, checks = compare_trees(str(src), str(dst), mode=mode)
        assert checks[0].different == different, mode
        assert body["check_result"] == ("consistent" if not different else "inconsistent"), mode
    os.setxattr(dst / "f", b"user.acl-like", b"1")
    if os.geteuid() == 0:
        os.setxattr(dst / "link", b"trusted.label", b"etc_t", follow_symlinks=False)
    assert compare_trees(str(src), str(dst), mode="all")[0]["check_result"] == "consistent"


def test_cli_verify_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src, n_files=50)
    shutil.copytree(src, dst, symlinks=True)
    run = lambda *a: subprocess.run([sys.executable, "-m", "smsrepl", "verify", "files", *a],  # noqa: E731
                                    capture_output=True, text=True)
    cp = run(str(src), str(dst))
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["consistency_result"][0]["num_total_files"] == 50
    (dst / "new").write_bytes(b"n")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"configurations": [{"config_key": "CONSISTENCY_DIR", "config_value": "/"}]}))
    cp = run(str(src), str(dst), "--list")
    assert cp.returncode == 1 and "- new" in cp.stderr  # rclone check --combined: '-' only in the destination
    assert json.loads(cp.stdout)["consistency_result"][0]["num_target_more_files"] == 1
    cfg.write_text(json.dumps({"configurations": [{"config_key": "CONSISTENCY_DIR", "config_value": "etc"}]}))
    cp = run(str(src), str(dst), "--config", str(cfg))
    assert cp.returncode == 2 and "CONSISTENCY_DIR" in cp.stderr and "not an absolute path" in cp.stderr
    cp = run(str(src), str(tmp_path / "nowhere"))
    assert cp.returncode == 2 and "nowhere': No such file or directory" in cp.stderr


def test_a_glob_dir_check_over_alike_directories_is_counted_without_list(tmp_path):
    """A CONSISTENCY_DIR glob that covers some entries of a directory alike on both sides:
    without --list the alike entries are counted, not listed, and the glob picks its own
    among them (it raised a TypeError, a traceback for ``verify files --dir-check``)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "a" / "sub").mkdir(parents=True)
    for name in ("x.log", "y.log", "z.txt", "sub/w.log"):
        (src / "a" / name).write_bytes(name.encode())
    shutil.copytree(src, dst, symlinks=True)
    listed, _ = compare_trees(str(src), str(dst), ["/a/*.log"])
    counted, checks = compare_trees(str(src), str(dst), ["/a/*.log"], list_paths=False)
    assert counted["consistency_result"] == listed["consistency_result"] and counted["check_result"] == "consistent"
    assert counted["consistency_result"][0]["num_total_files"] == 2 and checks[0].same_count == 2
    cp = subprocess.run([sys.executable, "-m", "smsrepl", "verify", "files", str(src), str(dst),
                         "--dir-check", "/a/*.log"], capture_output=True, text=True)
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
    assert json.loads(cp.stdout)["consistency_result"][0]["num_total_files"] == 2
    (dst / "a" / "y.log").write_bytes(b"Y.LOG")  # same size, other content: a different file
    cp = subprocess.run([sys.executable, "-m", "smsrepl", "verify", "files", str(src), str(dst),
                         "--dir-check", "/a/*.log"], capture_output=True, text=True)
    assert cp.returncode == 1, cp.stderr
    got = json.loads(cp.stdout)["consistency_result"][0]
    assert (got["num_total_files"], got["num_different_files"]) == (2, 1)
    assert sorted(os.listdir(dst / "a")) == ["sub", "x.log", "y.log", "z.txt"]  # a check writes nothing


@pytest.mark.skipif(not __import__("smsrepl.kernels", fromlist=["TREE"]).TREE, reason="native file-tree kernels only")
def test_scan_threads_setting_is_checked_and_does_not_change_the_scan(tmp_path, monkeypatch):
    from smsrepl.errors import ConfigError
    from smsrepl.files.dirscan import scan_dirs

    for d in range(6):
        (tmp_path / f"d{d}" / "e").mkdir(parents=True)
        (tmp_path / f"d{d}" / "f").write_bytes(b"x" * d)

    def listing():
        return sorted((b.rel, b.records) for b in scan_dirs(tmp_path))

    monkeypatch.setenv("SMSREPL_SCAN_THREADS", "1")
    one = listing()
    monkeypatch.setenv("SMSREPL_SCAN_THREADS", "3")
    assert listing() == one and len(one) == 13
    for bad in ("0", "-2", "two", "65", "1.5"):
        monkeypatch.setenv("SMSREPL_SCAN_THREADS", bad)
        with pytest.raises(ConfigError, match="SMSREPL_SCAN_THREADS"):
            listing()
