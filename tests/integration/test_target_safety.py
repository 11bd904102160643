"""The receiver's targets are what the operator said they are, or nothing is written (issue 23).

A missing target path is refused (exit 2, SMS.0808) at start-up and when a session opens it,
unless ``receive --create``; a block device mounted or held by another program is refused
(O_EXCL, exit 2, SMS.2013) and stays claimed while a session writes; ``send files`` to an
image or device and ``send block`` to a directory are the same mistake (exit 2, SMS.2013)
naming target, kind and the command to use; an unknown target name is answered with the
receiver's names, not their paths; a failed write names target, path and offset.
"""
import errno
import hashlib
import mmap
import os
import resource
import shutil
import subprocess
import sys

import pytest

from smsrepl.blocks.target import BlockTarget
from smsrepl.errors import TargetInUseError
from smsrepl.lab.testdata import write_image

from .procs import CLI, ReceiverProc, send, sha256

MiB = 1 << 20


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source.img"
    write_image(str(path), 4 * MiB, seed=5, mix={"random": 1.0})
    return str(path)


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "tree"
    (src / "d").mkdir(parents=True)
    (src / "d" / "small.txt").write_bytes(b"small\n")
    (src / "big.bin").write_bytes(os.urandom(3 * MiB))
    return str(src)


def _receive(certkey, targets, state, *extra) -> subprocess.CompletedProcess:
    """A receiver that is expected to refuse to start (a timeout means it started)."""
    args = CLI + ["receive", "--listen", "127.0.0.1:0", "--certkey", certkey, "--state-dir", str(state), *extra]
    for name, path in targets.items():
        args += ["--target", f"{name}={path}"]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def _send_files(src, address, certkey, target, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["send", "files", src, "--to", address, "--target", target, "--certkey", certkey,
                                 *extra], capture_output=True, text=True, timeout=300)


def _listing(path) -> list:
    return sorted((os.path.relpath(os.path.join(d, n), path) for d, ds, fs in os.walk(path) for n in ds + fs))


# --- 1. a missing target path ------------------------------------------------------------
@pytest.mark.parametrize("what", ["image", "directory"])
def test_a_missing_target_path_keeps_the_receiver_from_starting(tmp_path, certkey_file, what):
    typo = tmp_path / "dev" / ("vdx-typo" if what == "image" else "home-copy")
    (tmp_path / "dev").mkdir()
    cp = _receive(certkey_file, {"disk0": tmp_path / "dev", "d": typo}, tmp_path / "rx")
    assert cp.returncode == 2, cp.stderr
    line = _one_line(cp.stderr)
    assert line.startswith("SMS.0808: ") and f"target 'd' ({typo}) does not exist" in line, line
    assert "--create" in line, line  # says how a lab gets its targets made
    assert not typo.exists() and not (tmp_path / "rx").exists()  # nothing created, not even the state
    assert os.listdir(tmp_path / "dev") == []


