"""Mutual TLS for smsrepl: the certkey bundle, SSL contexts, peer-role checks.

The control plane hands the agent a "certkey" JSON (API 5.7.1) with exactly
the keys of :class:`CertKey`, all PEM strings.  The private keys may be
encrypted PEM protected by a per-task passphrase (5.4.11).

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
the client's Finished).  :func:`classify_ssl_error` maps that alert too, so
protocols should read something from the server (a greeting) before trusting
the session.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import ssl
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Union

import cryptography

from smsrepl import __version__
from smsrepl.errors import (
    AuthenticationError,
    CertificateError,
    ConfigError,
    ReplicationError,
    TransportError,
)

if TYPE_CHECKING:
    from cryptography import x509

# cryptography's x509 and serialization modules are imported where they are used: importing
# them took ~70 ms of the ~0.5 s a sender CLI runs for a sync round of a 50,000-file tree, and
# a bundle validated before (ValidatedBundles) with a context made here needs neither

__all__ = [
    "CertKey",
    "OU_SOURCE",
    "OU_TARGET_DATA",
    "OU_TARGET_MGMT",
    "ROLE_SOURCE",
    "ROLE_TARGET_DATA",
    "ROLE_TARGET_MGMT",
    "check_peer_role",
    "classify_ssl_error",
    "client_context",
    "load_passphrase",
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
#: digests (CertKey.digest) of the bundles this process validated
_VALIDATED: set[str] = set()

#: Largest certkey file accepted (the real ones are a few KiB).
MAX_CERTKEY_BYTES = 1 << 20
#: OpenSSL's limit for a PEM passphrase (PEM_BUFSIZE); Python enforces it too.
MAX_PASSPHRASE_BYTES = 1024

_CERT_FIELDS = ("ca", "cert", "target_mgmt_cert", "target_data_cert")
#: private-key field -> the certificate field it belongs to
_KEY_FIELDS = {
    "private_key": "cert",
    "target_mgmt_private_key": "target_mgmt_cert",
    "target_data_private_key": "target_data_cert",
}
_KEY_LABELS = {"PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY"}
_PEM_BLOCK = re.compile(
    r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL
)
_PEM_BEGIN = re.compile(r"-----BEGIN ")


@dataclass(frozen=True, slots=True)
class CertKey:
    """The certkey bundle of API 5.7.1: seven PEM strings, exactly these keys."""

    ca: str
    cert: str
    private_key: str
    target_mgmt_cert: str
    target_mgmt_private_key: str
    target_data_cert: str
    target_data_private_key: str

    def __post_init__(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), str):
                raise CertificateError(f"certkey: key {f.name!r} must be a PEM string")

    def __repr__(self) -> str:  # never show key material
        return "CertKey(<redacted>)"

    # -- (de)serialisation -------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_json(cls, text: Union[str, bytes, bytearray], *, source: str = "certkey",
                  known: "ValidatedBundles | None" = None) -> "CertKey":
        """Parse and validate a certkey JSON document.

        Raises :class:`CertificateError` (SMS.3301) for invalid JSON, missing
        or extra keys, non-string values and invalid PEM.  ``source`` names
        the document in messages (e.g. the file path); ``known``: see validate().
        """
        if isinstance(text, (bytes, bytearray)):
            if len(text) > MAX_CERTKEY_BYTES:
                raise CertificateError(f"{source}: larger than {MAX_CERTKEY_BYTES} bytes")
            try:
                text = bytes(text).decode("utf-8-sig")
            except UnicodeDecodeError:
                raise CertificateError(f"{source}: not UTF-8 text") from None
        elif not isinstance(text, str):
            raise CertificateError(f"{source}: expected JSON text, got {type(text).__name__}")
        if len(text) > MAX_CERTKEY_BYTES:
            raise CertificateError(f"{source}: larger than {MAX_CERTKEY_BYTES} bytes")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            # exc.msg and the position only: never echo the document.
            raise CertificateError(
                f"{source}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
            ) from None
        except RecursionError:
            raise CertificateError(f"{source}: invalid JSON (nested too deeply)") from None
        return cls.from_mapping(doc, source=source, known=known)

    @classmethod
    def from_mapping(cls, doc: object, *, source: str = "certkey", known: "ValidatedBundles | None" = None
                     ) -> "CertKey":
        if not isinstance(doc, Mapping):
            raise CertificateError(f"{source}: expected a JSON object with the certkey keys")
        names = cls.field_names()
        missing = [n for n in names if n not in doc]
        extra = sorted(str(k) for k in doc if k not in names)
        if missing:
            raise CertificateError(f"{source}: missing key(s): {', '.join(missing)}")
        if extra:
            # Names only, truncated: a stray key could be anything.
            shown = ", ".join(repr(k[:40]) for k in extra[:5])
            raise CertificateError(f"{source}: unexpected key(s): {shown}")
        for n in names:
            if not isinstance(doc[n], str):
                raise CertificateError(f"{source}: key {n!r} must be a PEM string, not {_json_type(doc[n])}")
        certkey = cls(**{n: doc[n] for n in names})
        certkey.validate(source=source, known=known)
        return certkey

    @classmethod
    def load(cls, path: Union[str, os.PathLike[str]], *, known: "ValidatedBundles | None" = None) -> "CertKey":
        """Read and validate a certkey JSON file (SMS.3301 on any problem; ``known``: see validate())."""
        p = Path(path)
        try:
            with open(p, "rb") as fh:
                data = fh.read(MAX_CERTKEY_BYTES + 1)
        except OSError as exc:
            raise CertificateError(f"cannot read certificate bundle {p}: {exc.strerror or exc}") from None
        return cls.from_json(data, source=str(p), known=known)

    def to_json(self) -> str:
        return json.dumps({n: getattr(self, n) for n in self.field_names()}, indent=2) + "\n"

    # -- validation --------------------------------------------------------
    def validate(self, *, source: str = "certkey", known: "ValidatedBundles | None" = None) -> None:
        """Check every PEM: certificates parse, keys are private keys.

        An unencrypted key is also checked against its certificate.  An
        encrypted key can only be checked once the passphrase is known
        (when a context is built). A bundle this process, or ``known``,
        validated before is not checked again; one that passes is added to
        ``known``.
        """
        digest = self.digest()
        if digest in _VALIDATED or (known is not None and digest in known):
            _VALIDATED.add(digest)
            return
        certs: dict[str, list[x509.Certificate]] = {}
        for n in _CERT_FIELDS:
            certs[n] = _parse_certs(getattr(self, n), n, source)
        for n, cert_field in _KEY_FIELDS.items():
            key = _parse_key(getattr(self, n), n, source)
            if key is not None and not _same_public_key(key.public_key(), certs[cert_field][0].public_key()):
                raise CertificateError(f"{source}: key {n!r} does not match {cert_field!r}")
        _VALIDATED.add(digest)
        if known is not None:
            known.add(digest)

    def digest(self) -> str:
        """SHA-256 of the bundle and of the versions that judged it (a newer smsrepl or
        cryptography validates again)."""
        h = hashlib.sha256(f"{__version__}\0{cryptography.__version__}".encode())
        for n in self.field_names():
            h.update(b"\0" + getattr(self, n).encode("utf-8", "surrogatepass"))
        return h.hexdigest()

    def key_is_encrypted(self, field: str) -> bool:
        if field not in _KEY_FIELDS:
            raise ValueError(f"not a private-key field: {field!r}")
        return _key_is_encrypted(getattr(self, field))


class ValidatedBundles:
    """Digests of bundles validated before, as empty files in ``directory`` (the newest KEEP).

    A sender CLI starts for every round with the same bundle: with this it skips parsing
    the bundle with cryptography again, and with it importing cryptography's x509 modules
    (~70 ms of such a start). Only those format checks are skipped: OpenSSL still parses
    and verifies everything a context uses. The store is a cache: an unwritable directory
    only means validating every time."""

    KEEP = 16

    def __init__(self, directory: Union[str, os.PathLike[str]]) -> None:
        self.directory = os.fspath(directory)

    def __contains__(self, digest: str) -> bool:
        return os.path.isfile(os.path.join(self.directory, digest))

    def add(self, digest: str) -> None:
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            with open(os.path.join(self.directory, digest), "w"):
                pass
            marks = sorted(os.scandir(self.directory), key=lambda e: e.stat().st_mtime_ns, reverse=True)
            for old in marks[self.KEEP:]:
                os.unlink(old.path)
        except OSError:
            pass


def _json_type(value: object) -> str:
    return {dict: "an object", list: "an array", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _pem_blocks(text: str, name: str, source: str) -> list[tuple[str, str]]:
    try:
        text.encode("ascii")
    except UnicodeEncodeError:
        raise CertificateError(f"{source}: key {name!r}: PEM contains non-ASCII characters") from None
    blocks = [(m.group(1), m.group(0)) for m in _PEM_BLOCK.finditer(text)]
    if not blocks:
        raise CertificateError(f"{source}: key {name!r}: no PEM block found")
    if len(_PEM_BEGIN.findall(text)) != len(blocks):
        raise CertificateError(f"{source}: key {name!r}: malformed PEM (unterminated block)")
    return blocks


def _parse_certs(text: str, name: str, source: str) -> list[x509.Certificate]:
    from cryptography import x509

    blocks = _pem_blocks(text, name, source)
    out = []
    for label, block in blocks:
        if label != "CERTIFICATE":
            raise CertificateError(f"{source}: key {name!r}: expected only CERTIFICATE PEM blocks, found {label!r}")
        try:
            cert = x509.load_pem_x509_certificate(block.encode("ascii"))
            # the parse is lazy: touch what later checks read, so damage shows here
            cert.public_key(), cert.subject, cert.issuer, cert.extensions
            out.append(cert)
        except Exception:  # noqa: BLE001 - damaged DER raises ValueError, TypeError, DuplicateExtension...
            raise CertificateError(f"{source}: key {name!r}: invalid PEM certificate") from None
    return out


def _key_is_encrypted(text: str) -> bool:
    return "ENCRYPTED PRIVATE KEY" in text or "Proc-Type: 4,ENCRYPTED" in text


def _parse_key(text: str, name: str, source: str):
    """Return the key when unencrypted, None when encrypted; raise if invalid."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    blocks = _pem_blocks(text, name, source)
    keys = [b for label, b in blocks if label in _KEY_LABELS]
    others = [label for label, _ in blocks if label not in _KEY_LABELS and label != "EC PARAMETERS"]
    if others or len(keys) != 1:
        raise CertificateError(f"{source}: key {name!r}: expected exactly one PEM private key")
    try:
        return serialization.load_pem_private_key(keys[0].encode("ascii"), password=None)
    except TypeError:
        # "Password was not given but private key is encrypted": well formed,
        # checked with the passphrase when the context is built.
        if _key_is_encrypted(keys[0]):
            return None
        raise CertificateError(f"{source}: key {name!r}: invalid PEM private key") from None
    except UnsupportedAlgorithm:
        raise CertificateError(f"{source}: key {name!r}: unsupported private key type") from None
    except ValueError:
        raise CertificateError(f"{source}: key {name!r}: invalid PEM private key") from None


