"""Real mutual-TLS handshakes over loopback with lab bundles."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import ssl
import tempfile
import threading
from pathlib import Path

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from smsrepl.lab.certs import LabCA, expired_bundle, make_bundle, not_yet_valid_bundle
from smsrepl.errors import AuthenticationError, CertificateError, ConfigError, ReplicationError, TransportError
from smsrepl.transport.certkey import CertKey, load_passphrase
from smsrepl.transport.tls import check_peer_role, client_context, server_context
from smsrepl.transport.tls_errors import classify_ssl_error

PASS = b"task-passphrase-\xc3\xa9-7f3a"
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def plain() -> CertKey:
    return make_bundle()


@pytest.fixture(scope="module")
def locked() -> CertKey:
    return make_bundle(PASS)


# -- harness ------------------------------------------------------------------
def _classified(exc: Exception, *, server_side: bool) -> Exception:
    """As the endpoints have it: a refused role (check_peer_role) is its own error, a failed
    handshake is classified."""
    return exc if isinstance(exc, ReplicationError) else classify_ssl_error(exc, server_side=server_side)


@dataclasses.dataclass
class Outcome:
    client: object = None  # bytes received, or the classified error
    server: object = None


def handshake(
    sctx: ssl.SSLContext,
    cctx: ssl.SSLContext,
    *,
    server_expects: str = "source",
    client_expects: str = "target-data",
) -> Outcome:
    """One connection: server greets after its role check, client answers."""
    out = Outcome()
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    ls.settimeout(TIMEOUT)

    def serve() -> None:
        try:
            raw, _ = ls.accept()
        except OSError as exc:  # pragma: no cover - harness failure
            out.server = exc
            return
        raw.settimeout(TIMEOUT)
        try:
            with sctx.wrap_socket(raw, server_side=True) as tls:
                check_peer_role(tls, server_expects)
                tls.sendall(b"ok")
                out.server = tls.recv(2)
        except Exception as exc:
            out.server = _classified(exc, server_side=True)
        finally:
            raw.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    raw = socket.create_connection(ls.getsockname(), timeout=TIMEOUT)
    try:
        with cctx.wrap_socket(raw) as tls:
            check_peer_role(tls, client_expects)
            out.client = tls.recv(2)
            tls.sendall(b"hi")
    except Exception as exc:
        out.client = _classified(exc, server_side=False)
    finally:
        raw.close()
        thread.join(TIMEOUT + 1)
        ls.close()
    assert not thread.is_alive()
    return out


def assert_auth(err: object, *fragments: str) -> None:
    assert isinstance(err, AuthenticationError), err
    assert err.code == "SMS.0304" and err.exit_code == 4
    for f in fragments:
        assert f in err.message, err.message


def refused(out: Outcome) -> None:
    """Neither side may have completed the exchange; both errors are SMS.0304."""
    assert not isinstance(out.client, bytes) and not isinstance(out.server, bytes), out
    for side in (out.client, out.server):
        # The side that did not detect the problem sees an alert (auth) or,
        # when the detecting side closed without one, an EOF (transport).
        assert isinstance(side, (AuthenticationError, TransportError)), side
    assert isinstance(out.client, AuthenticationError) or isinstance(out.server, AuthenticationError)


# -- success -----------------------------------------------------------------------
def test_mutual_handshake_plain(plain):
    out = handshake(server_context(plain), client_context(plain))
    assert out.client == b"ok" and out.server == b"hi"


def test_mutual_handshake_with_passphrase(locked):
    assert locked.key_is_encrypted("private_key")
    assert "ENCRYPTED PRIVATE KEY" in locked.target_data_private_key
    out = handshake(server_context(locked, PASS), client_context(locked, PASS))
    assert out.client == b"ok" and out.server == b"hi"


def test_mgmt_server_role(locked):
    out = handshake(server_context(locked, PASS, role="mgmt"), client_context(locked, PASS), client_expects="target-mgmt")
    assert out.client == b"ok" and out.server == b"hi"


def test_context_defaults(plain):
    for ctx in (client_context(plain), server_context(plain)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.check_hostname is False
        # Only the bundle's CA is trusted: no system store.
        cas = ctx.get_ca_certs()
        assert len(cas) == 1 and "smsrepl lab CA" in str(cas[0]["subject"])
    assert server_context(plain).num_tickets == 0


def test_certs_without_role_ou_are_accepted():
    """A control plane's certificates need not carry our OU: EKU is enough."""
    ca = LabCA.create()
    src_cert, src_key = ca.issue("agent-1234", ou=None, eku=(ExtendedKeyUsageOID.CLIENT_AUTH,), san=False)
    tgt_cert, tgt_key = ca.issue("10.0.0.7", ou=None, eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    ck = CertKey(ca.pem, src_cert, src_key, tgt_cert, tgt_key, tgt_cert, tgt_key)
    out = handshake(server_context(ck), client_context(ck))
    assert out.client == b"ok" and out.server == b"hi"


# -- bundle and passphrase errors (SMS.3301) --------------------------------------------
def _assert_3301(exc_info, *fragments):
    err = exc_info.value
    assert isinstance(err, CertificateError)
    assert err.code == "SMS.3301" and err.exit_code == 2
    for f in fragments:
        assert f in str(err), str(err)
    return str(err)


@pytest.mark.reliability("tls", "wrong passphrase (SMS.3301)")
def test_wrong_passphrase(locked):
    with pytest.raises(CertificateError) as ei:
        client_context(locked, b"not-the-passphrase")
    msg = _assert_3301(ei, "private_key", "passphrase")
    assert "not-the-passphrase" not in msg and "PRIVATE KEY" not in msg
    with pytest.raises(CertificateError) as ei:
        server_context(locked, b"not-the-passphrase")
    msg = _assert_3301(ei, "target_data_private_key")
    assert "not-the-passphrase" not in msg


def test_missing_passphrase_never_prompts(locked):
    with pytest.raises(CertificateError) as ei:
        client_context(locked, None)
    _assert_3301(ei, "private_key", "encrypted", "no passphrase")
    with pytest.raises(CertificateError) as ei:
        server_context(locked, None, role="mgmt")
    _assert_3301(ei, "target_mgmt_private_key")


def test_passphrase_with_plain_keys_is_accepted(plain):
    client_context(plain, PASS)


def test_roundtrip_json(locked):
    again = CertKey.from_json(locked.to_json())
    assert again == locked
    assert CertKey.from_json(locked.to_json().encode()) == locked
    assert "PRIVATE" not in repr(locked)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("{not json", "invalid JSON"),
        (b"\xff\xfe\x00garbage", "certkey"),
        ("[]", "JSON object"),
        ("", "invalid JSON"),
    ],
)
def test_bad_json(text, fragment):
    with pytest.raises(CertificateError) as ei:
        CertKey.from_json(text)
    _assert_3301(ei, fragment)


