"""What a failed TLS handshake means, in words a user can act on.

``classify_ssl_error`` maps the exception of a handshake (transport/connect.py on the sender,
transport/server.py on the receiver) or of a TLS 1.3 client's first read, where the server's
refusal of its certificate arrives (transport/channel.py), to an AuthenticationError (exit 4:
rerunning will not help) or a TransportError (resumable).
"""
from __future__ import annotations

import socket
import ssl

from smsrepl.errors import AuthenticationError, ReplicationError, TransportError

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
}
#: reasons of a peer that does not speak TLS (checked before _REASONS)
_NOT_TLS = {"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
            "UNEXPECTED_RECORD", "UNEXPECTED_MESSAGE", "RECORD_TOO_LARGE", "ENCRYPTED_LENGTH_TOO_LONG",
            "HTTP_REQUEST", "HTTPS_PROXY_REQUEST"}


def classify_ssl_error(exc: OSError, *, server_side: bool | None = None) -> ReplicationError:
    """Map an exception raised during a TLS handshake to a ReplicationError.

    What reaches it (ssl.SSLError is an OSError): from a handshake, the ssl.SSLError of
    ``do_handshake`` or the OSError of the socket under it (its ReplicationErrors, a refused
    role, are caught before); from a TLS 1.3 client's first read, an ssl.SSLError naming an
    alert.

    * certificate verification failures, alerts from the peer, protocol
      version mismatches, a peer that does not speak TLS and any other
      ``ssl.SSLError`` -> :class:`AuthenticationError` (SMS.0304) with a plain
      cause, e.g. ``certificate verify failed: certificate has expired``;
    * the connection closing or breaking mid-handshake (EOF, reset, timeout)
      -> :class:`TransportError` (resumable).

    ``server_side`` only words the "not TLS" case ("not a TLS client" on the
    server, "not a TLS server" on the client).
    """
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
    return TransportError(f"connection failed during the TLS handshake: {exc.strerror or exc.__class__.__name__}")
