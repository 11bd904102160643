"""Mutual TLS for smsrepl: SSL contexts from a certkey bundle (certkey.py), peer-role checks.

What is enforced, and where:

* TLS 1.3 only (minimum and maximum), both directions authenticated
  (``CERT_REQUIRED`` on client and server), trust anchored in the bundle's
  ``ca`` only: the system trust store is never loaded.
* No hostname check: the control plane gives IP addresses, and the peer's
  identity is its CA plus its role (below).
* Extended Key Usage: OpenSSL checks the purpose of the peer certificate
  (a client must present a certificate usable for clientAuth, a server one
  usable for serverAuth); a certificate *without* an EKU extension passes
  that check, as in OpenSSL.  :func:`check_peer_role` checks the EKU again
  from the DER so that a context built elsewhere cannot skip it.
* Role: :func:`check_peer_role` reads the subject OU and CN of the peer
  certificate.  If they name an smsrepl role (``smsrepl-source``,
  ``smsrepl-target-data``, ``smsrepl-target-mgmt``) other than the expected
  one, the peer is refused.  A certificate naming no smsrepl role is
  accepted (a real control plane may not set our OU).
* No session tickets from the server (no resumption, so every connection is
  a full handshake with certificate verification); no TLS compression.
* Private keys are never decrypted to a file: the PEM *as given* (still
  encrypted when it was) is written to an anonymous ``memfd`` and handed to
  OpenSSL as ``/proc/self/fd/N`` together with the passphrase; the memfd is
  closed right after loading.

Note on TLS 1.3: a client learns that the server rejected its certificate
only on its first read after the handshake (the server's alert comes after
the client's Finished).  :func:`~smsrepl.transport.tls_errors.classify_ssl_error`
maps that alert too, so protocols should read something from the server (a
greeting) before trusting the session.
"""
from __future__ import annotations

import os
import ssl
import weakref
from typing import TYPE_CHECKING, Union

from smsrepl.errors import AuthenticationError, CertificateError, ConfigError
from smsrepl.transport.certkey import MAX_PASSPHRASE_BYTES, CertKey, key_is_encrypted

if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "OU_SOURCE",
    "OU_TARGET_DATA",
    "OU_TARGET_MGMT",
    "ROLE_SOURCE",
    "ROLE_TARGET_DATA",
    "ROLE_TARGET_MGMT",
    "check_peer_role",
    "client_context",
    "server_context",
]

ROLE_SOURCE = "source"
ROLE_TARGET_DATA = "target-data"
ROLE_TARGET_MGMT = "target-mgmt"
OU_SOURCE = "smsrepl-source"
OU_TARGET_DATA = "smsrepl-target-data"
OU_TARGET_MGMT = "smsrepl-target-mgmt"

_ROLE_OU = {ROLE_SOURCE: OU_SOURCE, ROLE_TARGET_DATA: OU_TARGET_DATA, ROLE_TARGET_MGMT: OU_TARGET_MGMT}
_OU_ROLE = {ou: role for role, ou in _ROLE_OU.items()}
#: the purpose (EKU) the peer certificate must allow, when it has an EKU extension
_ROLE_PURPOSE = {ROLE_SOURCE: "clientAuth", ROLE_TARGET_DATA: "serverAuth", ROLE_TARGET_MGMT: "serverAuth"}
#: the contexts made by client_context() and server_context(), whose handshakes check the
#: peer's purpose (OpenSSL's "ssl_client"/"ssl_server" purpose check)
_OURS: "weakref.WeakSet[ssl.SSLContext]" = weakref.WeakSet()


# -- contexts --------------------------------------------------------------------
class _NoPassphrase(Exception):
    pass


def _refuse_prompt() -> bytes:
    # Without this callback OpenSSL would prompt for a passphrase on the TTY.
    raise _NoPassphrase()