def test_missing_extra_and_typed_keys(plain):
    doc = json.loads(plain.to_json())
    missing = dict(doc)
    del missing["target_data_private_key"]
    with pytest.raises(CertificateError) as ei:
        CertKey.from_json(json.dumps(missing))
    _assert_3301(ei, "missing", "target_data_private_key")

    extra = dict(doc, passphrase="hunter2-secret")
    with pytest.raises(CertificateError) as ei:
        CertKey.from_json(json.dumps(extra))
    msg = _assert_3301(ei, "unexpected", "passphrase")
    assert "hunter2" not in msg

    typed = dict(doc, ca=["x"])
    with pytest.raises(CertificateError) as ei:
        CertKey.from_json(json.dumps(typed))
    _assert_3301(ei, "'ca'", "PEM string")


@pytest.mark.parametrize("field", list(CertKey.__dataclass_fields__))
def test_garbage_pem(plain, field):
    doc = json.loads(plain.to_json())
    doc[field] = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    with pytest.raises(CertificateError) as ei:
        CertKey.from_json(json.dumps(doc))
    _assert_3301(ei, repr(field))
    doc[field] = "hello"
    with pytest.raises(CertificateError) as ei:
        CertKey.from_json(json.dumps(doc))
    _assert_3301(ei, repr(field), "no PEM block")


def test_key_swapped_between_fields(plain):
    doc = json.loads(plain.to_json())
    doc["private_key"] = plain.target_data_private_key
    with pytest.raises(CertificateError) as ei:
        CertKey.from_json(json.dumps(doc))
    msg = _assert_3301(ei, "'private_key'", "does not match", "'cert'")
    assert "BEGIN" not in msg


def test_encrypted_key_mismatch_detected_at_load(locked):
    bad = dataclasses.replace(locked, private_key=locked.target_data_private_key)
    with pytest.raises(CertificateError) as ei:
        client_context(bad, PASS)
    _assert_3301(ei, "private_key", "does not match")


