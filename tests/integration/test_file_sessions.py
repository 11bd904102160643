"""File sessions over loopback TLS: send files -> receive, with rsync as the oracle."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from smsrepl import kernels
from smsrepl.errors import RefusedError, RemoteError
from smsrepl.files.rules import PathRules
from smsrepl.transport.file_sender import FileSender
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.tls import client_context, server_context

from files.trees import oracle, rich_tree

pytestmark = pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync (the oracle) is not installed")


@pytest.fixture
def rx(tmp_path, bundle):
    receiver = Receiver({"tree": str(tmp_path / "dst"), "img": str(tmp_path / "disk.img")}, server_context(bundle),
                        str(tmp_path / "rx-state"), idle_timeout=10, create=True)
    host, port = receiver.start()
    yield receiver, (host, port)
    receiver.stop()


def send(src, addr, bundle, **kw):
    return FileSender(os.fsdecode(src), kw.pop("target", "tree"), addr, client_context(bundle), **kw).run()


def test_full_copy_then_sync_rounds_over_tls(tmp_path, rx, bundle):
    _, addr = rx
    src = rich_tree(tmp_path / "src")
    dst = tmp_path / "dst"
    big = os.fsencode(str(tmp_path / "src")) + b"/big.bin"
    with open(big, "wb") as fh:  # larger than one inline operation: BEGIN, CHUNKs, END
        fh.write(os.urandom(3 << 20) + bytes(2 << 20) + b"end")
    first = send(src, addr, bundle)
    assert first.kind == "full" and first.stats.files_sent == 8
    assert oracle(os.fsdecode(src), dst) == ""
    again = send(src, addr, bundle)
    assert again.kind == "sync" and again.stats.files_sent == 0 and again.stats.deleted == 0
    s = os.fsdecode(src)
    with open(f"{s}/big.bin", "r+b") as fh:
        fh.seek(1 << 20)
        fh.write(b"changed")
    os.unlink(f"{s}/with space/plain.txt")
    shutil.rmtree(f"{s}/with space/deeper")
    os.makedirs(f"{s}/cache/tmp")
    open(f"{s}/cache/tmp/x", "w").write("excluded from sync rounds")
    rules = PathRules.from_configurations({"configurations": [
        {"config_key": "SYNC_EXCLUDE_PATH", "config_value": "/cache"}]})
    third = send(src, addr, bundle, rules=rules, max_delete=-1)  # 43 of 57 entries go: past the default guard
    # big.bin, and the other name of the deleted plain.txt: no longer a hard link there
    assert third.kind == "sync" and third.stats.files_sent == 2 and third.stats.deleted >= 2
    assert oracle(s, dst, "--exclude=/cache", "--delete") == ""
    assert not (dst / "cache").exists()


def test_refusals_name_the_problem(tmp_path, rx, bundle):
    _, addr = rx
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    with pytest.raises(RemoteError, match="no target named 'nope'; its targets are: img, tree") as exc:
        send(src, addr, bundle, target="nope")
    assert exc.value.exit_code == RefusedError.exit_code
    (tmp_path / "disk.img").write_bytes(b"")  # a file: block sessions only
    with pytest.raises(RemoteError, match="not a directory"):
        send(src, addr, bundle, target="img")
    assert (tmp_path / "disk.img").read_bytes() == b""


def test_cli_send_files_and_verify(tmp_path, certkey_file):
    src = rich_tree(tmp_path / "src")
    dst = tmp_path / "dst"
    rx = subprocess.Popen([sys.executable, "-m", "smsrepl", "receive", "--listen", "127.0.0.1:0", "--certkey",
                           certkey_file, "--create", "--target", f"t={dst}", "--state-dir", str(tmp_path / "rxs"), "--once"],
                          stderr=subprocess.PIPE, text=True)
    try:
        line = rx.stderr.readline()
        port = line.rsplit(":", 1)[1].strip()
        cp = subprocess.run([sys.executable, "-m", "smsrepl", "send", "files", "--json", os.fsdecode(src), "--to",
                             f"127.0.0.1:{port}", "--target", "t", "--certkey", certkey_file],
                            capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stderr
        summary = json.loads(cp.stdout)
        assert summary["kind"] == "full" and summary["files_sent"] == 7
        assert rx.wait(30) == 0
    finally:
        rx.kill()
    assert oracle(os.fsdecode(src), dst) == ""
    cp = subprocess.run([sys.executable, "-m", "smsrepl", "verify", "files", os.fsdecode(src), str(dst)],
                        capture_output=True, text=True)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def _raw_session(addr, bundle, target="tree"):
    from smsrepl.protocol import CAPABILITIES, PROTOCOL_VERSION, SENDER, Connection
    from smsrepl.protocol import frames as F
    from smsrepl.transport.channel import Channel
    from smsrepl.transport.connect import connect

    chan = Channel(connect(addr, client_context(bundle)), Connection(SENDER))
    chan.send(F.Hello([PROTOCOL_VERSION], "files", target, "hostile", 0, 4096, list(CAPABILITIES)))
    assert isinstance(chan.recv(), F.Welcome)
    chan.send(F.RoundBegin(1, "full", 0))
    return chan


@pytest.mark.reliability("hostile peer", "file sender names paths outside the root")
@pytest.mark.parametrize("path", [b"../escape", b"/tmp/escape-abs", b"a/../../escape", b"link/escape"])
def test_hostile_sender_cannot_write_outside_the_target(tmp_path, rx, bundle, path):
    from smsrepl.files import wire as W
    from smsrepl.files.scan import Entry
    from smsrepl.protocol import frames as F

    _, addr = rx
    dst = tmp_path / "dst"
    dst.mkdir()
    os.symlink(tmp_path, dst / "link")  # planted: a write through it would land outside
    chan = _raw_session(addr, bundle)
    body = b"".join(W.encode_op(W.FILE, Entry(path, "file", 0o644, 0, 0, 5, 0, 0, 0, 1, 0), data=b"owned"))
    chan.send(F.FileOps(0, len(body), body))
    ev = chan.recv()
    chan.close()
    assert isinstance(ev, F.Error) and (ev.code == "SMS.1908" or "symlink" in ev.message), ev
    assert not list(tmp_path.glob("escape*")) and not os.path.exists("/tmp/escape-abs")
    assert sorted(os.listdir(dst)) == ["link"]


@pytest.mark.reliability("hostile peer", "file operations out of order")
def test_operations_out_of_place_are_refused(tmp_path, rx, bundle):
    from smsrepl.files import wire as W
    from smsrepl.protocol import frames as F

    _, addr = rx
    chan = _raw_session(addr, bundle)
    body = b"".join(W.encode_op(W.CHUNK, data=b"data without a file"))
    chan.send(F.FileOps(0, len(body), body))
    ev = chan.recv()
    chan.close()
    assert isinstance(ev, F.Error) and "CHUNK out of place" in ev.message




@pytest.mark.reliability("fault", "kill -9 of a file sender, then rerun")
@pytest.mark.parametrize("seed", range(4))
def test_killed_sender_then_rerun_ends_identical_without_temporaries(tmp_path, rx, bundle, certkey_file, seed):
    import random
    import signal
    import time

    from smsrepl.files.names import TEMP_RE

    _, (host, port) = rx
    rng = random.Random(seed)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(40):
        (src / f"f{i:03}").write_bytes(rng.randbytes(rng.randint(1, 2 << 20)))
    cmd = [sys.executable, "-m", "smsrepl", "send", "files", "--json", str(src), "--to", f"{host}:{port}", "--target", "tree",
           "--certkey", certkey_file, "--level", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.3, 1.2))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for name in os.listdir(dst) if dst.exists() else []:
        if not TEMP_RE.match(name.encode()):
            assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    deadline = time.time() + 20
    while True:  # the receiver notices the cut and frees the target
        cp = subprocess.run(cmd, capture_output=True, text=True)
        if cp.returncode == 0 or time.time() > deadline or "busy" not in cp.stderr:
            break
        time.sleep(0.2)
    assert cp.returncode == 0, cp.stderr
    assert oracle(str(src), dst) == ""
    assert not [n for n in os.listdir(dst) if TEMP_RE.match(n.encode())]


def test_insert_in_a_large_file_sends_a_delta(tmp_path, rx, bundle):
    import numpy as np

    _, addr = rx
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, 48 << 20, dtype=np.uint8).tobytes()  # incompressible: only a delta helps
    (src / "big.bin").write_bytes(data)
    send(src, addr, bundle, level=0)
    mid = len(data) // 2 + 12345
    (src / "big.bin").write_bytes(data[:mid] + b"X" * 100 + data[mid:])
    (src / "small.txt").write_bytes(b"new")
    res = send(src, addr, bundle, level=0)
    assert res.kind == "sync" and res.stats.files_sent == 2
    assert res.wire_bytes < 0.01 * len(data), res.wire_bytes
    assert 100 <= res.literal_bytes < 3 * 32768
    assert (dst / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    assert oracle(str(src), dst) == ""


def test_delta_against_a_corrupted_basis_is_caught_by_the_digest(tmp_path, rx, bundle):
    # the receiver's copy changed behind our back after the signature: END's digest catches it
    import numpy as np

    from smsrepl.files import remote

    _, addr = rx
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    data = np.random.default_rng(6).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    (src / "f.bin").write_bytes(data)
    send(src, addr, bundle, level=0)
    (src / "f.bin").write_bytes(data[:1000] + b"Y" + data[1000:])
    real = remote.DeltaSink.__init__

    def init(self, *a, **kw):
        real(self, *a, **kw)
        with open(dst / "f.bin", "r+b") as fh:  # after the signature was taken
            fh.seek(2 << 20)
            fh.write(b"corrupt")

    remote.DeltaSink.__init__ = init
    try:
        with pytest.raises(RemoteError, match="does not match its digest"):
            send(src, addr, bundle, level=0)
    finally:
        remote.DeltaSink.__init__ = real
    assert (dst / "f.bin").read_bytes()[:1001] != (src / "f.bin").read_bytes()[:1001]  # old copy kept
    res = send(src, addr, bundle, level=0)  # the next round repairs it
    assert (dst / "f.bin").read_bytes() == (src / "f.bin").read_bytes() and res.stats.files_sent == 1


def test_progress_reports_and_speed_limit(tmp_path, rx, bundle):
    import time

    from smsrepl.control.progress import report_problems
    from smsrepl.throttle import SpeedSchedule

    _, addr = rx
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"f{i}").write_bytes(os.urandom(200_000))
    reports = []
    slow = SpeedSchedule.from_json({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 16}]})
    t0 = time.monotonic()
    res = send(src, addr, bundle, level=0, speed_limit=slow, on_report=reports.append)
    took = time.monotonic() - t0
    assert took >= 2.4, took  # 6 MB at 2 MB/s, less the token bucket's first burst
    assert res.kind == "full" and len(reports) >= 2
    assert [report_problems(r) for r in reports] == [[]] * len(reports)
    assert {r["subtask_name"] for r in reports} == {"MIGRATE_LINUX_FILE"}
    progress = [r["progress"] for r in reports]
    assert progress == sorted(progress) and progress[-1] == 100 and progress[0] < 100
    (src / "f0").write_bytes(b"changed")
    reports.clear()
    send(src, addr, bundle, on_report=reports.append)
    assert reports[-1]["subtask_name"] == "SYNC_LINUX_FILE" and reports[-1]["progress"] == 100


def test_remote_verify_counts_equal_local_verify(tmp_path, rx, bundle, certkey_file):
    from smsrepl.files.compare import compare_trees, compare_with_listing

    (_, (host, port)) = rx
    src = rich_tree(tmp_path / "src")
    dst = tmp_path / "dst"
    send(src, (host, port), bundle)
    s = os.fsdecode(src)
    (dst / "with space" / "plain.txt").write_bytes(b"differs")  # content
    os.chmod(dst / "sparse.img", 0o600)  # metadata
    os.unlink(dst / "rel-link")  # missing
    (dst / "extra").write_bytes(b"+")  # extra
    describe = FileSender(s, "tree", (host, port), client_context(bundle)).describe_target
    for mode, different in (("all", 3), ("data", 2)):  # the chmod counts with metadata only
        remote, rchecks = compare_with_listing(s, describe, ["/", "/with space"], mode=mode)
        local, lchecks = compare_trees(s, str(dst), ["/", "/with space"], mode=mode)
        assert remote["consistency_result"] == local["consistency_result"]
        assert [c.combined() for c in rchecks] == [c.combined() for c in lchecks]
        entry = remote["consistency_result"][0]
        assert (entry["num_different_files"], entry["num_target_miss_files"],
                entry["num_target_more_files"]) == (different, 1, 1), mode
    cp = subprocess.run([sys.executable, "-m", "smsrepl", "verify", "files", s, "--to", f"{host}:{port}",
                         "--target", "tree", "--certkey", certkey_file], capture_output=True, text=True)
    assert cp.returncode == 1, cp.stderr
    assert json.loads(cp.stdout)["consistency_result"] == [local["consistency_result"][0]]


# --- from review: hostile metadata operations, excluded content, kind changes, ONLY_SYNC, keepalive ---

def _meta_op(path, kind, mode):
    from smsrepl.files import wire as W
    from smsrepl.files.scan import Entry

    return b"".join(W.encode_op(W.META, Entry(path, kind, mode, 0, 0, 0, 0, 0, 0, 1, 0)))


def test_meta_for_another_kind_never_reaches_through_a_symlink_nor_blocks_on_a_fifo(tmp_path, rx, bundle):
    import stat as st_

    from smsrepl.protocol import frames as F

    _, addr = rx
    dst = tmp_path / "dst"
    dst.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"secret")
    os.chmod(victim, 0o600)
    os.symlink(victim, dst / "link")
    os.mkfifo(dst / "pipe")
    for path, kind in ((b"link", "fifo"), (b"pipe", "file")):
        chan = _raw_session(addr, bundle)
        body = _meta_op(path, kind, 0o777)
        chan.send(F.FileOps(0, len(body), body))
        ev = chan.recv()  # an answer, not a hang
        chan.close()
        assert isinstance(ev, F.Error) and ev.code == "SMS.1908", ev
    assert st_.S_IMODE(os.stat(victim).st_mode) == 0o600


def test_a_target_that_cannot_be_created_is_an_error_the_sender_hears(tmp_path, bundle):
    rx = Receiver({"t": str(tmp_path / "missing" / "parent" / "dst")}, server_context(bundle), str(tmp_path / "st"), create=True)
    addr = rx.start()
    try:
        src = tmp_path / "src"
        src.mkdir()
        with pytest.raises(RemoteError, match="cannot create") as exc:
            send(src, addr, bundle, target="t")
        assert exc.value.code == "SMS.2007"
    finally:
        rx.stop()


def test_sync_keeps_excluded_content_of_a_removed_directory(tmp_path, rx, bundle):
    _, addr = rx
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d" / "keep").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"f")
    (src / "d" / "keep" / "k").write_bytes(b"k")
    send(src, addr, bundle)
    shutil.rmtree(src / "d")
    rules = PathRules.from_configurations({"configurations": [
        {"config_key": "SYNC_EXCLUDE_PATH", "config_value": "/d/keep"}]})
    res = send(src, addr, bundle, rules=rules)
    assert (dst / "d" / "keep" / "k").read_bytes() == b"k" and not (dst / "d" / "f").exists()
    assert res.stats.deleted == 2  # d/f, and d itself, which stays: it is not empty


def test_removed_xattrs_and_kind_changes_reach_the_target(tmp_path, rx, bundle):
    _, addr = rx
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "x").write_bytes(b"x")
    (src / "f").write_bytes(b"f")
    os.setxattr(src / "f", "user.a", b"1")
    send(src, addr, bundle)
    assert os.listxattr(dst / "f") == ["user.a"]
    os.removexattr(src / "f", "user.a")
    shutil.rmtree(src / "d")
    (src / "d").write_bytes(b"now a file")
    send(src, addr, bundle)
    assert os.listxattr(dst / "f") == [] and (dst / "d").read_bytes() == b"now a file"
    assert oracle(str(src), dst, "--delete") == ""


@pytest.mark.skipif(not kernels.TREE, reason="the no-xattrs cache belongs to the native scan")
def test_xattrs_set_after_entries_were_cached_as_bare_reach_the_target_on_either_side(tmp_path, rx, bundle):
    """Rounds of one process remember entries without xattrs (by their ctime); an xattr set
    later on the source, or on the target behind the receiver's back, is still seen."""
    import time

    _, addr = rx
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(10):
        (src / f"f{i}").write_bytes(b"%d" % i)
    kernels.xattr_cache(clear=True, min_age=0)  # trust ctimes of any age: the rounds are seconds apart
    try:
        for _ in range(3):  # the sender knows the source's entries from the first, the receiver
            send(src, addr, bundle)  # the target's from the second
        assert kernels.xattr_cache()[1] >= 30
        time.sleep(0.05)  # past the ctime clock's tick
        os.setxattr(src / "f1", "user.src", b"on the source")
        os.setxattr(dst / "f2", "user.stray", b"on the target only")
        assert oracle(str(src), dst) != ""
        send(src, addr, bundle)
        assert os.listxattr(dst / "f1") == ["user.src"] and os.listxattr(dst / "f2") == []
        assert oracle(str(src), dst) == ""
    finally:
        kernels.xattr_cache(clear=True, min_age=2.0)


