"""The certkey bundle of API 5.7.1: reading, validating, and the passphrase file.

The control plane hands the agent a "certkey" JSON with exactly the keys of :class:`CertKey`,
all PEM strings; the private keys may be encrypted PEM protected by a per-task passphrase
(5.4.11). Every certificate must parse and every key be one private key matching its
certificate (an encrypted key is checked against it once the passphrase is known, when a
context is built: tls.py). Messages name the document and the key, never their content.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Union

import cryptography

from smsrepl import __version__
from smsrepl.errors import CertificateError

if TYPE_CHECKING:
    from cryptography import x509

# cryptography's x509 and serialization modules are imported where they are used: importing
# them took ~70 ms of the ~0.5 s a sender CLI runs for a sync round of a 50,000-file tree, and
# a bundle validated before (ValidatedBundles) with a context made here needs neither

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
        data = _read_at_most(path, MAX_CERTKEY_BYTES + 1, "certificate bundle")
        return cls.from_json(data, source=str(Path(path)), known=known)

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
        return key_is_encrypted(getattr(self, field))


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


def key_is_encrypted(text: str) -> bool:
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
        if key_is_encrypted(keys[0]):
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
    data = _read_at_most(p, MAX_PASSPHRASE_BYTES + 3, "passphrase file")
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise CertificateError(f"passphrase file {p} is empty")
    if len(data) > MAX_PASSPHRASE_BYTES:
        raise CertificateError(f"passphrase in {p} is longer than {MAX_PASSPHRASE_BYTES} bytes")
    return data


def _read_at_most(path: Union[str, os.PathLike[str]], limit: int, what: str) -> bytes:
    """The first ``limit`` bytes of the file; CertificateError naming ``what`` it is when it
    cannot be read."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            return fh.read(limit)
    except OSError as exc:
        raise CertificateError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
