"""One exception hierarchy for smsrepl.

Every error carries the SMS code of the control plane's error table
(API reference, section 6.1) where one exists, and the process exit code of
SPEC ("Exit codes"). ``str(err)`` is the single stderr line: the SMS code
first, then a plain message.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_USAGE = 2
EXIT_TRANSFER = 3
EXIT_AUTH = 4

BYTES_PER_MBIT = 125_000  # the unit of the control plane's speed limits (OverSpeedError's message)


class ReplicationError(Exception):
    """Root of every error smsrepl raises on purpose."""

    code: str | None = None
    exit_code: int = EXIT_TRANSFER
    #: True when rerunning the same command continues where it stopped.
    resumable: bool = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.code else self.message


class ConfigError(ReplicationError):
    """Bad flag, unreadable or invalid JSON, a rule out of range."""

    exit_code = EXIT_USAGE


class CertificateError(ConfigError):
    """The certificate bundle cannot be read or a key cannot be opened."""

    code = "SMS.3301"


class SourceError(ReplicationError):
    """The source disk or image cannot be opened or read."""

    code = "SMS.1901"


class SourceMissingError(SourceError):
    exit_code = EXIT_USAGE


class TargetError(ReplicationError):
    """A target cannot be opened or is unfit."""

    code = "SMS.2013"
    exit_code = EXIT_USAGE


class SizeMismatchError(TargetError):
    """The target is smaller than the source."""

    code = "SMS.1504"


class TargetMissingError(TargetError):
    """A target path that does not exist, refused rather than created (a typo must not become a file)."""

    code = "SMS.0808"  # "Target disks or partitions not found"


class TargetInUseError(TargetError):
    """A target device mounted or held open exclusively by another program (O_EXCL: EBUSY)."""


class TargetKindError(TargetError):
    """A block session for a directory target, or a file session for an image file or device."""


class TargetWriteError(ReplicationError):
    """Writing or syncing the target failed (I/O error, disk full)."""

    code = "SMS.2007"
    resumable = True


class StateError(ReplicationError):
    """The sender's own state (its --state-dir) cannot be written or read: a full or failing disk."""

    resumable = True


class CompressionError(ReplicationError):
    code = "SMS.1909"
    resumable = True


class DecompressionError(ReplicationError):
    """Decompression failed or the data does not match its digest."""

    code = "SMS.2009"
    resumable = True


class ManifestError(ReplicationError):
    """A manifest or state file is truncated, corrupt or does not match."""

    exit_code = EXIT_USAGE


class TransportError(ReplicationError):
    """The connection broke; the transfer can be resumed."""

    code = "SMS.0807"
    resumable = True


class ConnectError(TransportError):
    """Nothing answers at the target address."""

    code = "SMS.1807"


class AuthenticationError(ReplicationError):
    """TLS handshake or certificate check failed."""

    code = "SMS.0304"
    exit_code = EXIT_AUTH


class DeletionLimitError(ReplicationError):
    """A file round would delete more target entries than its limit allows (--max-delete, or
    more than half of the target's by default): refused, for the operator to decide (exit 2:
    the same command gives the same answer; rsync exits 25)."""

    exit_code = EXIT_USAGE


class RefusedError(ReplicationError):
    """The other side refused the session for good (unknown target, wrong kind of target)."""

    exit_code = EXIT_AUTH


class TargetBusyError(ReplicationError):
    """The target is served by another session or receiver process now: retry later (exit 3)."""

    resumable = True


class ProtocolError(ReplicationError):
    """The wire protocol was broken."""

    code = "SMS.1908"
    resumable = True


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow (a bug or misuse)."""


class RemoteError(ReplicationError):
    """The peer reported an error; carries its SMS code and exit class."""

    def __init__(self, message: str, *, code: str | None, exit_code: int, resumable: bool) -> None:
        super().__init__(message, code=code)
        self.exit_code = exit_code
        self.resumable = resumable


class ControlPlaneError(ReplicationError):
    """The control plane answered with an error (4xx, or 5xx after the retries)."""

    def __init__(self, message: str, *, status: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.resumable = status == 429 or status >= 500


class ControlPlaneUnavailable(ControlPlaneError):
    """No answer (connection refused, timeout, TLS failure) after every retry."""

    code = "SMS.1807"

    def __init__(self, message: str) -> None:
        super().__init__(message, status=0)
        self.resumable = True


class TrackingUnavailable(ConfigError):
    """Kernel change tracking cannot run here; the message names what is missing."""

    code = "SMS.1902"  # "Failed to start the I/O monitoring module"


class ReportError(ValueError):
    """A progress report does not match the 5.4.8 field list."""


class StatePairError(ConfigError):
    """A (copystate, migrationcycle) pair SMS.7728 forbids."""

    code = "SMS.7728"


class TransitionError(ReplicationError):
    """An event that the session's state does not allow (misuse, not I/O)."""

    exit_code = EXIT_USAGE


class JournalUnavailable(Exception):
    """The kernel, the privileges or the file system do not allow a journal (the reason)."""


class FrameError(ValueError):
    """A frame that cannot be decoded; the connection turns it into RemoteProtocolError."""


class OverSpeedError(ReplicationError):
    """The measured rate exceeded the limit by more than ``over_speed_threshold``.

    The reference's error table (6.1) has no code for this (SMS.6302 is "no
    speed limit found"), so it carries none. Exit code 3: the session stops
    and can be resumed once the cause is fixed.
    """

    exit_code = EXIT_TRANSFER
    resumable = True

    def __init__(self, measured_bps: float, limit_bps: float, threshold_pct: float, window_s: float) -> None:
        self.measured_bps = measured_bps
        self.limit_bps = limit_bps
        self.threshold_pct = threshold_pct
        allowed = limit_bps * (1 + threshold_pct / 100)
        super().__init__(
            f"over speed: measured {measured_bps / BYTES_PER_MBIT:.2f} Mbit/s over the last {window_s:g} s, "
            f"limit {limit_bps / BYTES_PER_MBIT:.2f} Mbit/s, over_speed_threshold {threshold_pct:g} % "
            f"(stop above {allowed / BYTES_PER_MBIT:.2f} Mbit/s)"
        )


class ReceiverStopping(ReplicationError):
    """The receiver is stopping (SIGINT, SIGTERM, stop()): the round is checkpointed, rerun to resume."""

    resumable = True


class TakenOver(TargetBusyError):
    """Another connection of the same session took the target over."""