def test_certkey_load_errors(tmp_path, plain):
    with pytest.raises(CertificateError) as ei:
        CertKey.load(tmp_path / "absent.json")
    _assert_3301(ei, "absent.json")
    p = tmp_path / "certkey.json"
    p.write_text(plain.to_json())
    assert CertKey.load(p) == plain


def test_load_passphrase(tmp_path):
    p = tmp_path / "pass"
    p.write_bytes(PASS + b"\n")
    assert load_passphrase(p) == PASS
    p.write_bytes(PASS + b"\n\n")
    assert load_passphrase(p) == PASS + b"\n"
    p.write_bytes(PASS)
    assert load_passphrase(p) == PASS
    p.write_bytes(b"\n")
    with pytest.raises(CertificateError):
        load_passphrase(p)
    with pytest.raises(CertificateError) as ei:
        load_passphrase(tmp_path / "missing")
    _assert_3301(ei, "passphrase file")


def test_bad_server_role(plain):
    with pytest.raises(ConfigError):
        server_context(plain, role="source")


# -- authentication failures (SMS.0304) --------------------------------------------------
@pytest.mark.reliability("tls", "certificate signed by another CA")
def test_other_ca_is_refused(plain):
    other = make_bundle()
    out = handshake(server_context(plain), client_context(other))
    refused(out)
    assert_auth(out.client, "certificate verify failed")
    out = handshake(server_context(other), client_context(plain))
    assert_auth(out.client, "certificate verify failed")


@pytest.mark.reliability("tls", "expired certificate")
def test_expired_is_refused():
    bad = expired_bundle()
    out = handshake(server_context(bad), client_context(bad))
    refused(out)
    assert_auth(out.client, "certificate verify failed: certificate has expired")
    assert_auth(out.server)


@pytest.mark.reliability("tls", "not-yet-valid certificate")
def test_not_yet_valid_is_refused():
    bad = not_yet_valid_bundle()
    out = handshake(server_context(bad), client_context(bad))
    refused(out)
    assert_auth(out.client, "certificate verify failed: certificate is not yet valid")


@pytest.mark.reliability("tls", "expired certificate")
def test_expired_client_cert_refused_by_server():
    ca = LabCA.create()
    good = make_bundle(ca=ca)
    old = expired_bundle(ca=ca)
    mixed = dataclasses.replace(good, cert=old.cert, private_key=old.private_key)
    out = handshake(server_context(good), client_context(mixed))
    refused(out)
    assert_auth(out.server, "certificate has expired")
    assert_auth(out.client, "peer rejected our certificate")


@pytest.mark.reliability("tls", "role confusion (source certificate on a receiver)")
def test_receiver_presenting_source_cert_is_refused(plain):
    confused = dataclasses.replace(plain, target_data_cert=plain.cert, target_data_private_key=plain.private_key)
    out = handshake(server_context(confused), client_context(plain))
    refused(out)
    assert_auth(out.client, "certificate verify failed", "purpose")


@pytest.mark.reliability("tls", "role confusion (target certificate on a sender)")
def test_sender_presenting_target_cert_is_refused(plain):
    confused = dataclasses.replace(plain, cert=plain.target_data_cert, private_key=plain.target_data_private_key)
    out = handshake(server_context(plain), client_context(confused))
    refused(out)
    assert_auth(out.server, "certificate verify failed", "purpose")


@pytest.mark.reliability("tls", "role confusion (management certificate on the data port)")
def test_mgmt_cert_on_data_port_is_refused(plain):
    """Both target certs are serverAuth: only the role check tells them apart."""
    out = handshake(server_context(plain, role="mgmt"), client_context(plain))
    assert_auth(out.client, "smsrepl-target-mgmt", "expected smsrepl-target-data")
    assert out.server != b"hi"


def test_role_ou_beats_permissive_eku():
    """A cert usable for both purposes but naming the source role cannot serve."""
    ca = LabCA.create()
    good = make_bundle(ca=ca)
    both = (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH)
    c, k = ca.issue("smsrepl-source", ou="smsrepl-source", eku=both)
    confused = dataclasses.replace(good, target_data_cert=c, target_data_private_key=k)
    out = handshake(server_context(confused), client_context(good))
    assert_auth(out.client, "role smsrepl-source")
    # ...and a source cert without EKU naming a target role cannot be a sender.
    c, k = ca.issue("smsrepl-target-data", ou="smsrepl-target-data", eku=None, san=False)
    confused = dataclasses.replace(good, cert=c, private_key=k)
    out = handshake(server_context(good), client_context(confused))
    assert_auth(out.server, "role smsrepl-target-data", "expected smsrepl-source")