def test_only_sync_creates_the_directories_on_the_way(tmp_path, rx, bundle):
    _, addr = rx
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "x").mkdir(parents=True)
    send(src, addr, bundle)
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f").write_bytes(b"f")
    (src / "a" / "other").write_bytes(b"not synced")
    rules = PathRules.from_configurations({"configurations": [
        {"config_key": "ONLY_SYNC_PATH", "config_value": "/a/b"}]})
    send(src, addr, bundle, rules=rules)
    assert (dst / "a" / "b" / "f").read_bytes() == b"f" and not (dst / "a" / "other").exists()


def test_a_long_quiet_sync_round_keeps_the_connection_alive(tmp_path, bundle, monkeypatch):
    from smsrepl.files import opstream, remote

    # idle timeout 2 s, a keepalive every 0.2 s: a 1.8 s stall of a busy machine is needed to fail it
    rx = Receiver({"t": str(tmp_path / "dst")}, server_context(bundle), str(tmp_path / "st"), idle_timeout=2, create=True)
    addr = rx.start()
    try:
        src = tmp_path / "src"
        src.mkdir()
        for i in range(300):
            (src / f"f{i}").write_bytes(b"x")
        monkeypatch.setattr(opstream, "KEEPALIVE", 0.2)
        send(src, addr, bundle, target="t")
        real = remote.RemoteTarget.set_meta

        def slow(self, e):  # every unchanged file takes a while: the round is quiet for 4 s at least
            time.sleep(0.014)
            real(self, e)

        import time
        monkeypatch.setattr(remote.RemoteTarget, "set_meta", slow)
        res = send(src, addr, bundle, target="t")
        assert res.kind == "sync" and res.stats.unchanged == 300
    finally:
        rx.stop()


