"""Files named by flags: read whole, or one line naming the flag and why not; ``--config FILE``,
the 5.10.1 configuration body a send or a check reads."""
from __future__ import annotations

from smsrepl.errors import ConfigError


def read_flag_file(flag: str, path: str) -> bytes:
    """The bytes of the file ``flag`` names."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"{flag} {path!r} cannot be read: {exc.strerror}") from None


def read_config(path: str) -> dict:
    """A 5.10.1 configuration body from a file."""
    from smsrepl.files.rules import parse_configuration_body

    return parse_configuration_body(read_flag_file("--config", path), f"--config {path!r}")
