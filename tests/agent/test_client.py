"""The control-plane client against an HTTPS server on loopback started by the test."""
import datetime as dt
import ipaddress
import json
import logging
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from smsrepl.agent.client import ControlPlane
from smsrepl.errors import ControlPlaneError, ControlPlaneUnavailable
from smsrepl.errors import ConfigError

TOKEN = "MIIDkgYJKoZIhvcNAQcC-secret-token-value"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cp-tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return str(d / "cert.pem"), str(d / "key.pem")


class Script:
    """Answers per path: a list of (status, body, headers) consumed in order; the last repeats."""

    def __init__(self):
        self.answers = {}
        self.seen = []


@pytest.fixture
def server(tls_files):
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            script.seen.append((self.command, self.path, dict(self.headers), body))
            queue = script.answers.get((self.command, self.path), [(404, {"error_code": "SMS.9999",
                                                                           "error_msg": "no such"}, {})])
            status, out, headers = queue.pop(0) if len(queue) > 1 else queue[0]
            if status == "hang":
                time.sleep(1.5)
                status = 200
            data = b"" if out is None else json.dumps(out).encode()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _answer

        def log_message(self, *a):
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError)):
                super().handle_error(request, client_address)  # a client that gave up is the test's point

    httpd = Server(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*tls_files)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield script, f"https://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def client(url, tls_files, **kw):
    sleeps = []
    cp = ControlPlane(url, TOKEN, verify=tls_files[0], sleep=sleeps.append, **kw)
    return cp, sleeps


def test_token_header_json_and_every_endpoint_path(server, tls_files):
    script, url = server
    cp, _ = client(url, tls_files)
    for method, path in [("GET", "/v3/tasks/t1"), ("GET", "/v3/sources/s1/command"),
                         ("POST", "/v3/sources/s1/command_result"), ("GET", "/v3/tasks/t1/certkey"),
                         ("GET", "/v3/tasks/t1/passphrase"), ("GET", "/v3/tasks/t1/speed-limit"),
                         ("GET", "/v3/tasks/t1/configuration-setting"), ("PUT", "/v3/tasks/t1/progress"),
                         ("PUT", "/v3/sources/s1/changestate"), ("POST", "/v3/tasks/t1/consistency-result"),
                         ("POST", "/v3/t1/update-network-check-info")]:
        script.answers[(method, path)] = [(200, {"ok": path}, {})]
    assert cp.get_task("t1") == {"ok": "/v3/tasks/t1"}
    cp.get_command("s1")
    cp.post_command_result("s1", {"command_name": "START", "result": "success"})
    cp.get_certkey("t1")
    cp.get_passphrase("t1")
    cp.get_speed_limit("t1")
    cp.get_configuration("t1")
    cp.put_progress("t1", {"progress": 5})
    cp.put_state("s1", {"copystate": "REPLICATE"})
    cp.post_consistency_result("t1", {"check_result": "consistent"})
    cp.post_network_check("t1", {"network_delay": 1.0})
    assert [(m, p) for m, p, _, _ in script.seen] == list(script.answers)
    for _, _, headers, body in script.seen:
        assert headers["X-Auth-Token"] == TOKEN
    assert json.loads(script.seen[2][3]) == {"command_name": "START", "result": "success"}
    with pytest.raises(ConfigError):
        cp.get_task("../sources/x")


@pytest.mark.reliability("fault", "control plane answering 429 and 5xx")
def test_retries_429_and_5xx_with_backoff_honouring_retry_after(server, tls_files):
    script, url = server
    script.answers[("GET", "/v3/tasks/t1")] = [(429, None, {"Retry-After": "7"}), (503, None, {}),
                                              (502, None, {}), (200, {"id": "t1"}, {})]
    cp, sleeps = client(url, tls_files)
    assert cp.get_task("t1") == {"id": "t1"}
    assert len(script.seen) == 4 and sleeps[0] == 7.0
    assert 0.5 * 1.0 <= sleeps[1] <= 1.0 and 0.5 * 2.0 <= sleeps[2] <= 2.0  # 0.5 s doubled, with jitter


def test_4xx_is_not_retried_and_carries_the_sms_code(server, tls_files):
    script, url = server
    script.answers[("GET", "/v3/tasks/t1")] = [(403, {"error_code": "SMS.9004", "error_msg": "no permission"}, {})]
    cp, sleeps = client(url, tls_files)
    with pytest.raises(ControlPlaneError) as exc:
        cp.get_task("t1")
    assert exc.value.code == "SMS.9004" and exc.value.status == 403 and "no permission" in str(exc.value)
    assert len(script.seen) == 1 and sleeps == [] and not exc.value.resumable


def test_gives_up_after_the_retries_and_times_out(server, tls_files):
    script, url = server
    script.answers[("GET", "/v3/tasks/t1")] = [(500, {"error_code": "SMS.0001", "error_msg": "internal"}, {})]
    cp, sleeps = client(url, tls_files, retries=2)
    with pytest.raises(ControlPlaneError) as exc:
        cp.get_task("t1")
    assert exc.value.status == 500 and exc.value.resumable and len(script.seen) == 3 and len(sleeps) == 2
    script.answers[("GET", "/v3/tasks/t2")] = [("hang", {"id": "t2"}, {})]
    cp, sleeps = client(url, tls_files, retries=1, timeout=(1.0, 0.3))
    with pytest.raises(ControlPlaneUnavailable, match="did not answer after 2 attempts"):
        cp.get_task("t2")


def test_unreachable_and_untrusted_control_planes(tls_files, tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cp, sleeps = client(f"https://127.0.0.1:{port}", tls_files, retries=2)
    with pytest.raises(ControlPlaneUnavailable) as exc:
        cp.get_task("t1")
    assert exc.value.code == "SMS.1807" and len(sleeps) == 2
    with pytest.raises(ConfigError, match="https"):
        ControlPlane(f"http://127.0.0.1:{port}", TOKEN)


def test_untrusted_certificate_is_refused(server):
    _, url = server
    cp = ControlPlane(url, TOKEN, retries=0)  # the system CAs do not know the test certificate
    with pytest.raises(ControlPlaneUnavailable):
        cp.get_task("t1")


@pytest.mark.reliability("secrets", "control-plane token never in logs, errors or repr")
def test_token_never_in_logs_errors_or_repr(server, tls_files, caplog):
    script, url = server
    script.answers[("GET", "/v3/tasks/t1")] = [(503, None, {}), (400, {"error_code": "SMS.1101",
                                                                      "error_msg": "bad request"}, {})]
    caplog.set_level(logging.DEBUG)
    cp, _ = client(url, tls_files)
    with pytest.raises(ControlPlaneError) as exc:
        cp.get_task("t1")
    cp2, _ = client("https://127.0.0.1:1", tls_files, retries=1)
    with pytest.raises(ControlPlaneUnavailable) as exc2:
        cp2.get_task("t1")
    text = caplog.text + str(exc.value) + str(exc2.value) + repr(cp)
    assert "GET /v3/tasks/t1" in caplog.text and TOKEN not in text and TOKEN[:12] not in text