def _same_public_key(a, b) -> bool:
    from cryptography.hazmat.primitives import serialization

    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(serialization.Encoding.DER, fmt) == b.public_bytes(serialization.Encoding.DER, fmt)


# -- passphrase ----------------------------------------------------------------
def load_passphrase(path: Union[str, os.PathLike[str]]) -> bytes:
    """Read a passphrase file; strip one trailing newline (``\\n`` or ``\\r\\n``)."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            data = fh.read(MAX_PASSPHRASE_BYTES + 3)
    except OSError as exc:
        raise CertificateError(f"cannot read passphrase file {p}: {exc.strerror or exc}") from None
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise CertificateError(f"passphrase file {p} is empty")
    if len(data) > MAX_PASSPHRASE_BYTES:
        raise CertificateError(f"passphrase in {p} is longer than {MAX_PASSPHRASE_BYTES} bytes")
    return data


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
    encrypted = _key_is_encrypted(key_pem)
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
        names = (value for rdn in verified.get("subject", ()) for key, value in rdn
                 if key in ("organizationalUnitName", "commonName") and isinstance(value, str))
        _refuse_other_roles(_roles(names), role)
        return
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise AuthenticationError("peer certificate cannot be parsed") from None
    try:
        eku = cert.extensions.get_extension_for_oid(ExtensionOID.EXTENDED_KEY_USAGE).value
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


# -- errors -----------------------------------------------------------------------
OTHER_BUNDLE_HINT = ("the two hosts use different certkey bundles: copy the same certkey.json to both "
                     "(smsrepl certs init once)")
#: X509 verify results meaning "not issued by a CA this context trusts": unable to get issuer
#: certificate (2, 20), self-signed leaf or chain (18, 19), leaf signature unverifiable (21),
#: signature failure (7: a CA of the same name but another key), key identifiers differ (30)
_OTHER_CA_CODES = frozenset({2, 7, 18, 19, 20, 21, 30})
_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "peer did not present a certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "peer requires a certificate and none was sent",
    "UNSUPPORTED_PROTOCOL": "peer does not support TLS 1.3",
    "NO_PROTOCOLS_AVAILABLE": "no TLS version in common with the peer (TLS 1.3 required)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "peer refused TLS 1.3 (protocol version alert)",
    "TLSV1_ALERT_UNKNOWN_CA": "peer rejected our certificate: unknown CA (our certificate was not issued by the "
                              "peer's bundle's CA); " + OTHER_BUNDLE_HINT,
    "SSLV3_ALERT_BAD_CERTIFICATE": "peer rejected our certificate: bad certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "peer rejected our certificate: unsupported certificate (wrong role or key usage)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "peer rejected our certificate: certificate expired or not yet valid",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "peer rejected our certificate: certificate unknown",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "peer rejected our certificate: certificate revoked",
    "TLSV1_ALERT_ACCESS_DENIED": "peer denied access",
    "TLSV1_ALERT_DECRYPT_ERROR": "peer could not verify the handshake signature",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "peer aborted the handshake (no common parameters)",
    "NO_SHARED_CIPHER": "no cipher in common with the peer",
    "HTTP_REQUEST": "not a TLS peer (received an HTTP request)",
    "HTTPS_PROXY_REQUEST": "not a TLS peer (received a proxy request)",
}
_NOT_TLS = {"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
            "UNEXPECTED_RECORD", "UNEXPECTED_MESSAGE", "RECORD_TOO_LARGE", "ENCRYPTED_LENGTH_TOO_LONG",
            "HTTP_REQUEST", "HTTPS_PROXY_REQUEST"}


def classify_ssl_error(exc: BaseException, *, server_side: bool | None = None) -> ReplicationError:
    """Map an exception raised during a TLS handshake to a ReplicationError.

    * certificate verification failures, alerts from the peer, protocol
      version mismatches, a peer that does not speak TLS and any other
      ``ssl.SSLError`` -> :class:`AuthenticationError` (SMS.0304) with a plain
      cause, e.g. ``certificate verify failed: certificate has expired``;
    * the connection closing or breaking mid-handshake (EOF, reset, timeout)
      -> :class:`TransportError` (resumable);
    * a ReplicationError is returned unchanged.

    ``server_side`` only words the "not TLS" case ("not a TLS client" on the
    server, "not a TLS server" on the client).
    """
    if isinstance(exc, ReplicationError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or getattr(exc, "reason", None) or "unknown reason"
        if exc.verify_code in _OTHER_CA_CODES:
            return AuthenticationError(f"certificate verify failed: {detail}: the peer's certificate was not "
                                       f"issued by this bundle's CA; {OTHER_BUNDLE_HINT}")
        return AuthenticationError(f"certificate verify failed: {detail}")
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return TransportError("connection closed during the TLS handshake")
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or ""
        if reason in _NOT_TLS:
            who = {True: "not a TLS client", False: "not a TLS server", None: "peer does not speak TLS"}[server_side]
            extra = " (received an HTTP request)" if reason in ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST") else ""
            return AuthenticationError(who + extra)
        if reason in _REASONS:
            return AuthenticationError(_REASONS[reason])
        if "ALERT" in reason:
            alert = reason.split("ALERT_", 1)[-1].replace("_", " ").lower()
            return AuthenticationError(f"peer aborted the handshake: {alert}")
        return AuthenticationError(f"TLS handshake failed: {(reason or 'unknown error').replace('_', ' ').lower()}")
    if isinstance(exc, socket.timeout):
        return TransportError("timed out during the TLS handshake")
    if isinstance(exc, OSError):
        return TransportError(f"connection failed during the TLS handshake: {exc.strerror or exc.__class__.__name__}")
    return AuthenticationError(f"TLS handshake failed: {exc.__class__.__name__}")