def _memfd_with(data: bytes, name: str) -> int:
    if not hasattr(os, "memfd_create"):
        raise CertificateError("cannot load the private key: this platform has no memfd_create (Linux only)")
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _load_identity(
    ctx: ssl.SSLContext, certkey: CertKey, cert_field: str, key_field: str, passphrase: bytes | None
) -> None:
    """Load a certificate and its key into ``ctx`` from anonymous memfds."""
    key_pem: str = getattr(certkey, key_field)
    encrypted = key_is_encrypted(key_pem)
    if encrypted and passphrase is None:
        raise CertificateError(f"certkey: key {key_field!r} is encrypted but no passphrase was given")
    if passphrase is not None:
        if isinstance(passphrase, str):
            passphrase = passphrase.encode("utf-8")
        if not isinstance(passphrase, (bytes, bytearray)):
            raise ConfigError("the passphrase must be bytes")
        if len(passphrase) > MAX_PASSPHRASE_BYTES:
            raise CertificateError(f"the passphrase is longer than {MAX_PASSPHRASE_BYTES} bytes")
    password = bytes(passphrase) if passphrase is not None else _refuse_prompt
    cert_fd = _memfd_with(getattr(certkey, cert_field).encode("ascii"), "smsrepl-cert")
    try:
        key_fd = _memfd_with(key_pem.encode("ascii"), "smsrepl-key")
        try:
            ctx.load_cert_chain(f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}", password=password)
        finally:
            os.close(key_fd)
    except _NoPassphrase:
        raise CertificateError(f"certkey: key {key_field!r} is encrypted but no passphrase was given") from None
    except ssl.SSLError as exc:
        reason = getattr(exc, "reason", None) or ""
        if reason == "KEY_VALUES_MISMATCH":
            msg = f"certkey: key {key_field!r} does not match {cert_field!r}"
        elif encrypted:
            msg = f"certkey: cannot decrypt key {key_field!r}: wrong passphrase or damaged key"
        else:
            msg = f"certkey: cannot load key {key_field!r} with {cert_field!r}"
        raise CertificateError(msg) from None
    except (ValueError, TypeError):
        # e.g. "password cannot be longer than ..." -- never the value itself.
        raise CertificateError(f"certkey: cannot load key {key_field!r}: unusable passphrase") from None
    except OSError as exc:
        raise CertificateError(f"certkey: cannot load key {key_field!r}: {exc.strerror or 'I/O error'}") from None
    finally:
        os.close(cert_fd)


def _base_context(protocol: int, certkey: CertKey) -> ssl.SSLContext:
    """The one place where smsrepl's TLS defaults are set."""
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # Peers are addressed by IP from the control plane; identity = CA + role.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    # Trust the bundle's CA only (a bare SSLContext loads no system store).
    try:
        ctx.load_verify_locations(cadata=certkey.ca)
    except (ssl.SSLError, ValueError):
        raise CertificateError("certkey: key 'ca': cannot load the CA certificate") from None
    _OURS.add(ctx)
    return ctx


def _check_certkey(certkey: CertKey) -> None:
    if not isinstance(certkey, CertKey):
        raise ConfigError(f"expected a CertKey, got {type(certkey).__name__}")
    certkey.validate()


def client_context(certkey: CertKey, passphrase: bytes | None = None) -> ssl.SSLContext:
    """Context for the sender (source host): presents ``cert``/``private_key``.

    Verifies the server against ``ca`` only; the server certificate must be
    usable for serverAuth.  Call :func:`check_peer_role` after the handshake.
    """
    _check_certkey(certkey)
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, certkey)
    _load_identity(ctx, certkey, "cert", "private_key", passphrase)
    return ctx


def server_context(certkey: CertKey, passphrase: bytes | None = None, role: str = "data") -> ssl.SSLContext:
    """Context for the receiver (target host).

    Presents ``target_data_cert`` (``role="data"``) or ``target_mgmt_cert``
    (``role="mgmt"``); requires a client certificate from ``ca`` usable for
    clientAuth.  Sends no session tickets.
    """
    if role not in ("data", "mgmt"):
        raise ConfigError(f"unknown server role {role!r} (expected 'data' or 'mgmt')")
    _check_certkey(certkey)
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, certkey)
    ctx.num_tickets = 0
    _load_identity(ctx, certkey, f"target_{role}_cert", f"target_{role}_private_key", passphrase)
    return ctx


