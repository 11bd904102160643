"""Parallel streams (--streams N): a block session over several TLS connections, with real
processes on loopback. The target must end byte-identical to the source whatever happens to
one of the connections, and a cut session resumes from the receiver's checkpoint."""
import json
import os
import socket
import threading
import time

import pytest

from smsrepl.lab.testdata import rewrite_random_blocks, write_image

from .procs import ReceiverProc, first_summary, send, sha256, summary

MIX = {"hole": 0.1, "zero": 0.1, "text": 0.35, "random": 0.35, "mixed": 0.1}


@pytest.fixture
def lab(tmp_path, certkey_file):
    src, dst = str(tmp_path / "source.img"), str(tmp_path / "target.img")
    env = {"src": src, "dst": dst, "ck": certkey_file, "tx": str(tmp_path / "tx-state"),
           "rx_state": str(tmp_path / "rx-state"),
           "rx": ReceiverProc(certkey_file, {"disk0": dst}, str(tmp_path / "rx-state"))}
    yield env
    env["rx"].stop()  # the test may have replaced it with a restarted receiver


def _send(lab, address, *extra):
    return send(lab["src"], address, lab["ck"], lab["tx"], "disk0", "-v", *extra)


def _connections(cp) -> int:
    lines = [line for line in cp.stderr.splitlines() if "runs over" in line]
    return int(lines[-1].split("runs over ")[1].split()[0]) if lines else 1


def test_a_session_over_four_connections_copies_and_syncs_byte_identical(lab):
    write_image(lab["src"], 48 << 20, seed=21, mix=MIX)
    cp = _send(lab, lab["rx"].address, "--streams", "4", "--level", "0")
    first = summary(cp)
    assert _connections(cp) == 4
    assert first["kind"] == "full" and sha256(lab["src"]) == sha256(lab["dst"])
    rewritten = rewrite_random_blocks(lab["src"], 0.02, seed=8)
    cp = _send(lab, lab["rx"].address, "--streams", "3")
    second = summary(cp)
    assert _connections(cp) == 3
    assert second["kind"] == "sync" and second["data_bytes"] == rewritten
    assert sha256(lab["src"]) == sha256(lab["dst"])
    # the receiver applied every connection's frames as one round: its checkpoints and its
    # manifest agree with a one-connection round (the next round finds nothing to send)
    third = summary(_send(lab, lab["rx"].address, "--streams", "1"))
    assert third["kind"] == "sync" and third["data_bytes"] == 0


def test_auto_runs_one_connection_on_loopback(lab):
    write_image(lab["src"], 8 << 20, seed=2, mix=MIX)
    cp = _send(lab, lab["rx"].address, "--streams", "auto")
    summary(cp)
    assert _connections(cp) == 1


class _CutOne:
    """A loopback proxy forwarding every connection to ``upstream``, except that the
    ``victim``-th connection accepted (0: the session's own) is reset after ``cut_after``
    bytes from the client, once ``ready()`` too; until then it trickles on."""

    def __init__(self, upstream: str, victim: int, cut_after: int, ready=lambda: True) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host.strip("[]"), int(port))
        self.victim, self.cut_after, self.ready = victim, cut_after, ready
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted = 0
        self.cut = threading.Event()
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.socks += [client, server]
            limit = self.cut_after if self.accepted == self.victim else None
            self.accepted += 1
            threading.Thread(target=self._pump, args=(server, client, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, server, limit), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, limit: int | None) -> None:
        moved = 0
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                if limit is not None and moved + len(data) >= limit:
                    if self.ready():
                        self.cut.set()
                        for s in (a, b):  # a reset both ways, as a middlebox dropping the flow
                            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                            s.close()
                        return
                    # not ready yet: trickle (about 1 MB/s) so the copy cannot end before it is
                    time.sleep(0.05)
                moved += len(data)
                b.sendall(data)
        except OSError:
            pass
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


