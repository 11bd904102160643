"""Lab bundle generation and the certkey.json writer."""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smsrepl.lab.certs import (CERTKEY_FILENAME, LabCA, expired_bundle, make_bundle,
                               not_yet_valid_bundle, write_certkey)
from smsrepl.errors import CertificateError, ConfigError
from smsrepl.transport.certkey import CertKey
from smsrepl.transport.tls import client_context, server_context

PASS = b"lab-passphrase"
NOW = dt.datetime.now(dt.timezone.utc)


def _cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def _eku(cert):
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _ou(cert):
    return [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]


def test_bundle_shape_and_roles():
    now = dt.datetime.now(dt.timezone.utc)
    b = make_bundle()
    doc = json.loads(b.to_json())
    assert set(doc) == {
        "ca", "cert", "private_key", "target_mgmt_cert", "target_mgmt_private_key",
        "target_data_cert", "target_data_private_key",
    }
    ca, src, mgmt, data = (_cert(b.ca), _cert(b.cert), _cert(b.target_mgmt_cert), _cert(b.target_data_cert))
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for leaf in (src, mgmt, data):
        assert leaf.issuer == ca.subject
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
        assert leaf.public_key().curve.name == "secp256r1"
        assert leaf.not_valid_before_utc <= now + dt.timedelta(seconds=5) < leaf.not_valid_after_utc
    assert _eku(src) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _eku(mgmt) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert _eku(data) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert _ou(src) == ["smsrepl-source"]
    assert _ou(mgmt) == ["smsrepl-target-mgmt"]
    assert _ou(data) == ["smsrepl-target-data"]
    for leaf in (mgmt, data):
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert set(san.get_values_for_type(x509.IPAddress)) == {
            ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")
        }
        assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    # Validates (keys match their certs) and round-trips.
    assert CertKey.from_json(b.to_json()) == b
    # A fresh CA every time.
    assert make_bundle().ca != b.ca


def test_days_parameter():
    b = make_bundle(days=10)
    leaf = _cert(b.cert)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(days=10)


def test_passphrase_encrypts_every_key():
    b = make_bundle(PASS)
    for pem in (b.private_key, b.target_mgmt_private_key, b.target_data_private_key):
        assert pem.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        with pytest.raises(TypeError):
            serialization.load_pem_private_key(pem.encode(), None)
        serialization.load_pem_private_key(pem.encode(), PASS)
    assert PASS.decode() not in b.to_json()


def test_rsa_key_type_handshake_contexts():
    b = make_bundle(PASS, key_type="rsa")
    assert isinstance(_cert(b.cert).public_key(), rsa.RSAPublicKey)
    client_context(b, PASS)
    server_context(b, PASS)


def test_bad_parameters():
    with pytest.raises(ConfigError):
        make_bundle(key_type="dsa")
    with pytest.raises(ConfigError):
        make_bundle(not_before=NOW, not_after=NOW - dt.timedelta(days=1))
    with pytest.raises(ConfigError):
        make_bundle(days=0)


def test_hostile_validity_variants():
    old = expired_bundle()
    assert _cert(old.cert).not_valid_after_utc < NOW
    assert _cert(old.ca).not_valid_after_utc > NOW  # only the leaves are bad
    early = not_yet_valid_bundle()
    assert _cert(early.target_data_cert).not_valid_before_utc > NOW
    assert _cert(early.ca).not_valid_before_utc < NOW


def test_shared_ca_and_custom_issue():
    ca = LabCA.create()
    a, b = make_bundle(ca=ca), make_bundle(ca=ca)
    assert a.ca == b.ca and a.cert != b.cert
    cert, key = ca.issue("no-role", ou=None, eku=None, san=False)
    c = _cert(cert)
    assert _ou(c) == []
    with pytest.raises(x509.ExtensionNotFound):
        c.extensions.get_extension_for_class(x509.ExtendedKeyUsage)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_certkey_modes_and_content(tmp_path):
    b = make_bundle(PASS)
    old_umask = os.umask(0o022)
    try:
        out = tmp_path / "new" / "dir"
        path = write_certkey(out, b)
    finally:
        os.umask(old_umask)
    assert path == out / CERTKEY_FILENAME
    assert _mode(path) == 0o600
    assert _mode(out) == 0o700
    assert CertKey.load(path) == b
    assert os.listdir(out) == [CERTKEY_FILENAME]  # no temp file left behind


def test_write_certkey_mode_is_exact_whatever_the_umask(tmp_path):
    old_umask = os.umask(0o000)
    try:
        path = write_certkey(tmp_path, make_bundle())
    finally:
        os.umask(old_umask)
    assert _mode(path) == 0o600


def test_write_certkey_replaces_atomically(tmp_path):
    first, second = make_bundle(), make_bundle()
    write_certkey(tmp_path, first)
    inode = os.stat(tmp_path / CERTKEY_FILENAME).st_ino
    path = write_certkey(tmp_path, second)
    assert CertKey.load(path) == second
    assert os.stat(path).st_ino != inode  # renamed over, not rewritten in place
    assert _mode(path) == 0o600
    assert sorted(os.listdir(tmp_path)) == [CERTKEY_FILENAME]


def test_write_certkey_no_overwrite(tmp_path):
    first = make_bundle()
    write_certkey(tmp_path, first)
    with pytest.raises(CertificateError) as ei:
        write_certkey(tmp_path, make_bundle(), overwrite=False)
    assert ei.value.code == "SMS.3301" and "already exists" in str(ei.value)
    assert CertKey.load(tmp_path / CERTKEY_FILENAME) == first
    assert os.listdir(tmp_path) == [CERTKEY_FILENAME]


def test_write_certkey_existing_dir_mode_kept(tmp_path):
    d = tmp_path / "shared"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    write_certkey(d, make_bundle())
    assert _mode(d) == 0o755
    assert _mode(d / CERTKEY_FILENAME) == 0o600


def test_write_certkey_errors(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CertificateError):
        write_certkey(f, make_bundle())
    if os.geteuid() != 0:  # root ignores directory permissions
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(CertificateError):
            write_certkey(ro, make_bundle())