# -- after the handshake -------------------------------------------------------
def _normalise_role(role: str) -> str:
    if role in _ROLE_OU:
        return role
    if role in _OU_ROLE:
        return _OU_ROLE[role]
    if role in ("data", "mgmt"):
        return f"target-{role}"
    raise ConfigError(f"unknown smsrepl role {role!r}")


def _roles(values) -> set[str]:
    """The smsrepl roles that subject OU or CN ``values`` name."""
    return {r for v in values if (r := _OU_ROLE.get(v.strip().lower()))}


def peer_roles(cert: x509.Certificate) -> set[str]:
    """The smsrepl roles named by a certificate's subject OU or CN."""
    from cryptography.x509.oid import NameOID

    return _roles(attr.value if isinstance(attr.value, str) else ""
                  for oid in (NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.COMMON_NAME)
                  for attr in cert.subject.get_attributes_for_oid(oid))


def check_peer_role(conn: Union[ssl.SSLSocket, ssl.SSLObject], expected_role: str) -> None:
    """Check the verified peer certificate against ``expected_role``.

    ``expected_role`` is ``"source"``, ``"target-data"`` or ``"target-mgmt"``
    (the ``smsrepl-...`` names and ``"data"``/``"mgmt"`` are accepted too).
    Refuses (AuthenticationError) when: the session is not TLS 1.3; there is
    no peer certificate; the certificate has an EKU extension lacking the
    role's purpose (clientAuth for the source, serverAuth for targets); or its
    subject OU/CN names a *different* smsrepl role.  A certificate that names
    no smsrepl role is accepted.

    With a context made here, when the handshake checked the purpose the role
    needs, the subject comes from OpenSSL's verified certificate; otherwise the
    peer certificate is parsed again (cryptography) and its EKU checked.
    """
    role = _normalise_role(expected_role)
    try:
        version = conn.version()
        der = conn.getpeercert(binary_form=True)
    except ValueError:
        raise AuthenticationError("TLS handshake not complete") from None
    if version != "TLSv1.3":
        raise AuthenticationError(f"peer negotiated {version or 'no TLS version'}, TLS 1.3 required")
    if not der:
        raise AuthenticationError("peer did not present a certificate")
    # what the handshake checked: a server's certificate for serverAuth, a client's for clientAuth
    checked = "clientAuth" if getattr(conn, "server_side", None) else "serverAuth"
    ours = getattr(conn, "context", None) in _OURS and _ROLE_PURPOSE[role] == checked
    verified = conn.getpeercert() if ours else None
    if verified:
        names = (attr[1] for rdn in verified.get("subject", ()) if isinstance(rdn, tuple) for attr in rdn
                 if isinstance(attr, tuple) and attr[0] in ("organizationalUnitName", "commonName")
                 and isinstance(attr[1], str))
        _refuse_other_roles(_roles(names), role)
        return
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise AuthenticationError("peer certificate cannot be parsed") from None
    try:
        eku: x509.ExtendedKeyUsage | None = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    except ValueError:
        raise AuthenticationError("peer certificate has a malformed extension") from None
    purpose = _ROLE_PURPOSE[role]
    wanted = ExtendedKeyUsageOID.CLIENT_AUTH if purpose == "clientAuth" else ExtendedKeyUsageOID.SERVER_AUTH
    if eku is not None and wanted not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
        raise AuthenticationError(f"peer certificate is not usable for {purpose} (expected role {_ROLE_OU[role]})")
    _refuse_other_roles(peer_roles(cert), role)


def _refuse_other_roles(named: set[str], role: str) -> None:
    others = named - {role}
    if others:
        names = ", ".join(sorted(_ROLE_OU[r] for r in others))
        raise AuthenticationError(f"peer certificate is for role {names}, expected {_ROLE_OU[role]}")