@pytest.mark.reliability("tls", "client without a certificate")
def test_client_without_certificate_is_refused(plain):
    anon = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anon.check_hostname = False
    anon.load_verify_locations(cadata=plain.ca)
    out = handshake(server_context(plain), anon)
    assert_auth(out.server, "peer did not present a certificate")
    assert_auth(out.client)


@pytest.mark.reliability("tls", "TLS 1.2 client (TLS 1.3 only)")
def test_tls12_client_is_refused(plain):
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.load_verify_locations(cadata=plain.ca)
    out = handshake(server_context(plain), old)
    refused(out)
    assert_auth(out.server, "TLS 1.3")
    assert_auth(out.client)


@pytest.mark.reliability("tls", "plaintext client (SMS.0304)")
@pytest.mark.parametrize("payload", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HELLO smsrepl plaintext\r\n"])
def test_plaintext_client_is_classified(plain, payload):
    sctx = server_context(plain)
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    result: list = []

    def serve():
        raw, _ = ls.accept()
        raw.settimeout(TIMEOUT)
        try:
            sctx.wrap_socket(raw, server_side=True)
        except Exception as exc:
            result.append(classify_ssl_error(exc, server_side=True))
        finally:
            raw.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with socket.create_connection(ls.getsockname(), timeout=TIMEOUT) as c:
        c.sendall(payload)
        t.join(TIMEOUT + 1)
    ls.close()
    assert len(result) == 1
    assert_auth(result[0], "not a TLS client")


def _bio_pair(cctx, sctx):
    """A client and a server SSLObject joined by memory BIOs (asyncio style), and a function
    that runs their handshake."""
    cin, cout, sin, sout = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    cli, srv = cctx.wrap_bio(cin, cout), sctx.wrap_bio(sin, sout, server_side=True)

    def shake():
        done = {cli: False, srv: False}
        for _ in range(10):
            for obj in (cli, srv):
                if not done[obj]:
                    try:
                        obj.do_handshake()
                        done[obj] = True
                    except ssl.SSLWantReadError:
                        pass
            sin.write(cout.read())
            cin.write(sout.read())
        assert all(done.values())

    return cli, srv, shake


def test_check_peer_role_on_sslobject(plain):
    """Memory-BIO handshake (asyncio style): check_peer_role takes SSLObject."""
    cli, srv, shake = _bio_pair(client_context(plain), server_context(plain))
    with pytest.raises(AuthenticationError):
        check_peer_role(cli, "target-data")  # not done yet
    shake()
    check_peer_role(cli, "target-data")
    check_peer_role(srv, "source")
    with pytest.raises(AuthenticationError):
        check_peer_role(cli, "source")
    with pytest.raises(AuthenticationError):
        check_peer_role(srv, "target-mgmt")


def test_classify_other_errors():
    assert isinstance(classify_ssl_error(ConnectionResetError(104, "reset")), TransportError)
    assert isinstance(classify_ssl_error(ssl.SSLEOFError(8, "eof")), TransportError)
    timeout = classify_ssl_error(TimeoutError("timed out"))
    assert isinstance(timeout, TransportError) and str(timeout).endswith("timed out during the TLS handshake")


# -- no decrypted key on disk -------------------------------------------------------------
# Only places this process could have written to are inspected (never the machine's /tmp as a
# whole: other programs' files are not ours to read, and walking them took 42 s on a shared
# machine): the temporary, home and XDG directories are pointed at a fresh tmp_path, every file
# the process opens for writing is recorded (an audit hook), and its open descriptors and
# mappings are looked at while OpenSSL holds the key.
_WRITES: list | None = None  # the audit hook records into it while set


def _audit(event, args):
    if _WRITES is not None and event == "open" and args and isinstance(args[0], (str, bytes)):
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
            _WRITES.append(os.fsdecode(args[0]))


_AUDIT_INSTALLED = False


def _files_of_process() -> set[str]:
    """Paths of the regular files this process has open or mapped (its /proc entries only)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                out.add(parts[5].strip())
    return {p for p in out if p.startswith("/") and not p.startswith(("/memfd:", "/dev/", "/proc/"))}


def _files_under(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.reliability("secrets", "decrypted keys never written to a file")
def test_keys_go_through_memfd_only(locked, monkeypatch, tmp_path):
    global _WRITES, _AUDIT_INSTALLED
    import sys

    home = tmp_path / "home"
    for sub in ("tmp", "home", "xdg-state", "xdg-cache", "xdg-config", "xdg-data", "xdg-runtime", "cwd"):
        (tmp_path / sub).mkdir()
    for var, sub in (("TMPDIR", "tmp"), ("HOME", "home"), ("XDG_STATE_HOME", "xdg-state"),
                     ("XDG_CACHE_HOME", "xdg-cache"), ("XDG_CONFIG_HOME", "xdg-config"),
                     ("XDG_DATA_HOME", "xdg-data"), ("XDG_RUNTIME_DIR", "xdg-runtime")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.chdir(tmp_path / "cwd")
    assert tempfile.gettempdir() == str(tmp_path / "tmp") and os.path.expanduser("~") == str(home)

    calls = []
    held = []  # the process's files while OpenSSL reads the key
    real = ssl.SSLContext.load_cert_chain

    def spy(self, certfile, keyfile=None, password=None):
        for path in (certfile, keyfile):
            assert str(path).startswith("/proc/self/fd/")
            target = os.readlink(path)
            assert target.startswith("/memfd:smsrepl-"), target
        with open(keyfile, "rb") as fh:
            calls.append(fh.read())
        held.append(_files_of_process())
        return real(self, certfile, keyfile, password)

    if not _AUDIT_INSTALLED:  # an audit hook cannot be removed: one, idle outside this test
        sys.addaudithook(_audit)
        _AUDIT_INSTALLED = True
    files_before = _files_of_process()
    fds_before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spy)
    _WRITES = []
    try:
        client_context(locked, PASS)
        server_context(locked, PASS)
        server_context(locked, PASS, role="mgmt")
    finally:
        writes, _WRITES = _WRITES, None
    monkeypatch.undo()
    # What reached OpenSSL is the PEM as given: still encrypted.
    assert calls == [
        locked.private_key.encode(),
        locked.target_data_private_key.encode(),
        locked.target_mgmt_private_key.encode(),
    ]
    assert all(b"ENCRYPTED PRIVATE KEY" in c for c in calls)
    # memfds are closed again; no file was opened for writing, none held open or mapped but
    # those the process had before, and nothing appeared where it keeps files.
    assert set(os.listdir("/proc/self/fd")) <= fds_before | {str(n) for n in range(3)}
    assert writes == []
    for files in held + [_files_of_process()]:
        for p in sorted(files - files_before):
            try:
                data = Path(p).read_bytes()
            except OSError:
                continue
            assert b"PRIVATE KEY" not in data, p
    assert _files_under(tmp_path) == {}


# -- the start-up path: cryptography's x509 only where it is needed ------------------------
def _shaken(cctx, sctx):
    cli, srv, shake = _bio_pair(cctx, sctx)
    shake()
    return cli, srv


def _foreign(protocol, bundle, cert_field, key_field, tmp_path):
    """A context made without smsrepl's help, presenting the same certificate."""
    ctx = ssl.SSLContext(protocol)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle.ca)
    cert, key = tmp_path / f"{cert_field}.pem", tmp_path / f"{key_field}.pem"
    cert.write_text(getattr(bundle, cert_field))
    key.write_text(getattr(bundle, key_field))
    ctx.load_cert_chain(cert, key)
    return ctx


