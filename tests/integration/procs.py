"""Run smsrepl CLI processes on loopback for the integration tests."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

CLI = [sys.executable, "-m", "smsrepl"]


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class ReceiverProc:
    def __init__(self, certkey: str, targets: dict[str, str], state_dir: str, *extra: str, port: int = 0,
                 env: dict[str, str] | None = None, verbose: bool = False, create: bool = True) -> None:
        # create: the tests' targets are images the first session makes (receive --create)
        args = CLI + ["-v"] * verbose + ["receive", "--listen", f"127.0.0.1:{port}", "--certkey", certkey, "--state-dir", state_dir,
                      "--checkpoint-seconds", "0.05", *(["--create"] if create else []), *extra]
        for name, path in targets.items():
            args += ["--target", f"{name}={path}"]
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **env} if env else None)
        line = self.proc.stderr.readline()
        m = re.search(r"listening on ([\d.]+):(\d+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"receiver did not start: {line}{self.proc.stderr.read()}")
        self.port = int(m.group(2))
        self.log: list[str] = []
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if os.environ.get("SMSREPL_RX_LOG"):
            with open(os.environ["SMSREPL_RX_LOG"], "a") as fh:
                fh.writelines(self.log)
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9


def send_args(source: str, address: str, certkey: str, state_dir: str, target: str = "disk0", *extra: str) -> list[str]:
    return CLI + ["send", "block", "--json", source, "--to", address, "--target", target, "--certkey", certkey,
                  "--state-dir", state_dir, *extra]


def send(*args, timeout: float = 300, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(send_args(*args, **kw), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env} if env else None)


def summary(cp: subprocess.CompletedProcess) -> dict:
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout.strip().splitlines()[-1])


def round_summaries(text: str) -> list[dict]:
    """Each round's --json summary in ``text``, in order: a one-shot send that resumed a full
    copy prints that round's, then the sync round's that follows it."""
    return [json.loads(line) for line in text.splitlines() if line.startswith('{"round"')]


def first_summary(cp: subprocess.CompletedProcess) -> dict:
    """The first round's summary (a resumed copy's), after checking the one after it: a
    resumed full round is followed by a sync round, and nothing else is."""
    assert cp.returncode == 0, cp.stderr
    rounds = round_summaries(cp.stdout)
    assert len(rounds) == (2 if rounds[0]["resumed_from"] else 1), rounds
    if len(rounds) == 2:
        assert rounds[1]["kind"] == "sync" and rounds[1]["round"] == rounds[0]["round"] + 1, rounds
    return rounds[0]


class CuttingProxy:
    """A loopback TCP proxy that forwards until ``cut_after`` bytes went client->server, then resets
    both sides; or, ``silent``, stops forwarding and keeps both connections open until close(), as a
    middlebox that lost its state does."""

    def __init__(self, upstream_port: int, cut_after: int, *, silent: bool = False) -> None:
        self.upstream = upstream_port
        self.cut_after = cut_after
        self.silent = silent
        self.stalled = threading.Event()
        self._closed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.forwarded = 0
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server = socket.create_connection(("127.0.0.1", self.upstream))
        done = threading.Event()

        def pump(a: socket.socket, b: socket.socket, counted: bool) -> None:
            try:
                while not done.is_set():
                    data = a.recv(65536)
                    if not data:
                        break
                    if self.stalled.is_set():
                        break  # silent: what the receiver says is not passed on either
                    if counted:
                        room = self.cut_after - self.forwarded
                        if room <= len(data):
                            b.sendall(data[:max(room, 0)])
                            self.forwarded += max(room, 0)
                            break
                        self.forwarded += len(data)
                    b.sendall(data)
            except OSError:
                pass
            if self.silent:
                self.stalled.set()
                self._closed.wait()  # nothing more goes either way, and nobody hears of it
            done.set()
            for s in (client, server):
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    # wakes the other pump's recv on it: until that returns, close() releases
                    # nothing and no reset leaves (the receiver would wait for data forever)
                    s.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
                try:
                    s.close()
                except OSError:
                    pass

        threading.Thread(target=pump, args=(server, client, False), daemon=True).start()
        pump(client, server, True)

    def close(self) -> None:
        self._closed.set()
        self.listener.close()
        self._t.join(5)


def wait_until(pred, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False