def test_a_directory_target_given_by_a_symlink_keeps_the_receiver_from_starting(tmp_path, certkey_file):
    """A tree target's root is opened without following symlinks, as every directory in it: a
    receiver started with one would refuse every session, and its senders retry for ever."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    cp = _receive(certkey_file, {"t": tmp_path / "link"}, tmp_path / "rx")
    assert cp.returncode == 2, cp.stderr
    line = _one_line(cp.stderr)
    assert line.startswith("SMS.2013: ") and "'t'" in line and f"({tmp_path / 'real'})" in line, line
    assert not (tmp_path / "rx").exists() and os.listdir(tmp_path / "real") == []


def test_create_makes_a_missing_image_sized_to_the_source_and_a_missing_directory(tmp_path, certkey_file, source,
                                                                                 tree):
    img, dst = tmp_path / "lab" / "disk.img", tmp_path / "lab" / "tree"
    (tmp_path / "lab").mkdir()
    rx = ReceiverProc(certkey_file, {"disk0": str(img), "t": str(dst)}, str(tmp_path / "rx"), create=True)
    try:
        cp = send(source, rx.address, certkey_file, str(tmp_path / "tx"))
        assert cp.returncode == 0, cp.stderr
        cp = _send_files(tree, rx.address, certkey_file, "t")
        assert cp.returncode == 0, cp.stderr
    finally:
        rx.stop()
    assert os.path.getsize(img) == os.path.getsize(source) and sha256(str(img)) == sha256(source)
    assert _listing(dst) == _listing(tree)


@pytest.mark.parametrize("kind", ["block", "files"])
def test_a_target_gone_after_start_is_refused_to_the_sender_and_not_created(tmp_path, certkey_file, source, tree,
                                                                            kind):
    img, dst = tmp_path / "disk.img", tmp_path / "dst"
    img.write_bytes(b"")
    dst.mkdir()
    rx = ReceiverProc(certkey_file, {"disk0": str(img), "t": str(dst)}, str(tmp_path / "rx"), create=False)
    try:
        img.unlink()
        dst.rmdir()
        if kind == "block":
            cp = send(source, rx.address, certkey_file, str(tmp_path / "tx"))
            name, path = "disk0", img
        else:
            cp = _send_files(tree, rx.address, certkey_file, "t")
            name, path = "t", dst
        alive = rx.proc.poll() is None
    finally:
        rx.stop()
    assert cp.returncode == 2, cp.stderr
    line = _one_line(cp.stderr)
    assert line.startswith("SMS.0808: ") and f"target {name!r} ({path}) does not exist" in line, line
    assert alive  # one session refused, the receiver serves on
    assert not img.exists() and not dst.exists()


def test_names_below_root_are_created_but_the_root_must_exist(tmp_path, certkey_file, source):
    cp = _receive(certkey_file, {}, tmp_path / "rx", "--root", str(tmp_path / "nope"))
    assert cp.returncode == 2 and "is not a directory" in _one_line(cp.stderr), cp.stderr
    assert not (tmp_path / "nope").exists()
    root = tmp_path / "root"
    root.mkdir()
    rx = ReceiverProc(certkey_file, {}, str(tmp_path / "rx"), "--root", str(root), create=False)
    try:
        cp = send(source, rx.address, certkey_file, str(tmp_path / "tx"), "vm1")
    finally:
        rx.stop()
    assert cp.returncode == 0, cp.stderr
    assert sha256(str(root / "vm1")) == sha256(source)


def test_a_name_below_root_that_is_a_symlink_is_refused_as_a_target_of_the_wrong_kind(tmp_path, certkey_file, tree):
    """Not SMS.1901 and exit 3 (a source error a sender retries for ever): exit 2, SMS.2013,
    and nothing written where the symlink points."""
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "esc").symlink_to(elsewhere)
    rx = ReceiverProc(certkey_file, {}, str(tmp_path / "rx"), "--root", str(root), create=False)
    try:
        cp = _send_files(tree, rx.address, certkey_file, "esc", "--state-dir", str(tmp_path / "tx"))
    finally:
        rx.stop()
    assert cp.returncode == 2, cp.stderr
    assert _one_line(cp.stderr).startswith("SMS.2013: ") and "is a symlink" in cp.stderr, cp.stderr
    assert os.listdir(elsewhere) == []


# --- 3. mirror-image mistakes --------------------------------------------------------------
@pytest.fixture
def both_kinds(tmp_path, certkey_file):
    """A receiver with an image target 'disk0' holding data and a directory target 'data' holding a file."""
    img, dst = tmp_path / "disk.img", tmp_path / "data"
    img.write_bytes(b"keep me" * 1000)
    dst.mkdir()
    (dst / "kept.txt").write_bytes(b"kept")
    rx = ReceiverProc(certkey_file, {"disk0": str(img), "data": str(dst)}, str(tmp_path / "rx"), create=False)
    before = sha256(str(img)), _listing(dst)
    yield rx, img, dst
    rx.stop()
    assert (sha256(str(img)), _listing(dst)) == before  # nothing written either way
    assert (dst / "kept.txt").read_bytes() == b"kept"


def test_send_files_to_an_image_target_is_exit_2_sms_2013_naming_what_to_use(tmp_path, certkey_file, tree,
                                                                          both_kinds):
    rx, img, _ = both_kinds
    cp = _send_files(tree, rx.address, certkey_file, "disk0")
    assert cp.returncode == 2, cp.stderr
    line = _one_line(cp.stderr)
    assert line.startswith("SMS.2013: ") and f"target 'disk0' is an image file ({img}), not a directory" in line, line
    assert "`send files` and `verify files` need one; use `send block`" in line, line


@pytest.mark.parametrize("command", ["send", "verify"])
def test_send_block_to_a_directory_target_is_exit_2_sms_2013_naming_what_to_use(tmp_path, certkey_file, source,
                                                                             both_kinds, command):
    rx, _, dst = both_kinds
    if command == "send":
        cp = send(source, rx.address, certkey_file, str(tmp_path / "tx"), "data")
    else:
        cp = subprocess.run(CLI + ["verify", "block", source, "--to", rx.address, "--target", "data",
                                   "--certkey", certkey_file], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 2, cp.stderr
    line = _one_line(cp.stderr)
    assert line.startswith("SMS.2013: ") and f"target 'data' is a directory ({dst})" in line, line
    assert f"`{command} block` needs one; use `{command} files`" in line, line


# --- 5. an unknown target name ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["block", "files"])
def test_an_unknown_target_name_lists_the_receivers_names_not_their_paths(tmp_path, certkey_file, source, tree,
                                                                         both_kinds, kind):
    rx, img, dst = both_kinds
    if kind == "block":
        cp = send(source, rx.address, certkey_file, str(tmp_path / "tx"), "dsk0")
    else:
        cp = _send_files(tree, rx.address, certkey_file, "dsk0")
    assert cp.returncode == 4, cp.stderr  # refused for good: rerunning will not help
    line = _one_line(cp.stderr)
    assert line.startswith("SMS.0808: ") and "no target named 'dsk0'; its targets are: data, disk0" in line, line
    assert str(tmp_path) not in line  # the paths are the receiver's business
    assert not (tmp_path / "dsk0").exists()


# --- 4. a failed write names target, path and offset -----------------------------------------
def test_a_failed_block_write_names_target_path_and_offset(tmp_path, certkey_file, source):
    img = tmp_path / "disk.img"
    rx = ReceiverProc(certkey_file, {"disk0": str(img)}, str(tmp_path / "rx"),
                      env={"SMSREPL_FAULTS": f"enospc@target.write:{2 * MiB}"})
    try:
        cp = send(source, rx.address, certkey_file, str(tmp_path / "tx"), "disk0", "--level", "0")
    finally:
        rx.stop()
    assert cp.returncode == 3, cp.stderr
    line = _one_line(cp.stderr)
    assert line.startswith("SMS.2007: receiver: ") and f"target 'disk0' ({img}): write failed" in line, line
    at = line.split(" at offset ")[1]
    offset, length = int(at.split()[0]), int(at.split("(")[1].split()[0])
    assert offset <= 2 * MiB < offset + length and "No space left on device" in line, line


def test_a_failed_file_write_names_target_and_the_file(tmp_path, certkey_file, tree):
    """A receiver whose files may not grow past 1 MiB (RLIMIT_FSIZE: EFBIG) gets big.bin (3 MiB)."""
    dst = tmp_path / "dst"
    dst.mkdir()
    args = CLI + ["receive", "--listen", "127.0.0.1:0", "--certkey", certkey_file, "--state-dir",
                  str(tmp_path / "rx"), "--target", f"t={dst}"]
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (MiB, MiB))  # noqa: E731
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    try:
        port = proc.stderr.readline().rsplit(":", 1)[1].strip()
        cp = _send_files(tree, f"127.0.0.1:{port}", certkey_file, "t", "--level", "0")
    finally:
        proc.terminate()
        proc.wait(20)
    assert cp.returncode == 3, cp.stderr
    line = _one_line(cp.stderr)
    assert line.startswith("SMS.2007: receiver: ") and f"target 't' ({dst}): writing 'big.bin'" in line, line
    assert "File too large" in line, line
    assert not (dst / "big.bin").exists()  # never under its final name half-written


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "inside a directory target"])
def test_two_targets_that_are_one_keep_the_receiver_from_starting(tmp_path, certkey_file, how):
    """Two names for one image (sessions of both wrote it at once, each reporting success), or a
    target inside a directory target (its file sessions would write or delete it)."""
    img = tmp_path / "t.img"
    img.write_bytes(b"")
    other = {"same path": img, "symlink": tmp_path / "l.img", "hard link": tmp_path / "h.img",
             "inside a directory target": tmp_path}[how]
    if how == "symlink":
        other.symlink_to(img)
    elif how == "hard link":
        os.link(img, other)
    cp = _receive(certkey_file, {"d": img, "e": other}, tmp_path / "rx")
    assert cp.returncode == 2, cp.stderr
    line = _one_line(cp.stderr)
    if how == "inside a directory target":
        assert f"target 'd' ({img}) lies inside target 'e' ({tmp_path})" in line, line
    else:
        assert "targets 'd' and 'e' are the same image file" in line, line
    assert not (tmp_path / "rx").exists()


# --- 2. a block device in use ----------------------------------------------------------------
def _why_no_loop() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop devices, mounts)"
    missing = [t for t in ("losetup", "unshare", "mkfs.ext4", "mount") if shutil.which(t) is None]
    return f"missing tools: {', '.join(missing)}" if missing else None


@pytest.fixture
def loop(tmp_path):
    why = _why_no_loop()
    if why:
        pytest.skip(why)
    image = tmp_path / "loop.img"
    with open(image, "wb") as fh:
        fh.truncate(32 * MiB)
    cp = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True)
    if cp.returncode != 0:
        pytest.skip(f"no free loop device: {cp.stderr.strip()}")
    dev = cp.stdout.strip()
    try:
        subprocess.run(["mkfs.ext4", "-q", dev], check=True, capture_output=True)
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def _device_hash(dev: str) -> str:
    """The device's bytes read with O_DIRECT (what is on it, not what a page cache holds)."""
    h = hashlib.sha256()
    buf = mmap.mmap(-1, MiB)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        pos = 0
        while True:
            n = os.preadv(fd, [buf], pos)
            if n <= 0:
                break
            h.update(buf[:n])
            pos += n
    finally:
        os.close(fd)
        buf.close()
    return h.hexdigest()