def _outcome(conn, role):
    try:
        check_peer_role(conn, role)
        return "accepted"
    except AuthenticationError as exc:
        return str(exc)


@pytest.mark.parametrize("server_role", ["data", "mgmt"])
def test_role_checks_agree_with_and_without_our_contexts(plain, server_role, tmp_path):
    """Our contexts take the subject from OpenSSL's verified certificate; any other context's
    peer certificate is parsed again: the verdicts are the same."""
    ours = _shaken(client_context(plain), server_context(plain, role=server_role))
    theirs = _shaken(_foreign(ssl.PROTOCOL_TLS_CLIENT, plain, "cert", "private_key", tmp_path),
                       _foreign(ssl.PROTOCOL_TLS_SERVER, plain, f"target_{server_role}_cert",
                                f"target_{server_role}_private_key", tmp_path))
    verdicts = []
    for cli, srv in (ours, theirs):
        verdicts.append([_outcome(cli, r) for r in ("target-data", "target-mgmt", "source")]
                        + [_outcome(srv, r) for r in ("source", "target-data")])
    assert verdicts[0] == verdicts[1]
    assert verdicts[0][0 if server_role == "data" else 1] == "accepted"
    assert verdicts[0][2] != "accepted" and "smsrepl-source" in verdicts[0][2] and verdicts[0][3] == "accepted"


