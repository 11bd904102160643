"""A fake SMS v3 control plane on loopback, for tests and the demo.

It serves the endpoints the data plane uses over HTTPS (a self-signed
certificate for 127.0.0.1; ``ca_file`` is what a client trusts), checks the
``X-Auth-Token``, and checks every request body against the reference's
field tables (agent.fields): a body with an extra, missing, mistyped or
out-of-range field is answered 400 with an SMS-style error body and recorded
in ``violations``, so a test can fail on it.

    cp = FakeControlPlane(token, workdir)
    url = cp.start()
    cp.add_task(task_id, {...5.4.5 body...}, certkey=..., speed_limit=..., configuration=...)
    cp.push_command(source_id, "START", task_id)
    ...
    cp.outage(30)            # no answer at all for 30 s (connections are dropped)
    cp.stop()
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import ssl
import threading
import time
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from smsrepl.agent.fields import body_problems

_ROUTES = [
    ("GET", re.compile(r"^/v3/tasks/([^/]+)$"), "task"),
    ("GET", re.compile(r"^/v3/tasks/([^/]+)/certkey$"), "certkey"),
    ("GET", re.compile(r"^/v3/tasks/([^/]+)/passphrase$"), "passphrase"),
    ("GET", re.compile(r"^/v3/tasks/([^/]+)/speed-limit$"), "speed_limit"),
    ("GET", re.compile(r"^/v3/tasks/([^/]+)/configuration-setting$"), "configuration"),
    ("PUT", re.compile(r"^/v3/tasks/([^/]+)/progress$"), "progress"),
    ("POST", re.compile(r"^/v3/tasks/([^/]+)/consistency-result$"), "consistency_result"),
    ("POST", re.compile(r"^/v3/([^/]+)/update-network-check-info$"), "network_check"),
    ("GET", re.compile(r"^/v3/sources/([^/]+)/command$"), "command"),
    ("POST", re.compile(r"^/v3/sources/([^/]+)/command_result$"), "command_result"),
    ("PUT", re.compile(r"^/v3/sources/([^/]+)/changestate$"), "changestate"),
]
_BODY_ENDPOINTS = {"progress", "consistency_result", "network_check", "command_result", "changestate"}


def _self_signed(workdir: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smsrepl fake control plane")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    cert_path, key_path = os.path.join(workdir, "cp-cert.pem"), os.path.join(workdir, "cp-key.pem")
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return cert_path, key_path


class FakeControlPlane:
    def __init__(self, token: str, workdir: str) -> None:
        self.token = token
        self.workdir = workdir
        self.ca_file, self._key_file = _self_signed(workdir)
        self._lock = threading.Lock()
        self.tasks: dict[str, dict] = {}
        self.task_data: dict[str, dict[str, dict]] = defaultdict(dict)
        self.commands: dict[str, deque] = defaultdict(deque)
        #: accepted bodies, per endpoint name, as (id, body) in arrival order
        self.received: dict[str, list[tuple[str, dict]]] = defaultdict(list)
        #: rejected requests: (method, path, problems)
        self.violations: list[tuple[str, str, list[str]]] = []
        self.requests = 0
        self.dropped = 0
        self._down_until = 0.0
        self._httpd: ThreadingHTTPServer | None = None

    # --- scripting ---------------------------------------------------------------
    def add_task(self, task_id: str, task: dict, *, certkey: dict, passphrase: str = "",
                 speed_limit: dict | None = None, configuration: dict | None = None) -> None:
        with self._lock:
            self.tasks[task_id] = task
            self.task_data[task_id] = {
                "certkey": certkey,
                "passphrase": {"task_id": task_id, "passphrase": passphrase},
                "speed_limit": speed_limit or {"speed_limit": []},
                "configuration": configuration or {"task_id": task_id, "configurations": []},
            }

    def set_speed_limit(self, task_id: str, body: dict) -> None:
        with self._lock:
            self.task_data[task_id]["speed_limit"] = body

    def push_command(self, source_id: str, name: str, task_id: str | None = None) -> None:
        with self._lock:
            self.commands[source_id].append({"command_name": name, "command_param": {"task_id": task_id or ""}})

    def outage(self, seconds: float) -> None:
        """Answer nothing for ``seconds`` (every connection is dropped unanswered)."""
        self._down_until = time.monotonic() + seconds

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def bodies(self, endpoint: str) -> list[dict]:
        with self._lock:
            return [b for _, b in self.received[endpoint]]

    # --- serving -------------------------------------------------------------------
    def start(self) -> str:
        cp = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                if not cp.available:
                    cp.dropped += 1
                    self.close_connection = True
                    return  # no answer: the client sees the connection close
                status, body = cp._answer(self.command, self.path, self.headers.get("X-Auth-Token"), raw)
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = _serve

            def log_message(self, *args) -> None:
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.ca_file, self._key_file)
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, name="fake-control-plane", daemon=True).start()
        return f"https://127.0.0.1:{httpd.server_address[1]}"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def _answer(self, method: str, path: str, token: str | None, raw: bytes) -> tuple[int, dict | None]:
        self.requests += 1
        if token != self.token:
            return 401, {"error_code": "SMS.9002", "error_msg": "authentication failed"}
        for m, pattern, endpoint in _ROUTES:
            match = pattern.match(path)
            if match and m == method:
                break
        else:
            return 404, {"error_code": "SMS.9999", "error_msg": f"no such endpoint: {method} {path}"}
        ident = match.group(1)
        with self._lock:
            if endpoint in _BODY_ENDPOINTS:
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                problems = ["body is not JSON"] if body is None else body_problems(endpoint, body)
                if problems:
                    self.violations.append((method, path, problems))
                    return 400, {"error_code": "SMS.9001", "error_msg": "; ".join(problems)[:1024]}
                if endpoint in ("progress", "consistency_result", "network_check") and ident not in self.tasks:
                    return 404, {"error_code": "SMS.9999", "error_msg": f"no task {ident}"}
                self.received[endpoint].append((ident, body))
                return 200, {}
            if endpoint == "command":
                queue = self.commands[ident]
                return 200, (queue.popleft() if queue else {})
            if ident not in self.tasks:
                return 404, {"error_code": "SMS.9999", "error_msg": f"no task {ident}"}
            if endpoint == "task":
                return 200, self.tasks[ident]
            return 200, self.task_data[ident][endpoint]