def test_receive_root_serves_named_targets_below_it_only(tmp_path, bundle):
    from smsrepl.transport.receiver import RootTargets

    base = tmp_path / "root"
    base.mkdir()
    rx = Receiver(RootTargets(str(base)), server_context(bundle), str(tmp_path / "st"))
    addr = rx.start()
    try:
        src = rich_tree(tmp_path / "src")
        send(src, addr, bundle, target="home")
        assert oracle(os.fsdecode(src), base / "home") == ""
        from smsrepl.protocol import CAPABILITIES, PROTOCOL_VERSION, SENDER, Connection
        from smsrepl.protocol import frames as F
        from smsrepl.transport.channel import Channel
        from smsrepl.transport.connect import connect

        for name in ("..", "a/b", ""):  # a hostile sender naming a way out of the root
            chan = Channel(connect(addr, client_context(bundle)), Connection(SENDER))
            chan.send(F.Hello([PROTOCOL_VERSION], "files", name, "x", 0, 4096, list(CAPABILITIES)))
            ev = chan.recv()
            chan.close()
            assert isinstance(ev, F.Error) and f"no target named {name!r}" in ev.message, ev
    finally:
        rx.stop()
    assert sorted(os.listdir(base)) == ["home"]


def test_cli_continuous_file_sync_rounds_on_sigusr1_and_cuts_over_on_sigterm(tmp_path, certkey_file):
    import signal

    from .procs import ReceiverProc

    src = rich_tree(tmp_path / "src")
    dst = tmp_path / "dst"
    rx = ReceiverProc(certkey_file, {"t": str(dst)}, str(tmp_path / "rxs"))
    tx = subprocess.Popen([sys.executable, "-m", "smsrepl", "send", "files", "--json", os.fsdecode(src), "--to", rx.address,
                           "--target", "t", "--certkey", certkey_file, "--continuous", "--interval", "3600"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import queue
    import threading

    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in tx.stdout], daemon=True).start()
    summary = lambda: json.loads(lines.get(timeout=60))  # noqa: E731  (Empty: no round came)
    try:
        first = summary()
        assert first["kind"] == "full" and first["files_sent"] == 7
        assert oracle(os.fsdecode(src), dst) == ""
        added = os.path.join(src, b"added.txt")
        with open(added, "wb") as fh:
            fh.write(b"new since the copy\n")
        tx.send_signal(signal.SIGUSR1)  # the SYNC command: a round now, not in an hour
        second = summary()
        assert second["kind"] == "sync" and second["files_sent"] == 1 and second["round"] == first["round"] + 1
        assert oracle(os.fsdecode(src), dst) == ""
        os.unlink(added)
        tx.send_signal(signal.SIGTERM)  # the cutover round, then exit 0
        last = summary()
        assert tx.wait(60) == 0
        assert last["kind"] == "sync" and last["deleted"] == 1 and "cutover" in tx.stderr.read()
    finally:
        tx.kill()
        rx.stop()
    assert oracle(os.fsdecode(src), dst) == ""