def test_a_validated_bundle_is_not_parsed_again(plain, tmp_path, monkeypatch):
    import smsrepl.transport.certkey as tls

    monkeypatch.setattr(tls, "_VALIDATED", set())
    path = tmp_path / "certkey.json"
    path.write_text(plain.to_json())
    known = tls.ValidatedBundles(tmp_path / "validated")
    assert CertKey.load(path, known=known) == plain
    assert plain.digest() in known
    monkeypatch.setattr(tls, "_VALIDATED", set())  # a new process: only the store remembers

    def refuse(*a):
        raise AssertionError("parsed again")

    monkeypatch.setattr(tls, "_parse_certs", refuse)
    assert CertKey.load(path, known=known) == plain
    # another bundle (or another smsrepl or cryptography version) is validated in full
    damaged = json.loads(plain.to_json())
    damaged["target_mgmt_cert"] = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    path.write_text(json.dumps(damaged))
    with pytest.raises(AssertionError, match="parsed again"):
        CertKey.load(path, known=known)
    monkeypatch.undo()
    monkeypatch.setattr(tls, "_VALIDATED", set())
    with pytest.raises(CertificateError, match="target_mgmt_cert"):
        CertKey.load(path, known=known)
    assert len(os.listdir(tmp_path / "validated")) == 1  # the damaged one never gets a mark
    monkeypatch.setattr(tls, "__version__", "0.0.0-other")
    assert plain.digest() not in known


def test_the_validated_store_is_bounded_and_never_fails_a_load(plain, tmp_path, monkeypatch):
    import smsrepl.transport.certkey as tls

    known = tls.ValidatedBundles(tmp_path / "validated")
    for i in range(tls.ValidatedBundles.KEEP + 5):
        known.add(f"{i:064x}")
    assert len(os.listdir(tmp_path / "validated")) == tls.ValidatedBundles.KEEP
    (tmp_path / "file").write_text("")
    nowhere = tls.ValidatedBundles(tmp_path / "file" / "validated")  # cannot be made: ENOTDIR
    monkeypatch.setattr(tls, "_VALIDATED", set())
    path = tmp_path / "certkey.json"
    path.write_text(plain.to_json())
    assert CertKey.load(path, known=nowhere) == plain
    assert plain.digest() not in nowhere


def test_a_second_sender_start_does_not_import_cryptography_x509(plain, tmp_path):
    """The CLI remembers the bundle it validated: the next start (the next sync round) goes
    without cryptography's x509 modules, through the whole TLS handshake and role check."""
    import subprocess
    import sys

    from smsrepl.lab.certs import write_certkey
    from smsrepl.transport.receiver import Receiver

    ck = str(write_certkey(tmp_path / "certs", plain))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"x")
    rx = Receiver({"t": str(tmp_path / "dst")}, server_context(plain), str(tmp_path / "rx-state"), idle_timeout=10, create=True)
    host, port = rx.start()
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
    try:
        imported = []
        for _ in range(2):
            cp = subprocess.run([sys.executable, "-X", "importtime", "-m", "smsrepl", "send", "files", "--json",
                                 str(tmp_path / "src"), "--to", f"{host}:{port}", "--target", "t", "--certkey", ck],
                                capture_output=True, text=True, timeout=60, env=env)
            assert cp.returncode == 0, cp.stderr[-2000:]
            imported.append("cryptography.x509" in cp.stderr)
    finally:
        rx.stop()
    assert imported == [True, False]
    assert (tmp_path / "dst" / "f").read_bytes() == b"x"


def test_bundles_of_two_cas_are_named_as_such_on_both_sides(plain):
    from smsrepl.transport.tls_errors import OTHER_BUNDLE_HINT

    out = handshake(server_context(plain), client_context(make_bundle()))
    refused(out)
    assert_auth(out.client, "certificate verify failed", "not issued by this bundle's CA", OTHER_BUNDLE_HINT)
    assert_auth(out.server, "unknown CA", OTHER_BUNDLE_HINT)
    # another refusal keeps its own words: no hint where the CA is the same
    bad = expired_bundle()
    out = handshake(server_context(bad), client_context(bad))
    assert OTHER_BUNDLE_HINT not in str(out.client)