def _mounted(dev: str, mnt, *command: str) -> list[str]:
    """``command`` run while ``dev`` is mounted read-only (nothing written to it) at ``mnt``, in a
    private mount namespace of its own: the mount goes with the namespace."""
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount -o ro "$1" "$2" || exit 99; shift 2; "$@"',
            "sh", dev, str(mnt), *command]


def test_a_mounted_device_keeps_the_receiver_from_starting(tmp_path, certkey_file, loop):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = _device_hash(loop)
    cp = subprocess.run(_mounted(loop, mnt, *CLI, "receive", "--listen", "127.0.0.1:0", "--certkey", certkey_file,
                                 "--state-dir", str(tmp_path / "rx"), "--target", f"vdb={loop}"),
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2, cp.stderr
    line = _one_line(cp.stderr)
    assert line.startswith("SMS.2013: ") and f"target 'vdb' ({loop}) is in use (mounted or held by another " \
                                             f"program)" in line, line
    assert _device_hash(loop) == before


def test_a_device_mounted_after_start_is_refused_to_the_sender_untouched(tmp_path, certkey_file, source, loop):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = _device_hash(loop)
    rx = ReceiverProc(certkey_file, {"vdb": loop}, str(tmp_path / "rx"), create=False)
    try:
        cp = subprocess.run(_mounted(loop, mnt, *CLI, "send", "block", source, "--to", rx.address, "--target", "vdb",
                                     "--certkey", certkey_file, "--state-dir", str(tmp_path / "tx")),
                            capture_output=True, text=True, timeout=120)
        alive = rx.proc.poll() is None
    finally:
        rx.stop()
    assert cp.returncode == 2, cp.stderr
    line = _one_line(cp.stderr)
    assert line.startswith("SMS.2013: receiver: ") and f"target 'vdb' ({loop}) is in use" in line, line
    assert alive and _device_hash(loop) == before


def test_a_device_held_open_exclusively_by_another_program_is_refused(tmp_path, certkey_file, loop):
    before = _device_hash(loop)
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; os.open(sys.argv[1], os.O_RDONLY | "
                               "os.O_EXCL); print('held', flush=True); time.sleep(120)", loop],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cp = _receive(certkey_file, {"vdb": loop}, tmp_path / "rx")
    finally:
        holder.kill()
        holder.wait()
    assert cp.returncode == 2, cp.stderr
    assert f"target 'vdb' ({loop}) is in use" in _one_line(cp.stderr), cp.stderr
    assert _device_hash(loop) == before


def test_a_writing_target_keeps_its_device_claimed(loop):
    """While a session has its target open, nobody else can claim (mount) the device."""
    with BlockTarget(loop, create=False, name="vdb", exclusive=True) as target:
        with pytest.raises(OSError) as exc:
            os.close(os.open(loop, os.O_RDONLY | os.O_EXCL))
        assert exc.value.errno == errno.EBUSY
        with pytest.raises(TargetInUseError, match=f"target 'vdb' \\({loop}\\) is in use"):
            BlockTarget(loop, create=False, name="vdb", exclusive=True)
        assert target.is_device
    os.close(os.open(loop, os.O_RDONLY | os.O_EXCL))  # let go with the target


def test_a_free_device_is_written_and_let_go_after_the_session(tmp_path, certkey_file, source, loop):
    rx = ReceiverProc(certkey_file, {"vdb": loop}, str(tmp_path / "rx"), create=False)
    try:
        cp = send(source, rx.address, certkey_file, str(tmp_path / "tx"), "vdb")
        assert cp.returncode == 0, cp.stderr
        os.close(os.open(loop, os.O_RDONLY | os.O_EXCL))  # the session ended: nobody holds it
    finally:
        rx.stop()
    size = os.path.getsize(source)
    fd = os.open(loop, os.O_RDONLY)
    try:
        assert hashlib.sha256(os.pread(fd, size, 0)).hexdigest() == sha256(source)
    finally:
        os.close(fd)


def test_a_long_list_of_names_is_cut_short():
    from smsrepl.transport.targets import LIST_NAMES, unknown

    err = unknown("x", {f"d{i:03}": f"/srv/d{i}" for i in range(LIST_NAMES + 5)})
    assert err.code == "SMS.0808" and err.exit_code == 4
    assert err.message.endswith(f"d{LIST_NAMES - 1:03} and 5 more") and "/srv" not in err.message, err.message


def test_an_image_that_backs_a_loop_device_is_refused_at_start_and_when_attached_later(tmp_path, certkey_file,
                                                                                         source, loop):
    """Writing the file under a loop device changes that disk (and what is mounted from it)
    under the kernel: SMS.2013, exit 2, nothing written."""
    image = tmp_path / "loop.img"
    before = sha256(str(image))
    cp = _receive(certkey_file, {"bi": image}, tmp_path / "rx")
    assert cp.returncode == 2, cp.stderr
    line = _one_line(cp.stderr)
    assert line.startswith("SMS.2013: ") and f"is the backing file of {loop}" in line, line
    # attached after the receiver started: the session is refused
    other = tmp_path / "other.img"
    with open(other, "wb") as fh:
        fh.truncate(32 * MiB)
    rx = ReceiverProc(certkey_file, {"o": str(other)}, str(tmp_path / "rx2"))
    dev = subprocess.run(["losetup", "-f", "--show", str(other)], capture_output=True, text=True).stdout.strip()
    try:
        assert dev, "no free loop device"
        cp = send(source, rx.address, certkey_file, str(tmp_path / "tx"), "o")
    finally:
        if dev:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        rx.stop()
    assert cp.returncode == 2, cp.stderr
    assert f"is the backing file of {dev}" in cp.stderr, cp.stderr
    assert sha256(str(image)) == before and not any(open(other, "rb").read(4 * MiB))
