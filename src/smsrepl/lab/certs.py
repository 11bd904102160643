"""Lab certificate bundles: a throw-away CA and the certificates of one task.

The control plane normally hands the agent its "certkey" bundle (API 5.7.1).
For labs, tests and ``smsrepl certs init`` this module makes an equivalent
bundle with ``cryptography``:

* a fresh self-signed CA (basicConstraints CA:TRUE, pathlen 0);
* the source certificate (``cert``/``private_key``): EKU clientAuth only,
  subject ``OU=smsrepl-source``;
* the target management and data certificates: EKU serverAuth only, subject
  ``OU=smsrepl-target-mgmt`` / ``OU=smsrepl-target-data``, SAN IP 127.0.0.1,
  ::1 and DNS localhost.

Keys are ECDSA P-256 by default.  With a passphrase every private key is
encrypted PKCS#8 PEM (``BestAvailableEncryption``), as the control plane does
with its per-task passphrase (5.4.11).

Hostile variants for tests: ``expired_bundle``, ``not_yet_valid_bundle``, a
bundle from another CA (just another ``make_bundle``), and ``LabCA.issue``
for certificates with unusual EKU or subject.
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
import contextlib
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smsrepl.durable import fsync_dir
from smsrepl.errors import CertificateError, ConfigError
from smsrepl.transport.certkey import CertKey
from smsrepl.transport.tls import (
    OU_SOURCE,
    OU_TARGET_DATA,
    OU_TARGET_MGMT,
)

__all__ = [
    "CERTKEY_FILENAME",
    "LabCA",
    "expired_bundle",
    "make_bundle",
    "check_certkey_slot",
    "not_yet_valid_bundle",
    "write_certkey",
]

CERTKEY_FILENAME = "certkey.json"
#: Slack subtracted from "now" for a fresh bundle's notBefore (clock skew).
_SKEW = _dt.timedelta(minutes=5)
_ORG = "smsrepl lab"

_KeyTypes = ("ec", "rsa")


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _utc(value: _dt.datetime) -> _dt.datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=_dt.timezone.utc)
    return value.astimezone(_dt.timezone.utc)


def _validity(not_before: _dt.datetime | None, not_after: _dt.datetime | None,
              days: int) -> tuple[_dt.datetime, _dt.datetime]:
    """notBefore (by default five minutes ago) and notAfter (by default ``days`` after it), UTC."""
    nb = _utc(not_before) if not_before is not None else _now() - _SKEW
    na = _utc(not_after) if not_after is not None else nb + _dt.timedelta(days=days)
    return nb, na


def _key_usage(*, ca: bool, key_encipherment: bool = False) -> x509.KeyUsage:
    """A CA signs certificates and CRLs only; a leaf signs (and an RSA leaf enciphers keys)."""
    return x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=key_encipherment,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def _new_key(key_type: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ConfigError(f"unknown key type {key_type!r} (expected one of: {', '.join(_KeyTypes)})")


def _key_pem(key, passphrase: bytes | None) -> str:
    if passphrase is not None:
        if isinstance(passphrase, str):
            passphrase = passphrase.encode()
        if not passphrase:
            raise ConfigError("the passphrase is empty")
        enc: serialization.KeySerializationEncryption = serialization.BestAvailableEncryption(passphrase)
    else:
        enc = serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc).decode("ascii")


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


@dataclass(frozen=True, slots=True)
class LabCA:
    """A throw-away certificate authority that can issue leaf certificates."""

    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> str:
        return _cert_pem(self.cert)

    @classmethod
    def create(
        cls,
        *,
        key_type: str = "ec",
        not_before: _dt.datetime | None = None,
        not_after: _dt.datetime | None = None,
        days: int = 3650,
        name: str | None = None,
    ) -> "LabCA":
        key = _new_key(key_type)
        nb, na = _validity(not_before, not_after, days)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                x509.NameAttribute(NameOID.COMMON_NAME, name or f"smsrepl lab CA {secrets.token_hex(4)}"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key=key, cert=cert)

    def issue(
        self,
        common_name: str,
        *,
        ou: str | None = None,
        eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.SERVER_AUTH,),
        san: bool = True,
        not_before: _dt.datetime | None = None,
        not_after: _dt.datetime | None = None,
        days: int = 825,
        key_type: str = "ec",
        passphrase: bytes | None = None,
    ) -> tuple[str, str]:
        """Issue a leaf certificate; return ``(cert_pem, private_key_pem)``.

        ``ou=None`` leaves the subject without an organisational unit (like a
        certificate from a control plane that knows nothing of smsrepl roles);
        ``eku=None`` leaves out the Extended Key Usage extension.
        """
        key = _new_key(key_type)
        nb, na = _validity(not_before, not_after, days)
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG)]
        if ou is not None:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False, key_encipherment=key_type == "rsa"), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
                ),
                critical=False,
            )
        )
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                        x509.DNSName("localhost"),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return _cert_pem(cert), _key_pem(key, passphrase)


def make_bundle(
    passphrase: bytes | None = None,
    *,
    days: int = 825,
    not_before: _dt.datetime | None = None,
    not_after: _dt.datetime | None = None,
    key_type: str = "ec",
    ca: LabCA | None = None,
) -> CertKey:
    """Make a complete certkey bundle signed by a fresh CA (or by ``ca``).

    ``not_before``/``not_after`` (timezone-aware or UTC naive datetimes) set
    the validity of the three leaf certificates; by default they are valid
    from five minutes ago for ``days`` days.  A fresh CA is valid from before
    the earlier of "now" and the leaves' notBefore until after the later of
    "now" and their notAfter, so an expired or not-yet-valid bundle fails on
    its leaf certificates, not on its CA.
    """
    if key_type not in _KeyTypes:
        raise ConfigError(f"unknown key type {key_type!r} (expected one of: {', '.join(_KeyTypes)})")
    if days <= 0:
        raise ConfigError("days must be positive")
    now = _now()
    nb = _utc(not_before) if not_before is not None else now - _SKEW
    na = _utc(not_after) if not_after is not None else nb + _dt.timedelta(days=days)
    if na <= nb:
        raise ConfigError("not_after must be later than not_before")
    if ca is None:
        ca_nb = min(nb, now) - _dt.timedelta(days=1)
        ca_na = max(na, now) + _dt.timedelta(days=1)
        ca = LabCA.create(key_type=key_type, not_before=ca_nb, not_after=ca_na)
    issuer = ca

    def leaf(ou: str, eku: x509.ObjectIdentifier, san: bool = True) -> tuple[str, str]:
        return issuer.issue(ou, ou=ou, eku=(eku,), san=san, not_before=nb, not_after=na, key_type=key_type,
                            passphrase=passphrase)

    cert, private_key = leaf(OU_SOURCE, ExtendedKeyUsageOID.CLIENT_AUTH, san=False)
    mgmt_cert, mgmt_key = leaf(OU_TARGET_MGMT, ExtendedKeyUsageOID.SERVER_AUTH)
    data_cert, data_key = leaf(OU_TARGET_DATA, ExtendedKeyUsageOID.SERVER_AUTH)
    return CertKey(
        ca=ca.pem,
        cert=cert,
        private_key=private_key,
        target_mgmt_cert=mgmt_cert,
        target_mgmt_private_key=mgmt_key,
        target_data_cert=data_cert,
        target_data_private_key=data_key,
    )


def expired_bundle(passphrase: bytes | None = None, **kwargs) -> CertKey:
    """A bundle whose leaf certificates expired yesterday (CA still valid)."""
    now = _now()
    return make_bundle(
        passphrase, not_before=now - _dt.timedelta(days=30), not_after=now - _dt.timedelta(days=1), **kwargs
    )


def not_yet_valid_bundle(passphrase: bytes | None = None, **kwargs) -> CertKey:
    """A bundle whose leaf certificates become valid tomorrow (CA valid now)."""
    now = _now()
    return make_bundle(
        passphrase, not_before=now + _dt.timedelta(days=1), not_after=now + _dt.timedelta(days=30), **kwargs
    )


def _exists_message(final: Path) -> str:
    return (f"{final} already exists: a bundle both hosts must share; give --force to replace it "
            "(hosts holding the old one can no longer connect)")


def check_certkey_slot(outdir: str | os.PathLike[str], *, overwrite: bool) -> None:
    """Refuse (CertificateError) an ``OUTDIR/certkey.json`` that exists, unless ``overwrite``, and
    one that is not a regular file (a directory, a symlink) in any case."""
    final = Path(outdir) / CERTKEY_FILENAME
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise CertificateError(f"cannot write the certificate bundle: {outdir} is not a directory") from None
    except OSError as exc:
        raise CertificateError(f"cannot write {final}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a symbolic link" if stat.S_ISLNK(st.st_mode) \
            else "not a regular file"
        raise CertificateError(f"{final} exists and is {kind}: remove it or choose another directory")
    if not overwrite:
        raise CertificateError(_exists_message(final))


def write_certkey(outdir: str | os.PathLike[str], certkey: CertKey, *, overwrite: bool = True) -> Path:
    """Write ``OUTDIR/certkey.json`` (mode 0600) atomically and return its path.

    The JSON goes to a temporary name created with ``O_CREAT|O_EXCL`` and mode
    0600 (never readable by anyone else, not even for a moment), is fsynced,
    then renamed over ``certkey.json``.  ``OUTDIR`` is created with mode 0700
    if it does not exist; an existing directory keeps its mode.  With
    ``overwrite=False`` an existing ``certkey.json`` is an error.
    """
    out = Path(outdir)
    try:
        if not out.exists():
            out.mkdir(mode=0o700, parents=True)
            os.chmod(out, 0o700)  # mkdir's mode is filtered by the umask
        elif not out.is_dir():
            raise CertificateError(f"cannot write the certificate bundle: {out} is not a directory")
    except OSError as exc:
        raise CertificateError(f"cannot create directory {out}: {exc.strerror or exc}") from None

    final = out / CERTKEY_FILENAME
    tmp = out / f".{CERTKEY_FILENAME}.{secrets.token_hex(8)}.tmp"
    data = certkey.to_json().encode("ascii")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o600)
    except OSError as exc:
        raise CertificateError(f"cannot write {final}: {exc.strerror or exc}") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # exact mode whatever the umask
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, final)
        else:
            # link() fails atomically if the name exists; then drop the temp name.
            os.link(tmp, final)
            os.unlink(tmp)
    except FileExistsError:
        _unlink_quiet(tmp)
        raise CertificateError(_exists_message(final)) from None
    except OSError as exc:
        _unlink_quiet(tmp)
        raise CertificateError(f"cannot write {final}: {exc.strerror or exc}") from None
    except BaseException:
        _unlink_quiet(tmp)
        raise
    with contextlib.suppress(OSError):  # the bundle is written; a directory that cannot be synced stays as it is
        fsync_dir(str(final))
    return final


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
