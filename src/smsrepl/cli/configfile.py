"""``--config FILE``: the 5.10.1 configuration body a send or a check reads."""
from __future__ import annotations

from smsrepl.errors import ConfigError


def read_config(path: str) -> dict:
    """A 5.10.1 configuration body from a file."""
    from smsrepl.files.rules import parse_configuration_body

    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(f"--config {path!r} cannot be read: {exc.strerror}") from None
    return parse_configuration_body(raw, f"--config {path!r}")
