"""Trees for file tests, and rsync as the oracle of what a copy must preserve."""
import os
import random
import subprocess


def oracle(src, dst, *extra) -> str:
    cp = subprocess.run(["rsync", "-aHAXn", "--numeric-ids", "--checksum", "-i", *extra, f"{src}/", f"{dst}/"],
                        capture_output=True)
    assert cp.returncode == 0, cp.stderr
    return cp.stdout.decode(errors="replace")


def rich_tree(root, seed=1):
    """Every kind of entry the issue names: odd names, deep nesting, links, holes, xattrs, fifos."""
    rng = random.Random(seed)
    root = os.fsencode(str(root))
    os.makedirs(root)
    j = lambda *p: b"/".join((root,) + p)  # noqa: E731
    os.makedirs(j(b"with space", b"deeper", *[b"n%d" % i for i in range(40)]))
    os.makedirs(j(b"empty dir"))
    for i, name in enumerate([b"plain.txt", b"new\nline", b"\xff\xfe latin-1 \xe9", b"x" * 255, b"-dash"]):
        with open(j(b"with space", name), "wb") as fh:
            fh.write(rng.randbytes(rng.randint(0, 20000)))
    with open(j(b"with space", b"deeper", *[b"n%d" % i for i in range(40)], b"leaf"), "wb") as fh:
        fh.write(b"deep")
    with open(j(b"sparse.img"), "wb") as fh:  # holes must stay holes
        fh.seek(3 << 20)
        fh.write(b"tail data")
        fh.truncate(8 << 20)
    os.link(j(b"with space", b"plain.txt"), j(b"hardlink to plain"))
    os.symlink(b"with space/plain.txt", j(b"rel-link"))
    os.symlink(b"/etc/passwd", j(b"abs-link"))  # kept as a link, never followed
    os.symlink(b"nowhere", j(b"dangling"))
    os.mkfifo(j(b"fifo"))
    os.chmod(j(b"with space", b"-dash"), 0o4751)
    os.chmod(j(b"empty dir"), 0o700)
    os.setxattr(j(b"with space", b"plain.txt"), b"user.note", b"kept")
    if os.geteuid() == 0:
        os.chown(j(b"with space", b"new\nline"), 1234, 5678)
        os.mknod(j(b"null-dev"), 0o600 | 0o020000, os.makedev(1, 3))
        # xattrs of entries that cannot be opened (trusted.* and security.*: user.* is refused
        # there): a symlink's SELinux label must survive a migration as a file's does
        for name in (b"rel-link", b"fifo", b"null-dev"):
            os.setxattr(j(name), b"trusted.label", b"of " + name, follow_symlinks=False)
    os.utime(j(b"with space"), ns=(1, 1_600_000_000_123_456_789))
    return root


def as_nobody(fn):
    """``fn()`` in a forked child that dropped root to nobody (CI runs as root, which reads
    anything: a test of "permission denied" must drop it); its repr()'d result, read back
    with ast.literal_eval. Paths it reads must be open to others: pytest's tmp_path is
    root's alone (use tempfile.mkdtemp and chmod 0755)."""
    import ast

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(rfd)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            os.write(wfd, repr(fn()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    out = b""
    while chunk := os.read(rfd, 4096):
        out += chunk
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return ast.literal_eval(out.decode())