@pytest.mark.reliability("fault", "kill -9 of the receiver under a continuous file sync, then restart")
@pytest.mark.parametrize("seed", range(2))
def test_continuous_file_sync_survives_a_killed_receiver_and_ends_identical(tmp_path, certkey_file, seed):
    """The round the kill cut fails; the session retries it against the restarted receiver,
    which removes the temporaries the kill left; SIGTERM's cutover round ends identical."""
    import random
    import signal
    import time

    from smsrepl.files.names import TEMP_RE

    from .procs import ReceiverProc

    rng = random.Random(seed)
    src, dst = tmp_path / "src", tmp_path / "dst"
    for d in range(4):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(30):
            (src / f"d{d}" / f"f{i:03}").write_bytes(rng.randbytes(rng.randint(1, 256 << 10)))
    rx = ReceiverProc(certkey_file, {"t": str(dst)}, str(tmp_path / "rxs"))
    tx = subprocess.Popen([sys.executable, "-m", "smsrepl", "send", "files", "--json", str(src), "--to", rx.address,
                           "--target", "t", "--certkey", certkey_file, "--level", "0", "--continuous",
                           "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (dst.exists() and any(dst.iterdir())):  # the copy is under way
            assert time.monotonic() < deadline and tx.poll() is None
            time.sleep(0.005)
        rx.kill()
        rx = ReceiverProc(certkey_file, {"t": str(dst)}, str(tmp_path / "rxs"), port=rx.port)
        for i in range(40):  # work for the rounds after the retry, cut at a random time again
            (src / "d1" / f"new{i:02}").write_bytes(rng.randbytes(256 << 10))
        time.sleep(rng.uniform(1.9, 2.6))  # the session retries a failed round after 2 s
        rx.kill()
        rx = ReceiverProc(certkey_file, {"t": str(dst)}, str(tmp_path / "rxs"), port=rx.port)
        time.sleep(0.5)
        tx.send_signal(signal.SIGTERM)  # the cutover round, then exit 0
        out, err = tx.communicate(timeout=120)
        assert tx.returncode == 0, err
    finally:
        tx.kill()
        rx.stop()
    assert json.loads(out.splitlines()[-1])["kind"] in ("full", "sync")  # the cutover round's summary
    assert oracle(str(src), dst) == ""
    assert not [p for p in dst.rglob("*") if TEMP_RE.match(p.name.encode())]


@pytest.mark.parametrize("args,match", [
    (["receive", "--listen", "127.0.0.1:0", "--certkey", "{ck}", "--root", "{tmp}/nope"], "is not a directory"),
    (["receive", "--listen", "127.0.0.1:0", "--certkey", "{ck}", "--root", "{tmp}", "--target", "a={tmp}/a"],
     "not both"),
    (["verify", "files", "{tmp}", "--to", "127.0.0.1:1"], "needs --target NAME and --certkey"),
    (["verify", "files", "{tmp}", "{tmp}", "--to", "127.0.0.1:1"], "give TARGET_DIR, or --to"),
    (["send", "files", "--json", "{tmp}", "--to", "127.0.0.1:1", "--target", "t", "--certkey", "{ck}", "--config", "{tmp}/bad.json"],
     "unknown config_key 'EXCLUDE'"),
    (["send", "files", "--json", "{tmp}/nope", "--to", "127.0.0.1:1", "--target", "t", "--certkey", "{ck}"],
     "source '{tmp}/nope' does not exist"),
    (["send", "files", "--json", "{tmp}/bad.json", "--to", "127.0.0.1:1", "--target", "t", "--certkey", "{ck}"],
     "source '{tmp}/bad.json' is not a directory"),
    (["send", "files", "--json", "{tmp}", "--to", "127.0.0.1:1", "--target", "t", "--certkey", "{ck}", "--interval", "5"],
     "--interval applies to --continuous only"),
    (["send", "files", "--json", "{tmp}", "--to", "127.0.0.1:1", "--target", "t", "--certkey", "{ck}", "--continuous",
      "--interval", "-1"], "must be between 0 and 86400"),
])
def test_cli_bad_input_for_file_entry_points(tmp_path, certkey_file, args, match):
    (tmp_path / "bad.json").write_text(json.dumps({"configurations": [{"config_key": "EXCLUDE", "config_value": "/x"}]}))
    argv = [a.format(ck=certkey_file, tmp=tmp_path) for a in args]
    cp = subprocess.run([sys.executable, "-m", "smsrepl", *argv], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2 and match.format(tmp=tmp_path) in cp.stderr, (cp.returncode, cp.stderr)
    assert sorted(os.listdir(tmp_path)) == ["bad.json"]  # nothing created


def test_a_round_decided_while_the_listing_streams_ends_identical(tmp_path, rx, bundle, monkeypatch):
    """One directory per TREE_DATA: the sender decides each directory while later ones are
    still arriving; what goes below a deleted directory is only known from those."""
    from smsrepl import kernels
    from smsrepl.files import describe, listing

    monkeypatch.setattr(describe, "STREAM_BATCH", 1)
    followed = []
    follow = listing.Listing.follow
    monkeypatch.setattr(listing.Listing, "follow", lambda self, *a: followed.append(1) or follow(self, *a))
    _, addr = rx
    src, dst = tmp_path / "src", tmp_path / "dst"
    for d in range(6):
        for s in range(4):
            os.makedirs(src / f"d{d}" / f"s{s}" / "deep")
            for k in range(5):
                (src / f"d{d}" / f"s{s}" / f"f{k}").write_bytes(b"%d-%d-%d" % (d, s, k) * (k + 1))
            (src / f"d{d}" / f"s{s}" / "deep" / "leaf").write_bytes(b"leaf")
    assert send(src, addr, bundle).kind == "full"
    assert oracle(os.fsdecode(src), dst) == ""
    shutil.rmtree(src / "d1")  # a whole subtree goes: its deeper directories are listed later
    shutil.rmtree(src / "d2" / "s3")
    shutil.rmtree(src / "d3" / "s0")
    (src / "d3" / "s0").write_bytes(b"a file where a directory was")
    os.unlink(src / "d4" / "s1" / "f2")
    os.makedirs(src / "d4" / "s1" / "f2")  # and a directory where a file was
    (src / "d5" / "s2" / "deep" / "leaf").write_bytes(b"changed leaf")
    os.makedirs(src / "d0" / "new" / "newer")
    (src / "d0" / "new" / "newer" / "x").write_bytes(b"new")
    again = send(src, addr, bundle)
    assert again.kind == "sync" and again.stats.deleted >= 30
    assert oracle(os.fsdecode(src), dst, "--delete") == ""
    assert followed == ([1] if kernels.TREE else [])  # the full round's listing was one (empty) frame


def test_the_file_sender_module_leaves_the_round_machinery_for_later():
    """The CLI sends HELLO and TREE_REQUEST (FileSender.open) before the round's modules load:
    the receiver lists its tree meanwhile."""
    code = ("import sys, smsrepl.cli, smsrepl.transport.file_sender; "
            "print(sorted(m for m in sys.modules if m.startswith(('smsrepl.files', 'smsrepl.control.progress'))))")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == "[]"


def test_a_sender_may_ask_for_the_tree_before_welcome():
    from smsrepl.protocol import CAPABILITIES, PROTOCOL_VERSION, RECEIVER, SENDER, Connection
    from smsrepl.protocol import frames as F

    tx, rx = Connection(SENDER), Connection(RECEIVER)
    wire = b"".join(bytes(p) for ev in (F.Hello([PROTOCOL_VERSION], "files", "t", "s", 0, 4096, list(CAPABILITIES)),
                                        F.TreeRequest(False)) for p in tx.send(ev))
    rx.receive_data(wire)
    assert isinstance(rx.next_event(), F.Hello)
    rx.send(F.Welcome(PROTOCOL_VERSION, "s", 0, "new", 0, "full", 0, "", capabilities=list(CAPABILITIES)))
    assert isinstance(rx.next_event(), F.TreeRequest)
    with pytest.raises(Exception, match="cannot send RoundBegin"):
        tx.send(F.RoundBegin(1, "full", 0))  # a round still waits for WELCOME


@pytest.mark.reliability("receiver under faults", "file session dropped silently: the rerun takes the target back")
def test_a_silently_dropped_file_session_does_not_hold_its_target(tmp_path, certkey_file):
    """A middlebox stops forwarding without closing anything, and the source side restarts: the
    receiver's connection stays open and quiet (its idle timeout is 120 s). The rerun from the
    same tree is the same sender, and takes the target back at once."""
    import random
    import time

    from .procs import CuttingProxy, ReceiverProc

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    rng = random.Random(3)
    for i in range(60):
        (src / f"f{i:03}").write_bytes(rng.randbytes(256 << 10))
    rx = ReceiverProc(certkey_file, {"tree": str(dst)}, str(tmp_path / "rx"))
    proxy = CuttingProxy(rx.port, 2 << 20, silent=True)

    def cmd(port: int) -> list[str]:
        return [sys.executable, "-m", "smsrepl", "send", "files", "--json", str(src), "--to", f"127.0.0.1:{port}",
                "--target", "tree", "--certkey", certkey_file, "--level", "0"]

    try:
        first = subprocess.Popen(cmd(proxy.port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert proxy.stalled.wait(60), "the first sender never got 2 MiB through"
        first.kill()
        first.wait()
        t0 = time.monotonic()
        cp = subprocess.run(cmd(rx.port), capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
        print(f"rerun after a silently dropped session: {took:.1f} s")  # for -s
    finally:
        proxy.close()
        rx.stop()
    assert cp.returncode == 0, cp.stderr
    assert took < 15, took
    assert oracle(str(src), dst) == ""


@pytest.mark.reliability("receiver under faults", "concurrent file senders under a 4096-descriptor limit")
def test_concurrent_file_senders_share_the_receivers_descriptors(tmp_path, certkey_file):
    """Sixteen senders of 2,000-file trees at once into one receiver whose hard limit of open
    files is 4096. Each session used to take up to a quarter of the limit for files waiting for
    their syncfs: 7 of 8 failed with 'Too many open files'. They share one budget now."""
    import random
    import re
    import resource

    src, root = tmp_path / "src", tmp_path / "root"
    rng = random.Random(11)
    for d in range(20):
        (src / f"d{d:02}").mkdir(parents=True)
        for f in range(100):
            (src / f"d{d:02}" / f"f{f:03}").write_bytes(rng.randbytes(rng.randint(1, 6000)))
    root.mkdir()

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096))

    rx = subprocess.Popen([sys.executable, "-m", "smsrepl", "receive", "--listen", "127.0.0.1:0", "--certkey",
                           certkey_file, "--state-dir", str(tmp_path / "rx"), "--root", str(root)],
                          stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    try:
        port = int(re.search(r"listening on [\d.]+:(\d+)", rx.stderr.readline()).group(1))
        senders = [subprocess.Popen([sys.executable, "-m", "smsrepl", "send", "files", "--json", str(src), "--to",
                                     f"127.0.0.1:{port}", "--target", f"t{i}", "--certkey", certkey_file],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                   for i in range(16)]
        results = [(p.wait(300), p.stderr.read()) for p in senders]
    finally:
        rx.terminate()
        rx.wait(30)
    assert [rc for rc, _ in results] == [0] * 16, [err for rc, err in results if rc]
    for i in range(16):
        assert oracle(str(src), root / f"t{i}") == "", i


def test_a_receiver_waiting_long_for_the_disk_keeps_the_sender_from_timing_out(tmp_path, bundle, monkeypatch):
    """syncfs waits for every writer of the file system: on a busy disk the end of a round
    can take longer than the sender's I/O timeout. The receiver sends PONGs meanwhile (here:
    a 0.2 s keepalive against a 1 s timeout and a barrier of 2.5 s)."""
    from smsrepl.files.apply import TreeWriter
    from smsrepl.transport import connect, limits

    monkeypatch.setattr(connect, "IO_TIMEOUT", 1.0)
    monkeypatch.setattr(limits, "KEEPALIVE", 0.2)
    real = TreeWriter.finish

    def slow_finish(self, *a, **kw):
        time.sleep(2.5)
        return real(self, *a, **kw)

    monkeypatch.setattr(TreeWriter, "finish", slow_finish)
    rx = Receiver({"t": str(tmp_path / "dst")}, server_context(bundle), str(tmp_path / "st"), create=True)
    addr = rx.start()
    try:
        src = rich_tree(tmp_path / "src")
        assert send(src, addr, bundle, target="t").kind == "full"
        assert oracle(os.fsdecode(src), tmp_path / "dst") == ""
    finally:
        rx.stop()


def test_what_a_receiver_could_not_keep_is_logged_on_the_receiving_host(tmp_path, bundle, monkeypatch, caplog):
    """An xattr the target's file system refuses (or a device node a receiver not root cannot
    make): the round completes, and the receiver says so in its log, not nothing."""
    import logging

    from smsrepl.files import apply

    real = os.setxattr

    def refusing(where, name, value, *a, **kw):
        if os.fsencode(name) == b"user.refused":
            raise OSError(95, "Operation not supported")
        return real(where, name, value, *a, **kw)

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    os.setxattr(src / "f", b"user.refused", b"x")
    monkeypatch.setattr(apply.os, "setxattr", refusing)
    rx = Receiver({"t": str(tmp_path / "dst")}, server_context(bundle), str(tmp_path / "st"), create=True)
    addr = rx.start()
    try:
        with caplog.at_level(logging.WARNING, logger="smsrepl.receiver"):
            assert send(src, addr, bundle, target="t").kind == "full"
    finally:
        rx.stop()
    assert (tmp_path / "dst" / "f").read_bytes() == b"data"
    assert any("target t: f: xattr user.refused not set (Operation not supported)" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