@pytest.mark.parametrize("victim", [0, 2])
def test_a_lost_connection_fails_the_session_and_the_next_run_resumes_byte_identical(lab, victim):
    write_image(lab["src"], 96 << 20, seed=5, mix={"text": 0.2, "random": 0.8})
    # an extra connection joins a moment after the round began: it is cut sooner. The session's
    # own is cut once the receiver made a checkpoint durable too: the 12 MiB may sit in socket
    # buffers, unapplied, while a busy machine holds the receiver back
    ready = (lambda: _checkpoint(lab) > 0) if victim == 0 else (lambda: True)
    proxy = _CutOne(lab["rx"].address, victim, (12 if victim == 0 else 3) << 20, ready)
    try:
        cut = _send(lab, proxy.address, "--streams", "3", "--level", "0")
    finally:
        proxy.close()
    assert proxy.cut.is_set()
    assert cut.returncode == 3, cut.stderr  # resumable: a lost connection, as a cut session
    again = _send(lab, lab["rx"].address, "--streams", "3")
    result = first_summary(again)
    assert result["kind"] == "full"
    assert sha256(lab["src"]) == sha256(lab["dst"])
    # the receiver's checkpoint, of what it applied in order: the session's own connection was cut
    # after one; an extra one cut after 3 MiB may have held the very first frame
    assert result["resumed_from"] > 0 or victim != 0
    assert result["data_bytes"] <= (96 << 20) - result["resumed_from"]


def _checkpoint(lab) -> int:
    """The receiver's durable checkpoint of the running round (its state.json), 0 before one."""
    try:
        with open(os.path.join(lab["rx_state"], "disk0", "state.json")) as fh:
            return int(json.load(fh).get("checkpoint") or 0)
    except (OSError, ValueError):
        return 0


def _tree(root, seed: int, files: int = 400) -> None:
    import random
    rng = random.Random(seed)
    for i in range(files):
        d = root / f"d{i % 23}" / f"e{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.bin").write_bytes(rng.randbytes(rng.randint(0, 300_000)))


def _same_tree(a, b) -> bool:
    import filecmp
    cmp = filecmp.dircmp(a, b)

    def same(c) -> bool:
        if c.left_only or c.right_only or c.diff_files or c.funny_files:
            return False
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        return not mismatch and not errors and all(same(s) for s in c.subdirs.values())
    return same(cmp)


def test_a_file_session_over_three_connections_copies_and_syncs_identical(tmp_path, certkey_file):
    from .procs import CLI
    import subprocess
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    _tree(src, 1)
    rx = ReceiverProc(certkey_file, {"home": str(dst)}, str(tmp_path / "rx"))
    try:
        def run():
            cp = subprocess.run(CLI + ["send", "files", str(src), "--to", rx.address, "--target", "home", "--certkey",
                                       certkey_file, "--streams", "3", "--json", "-v"],
                                capture_output=True, text=True, timeout=120)
            assert cp.returncode == 0, cp.stderr
            return cp
        cp = run()
        assert _connections(cp) == 3
        assert _same_tree(src, dst)
        _tree(src, 2, files=150)  # rewrite some, add none: a sync round
        (src / "d3" / "e3" / "f3.bin").unlink()
        run()
        assert _same_tree(src, dst)
    finally:
        rx.stop()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("victim", ["sender", "receiver"])
def test_kill_9_of_either_end_mid_copy_over_three_connections_then_resume(lab, seed, victim, tmp_path):
    import random
    import signal
    import subprocess
    import time

    from .procs import send_args

    rng = random.Random(seed)
    write_image(lab["src"], 96 << 20, seed=seed, mix=MIX)
    proc = subprocess.Popen(send_args(lab["src"], lab["rx"].address, lab["ck"], lab["tx"], "disk0", "--streams", "3",
                                      "--level", "0"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(rng.uniform(0.4, 1.2))
    if victim == "sender":
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    else:
        lab["rx"].kill()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, 3), err
        lab["rx"] = ReceiverProc(lab["ck"], {"disk0": lab["dst"]}, str(tmp_path / "rx-state"))
    result = first_summary(_send(lab, lab["rx"].address, "--streams", "3"))
    assert sha256(lab["src"]) == sha256(lab["dst"])
    if result["kind"] == "full":
        assert result["data_bytes"] <= (96 << 20) - result["resumed_from"]
