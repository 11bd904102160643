"""Command-line plumbing: a parser whose usage errors are one line, the value types of the
flags (a bad value is refused while parsing: one line naming the flag, exit 2), and where a
--state-dir defaults to."""
from __future__ import annotations

import argparse
import math
import os
import stat


class OneLineParser(argparse.ArgumentParser):
    """argparse with a usage error on one stderr line (argparse prints the usage first) and
    exit 2, as every other smsrepl error: ``smsrepl send files: error: ... (see --help)``."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        message = " ".join(message.split())  # never more than one line
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def add_verbose(parser: argparse.ArgumentParser) -> None:
    """-v/--verbose after a subcommand too; SUPPRESS keeps the value given before the subcommand
    (a subparser's default would overwrite it)."""
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log what happens to stderr (also accepted before the subcommand)")


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def number(kind):
    """An argparse type: a finite int or float (the command checks its range)."""
    def parse(text: str):
        return _number(kind, text)

    parse.__name__ = kind.__name__
    return parse


def number_in(kind, low, high, *, low_open: bool = False, unit: str = ""):
    """An argparse type: an int or float from ``low`` to ``high`` (above ``low`` when ``low_open``)."""
    def parse(text: str):
        value = _number(kind, text)
        if value > high or value < low or (low_open and value == low):
            shown = f"more than {low}" if low_open else f"from {low}"
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: {shown} to {high}{unit}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def seconds(low: float, high: float, *, low_open: bool = False):
    return number_in(float, low, high, low_open=low_open, unit=" seconds")


def nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def subcommands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers of every leaf subcommand (``send files``, ``receive``, ...) under ``parser``."""
    leaves = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                leaves += subcommands(sub) or [sub]
    return leaves


def address(*, listen: bool = False):
    """An argparse type: ``HOST:PORT`` checked now (transport.connect.parse_address), kept as text."""
    def parse(text: str) -> str:
        from smsrepl.errors import ConfigError
        from smsrepl.transport.connect import parse_address

        try:
            parse_address(text, listen=listen)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None
        return text

    parse.__name__ = "address"
    return parse


def target_name(text: str) -> str:
    from smsrepl.errors import ConfigError
    from smsrepl.transport.connect import check_target_name

    try:
        return check_target_name(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def directory(what: str):
    """An argparse type: an existing directory (``what`` names it in the message)."""
    def parse(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError(f"the {what} must not be empty")
        try:
            st = os.stat(text)
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"{what} {text!r}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise argparse.ArgumentTypeError(f"{what} {text!r} is not a directory")
        return text

    parse.__name__ = "directory"
    return parse


def state_dir(text: str) -> str:
    """An argparse type: a directory smsrepl may keep state in: a writable directory, or a path
    that can be made under one (it is created when used, not now)."""
    if not text:
        raise argparse.ArgumentTypeError("the state directory must not be empty")
    path = os.path.abspath(text)
    probe = path
    while True:
        try:
            st = os.stat(probe)
        except FileNotFoundError:
            probe = os.path.dirname(probe)
            continue
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"state directory {text!r}: {exc.strerror} ({probe})") from None
        break
    if not stat.S_ISDIR(st.st_mode):
        raise argparse.ArgumentTypeError(f"state directory {text!r}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"state directory {text!r}: {probe} is not writable (permission denied)")
    return text


def control_plane_id(text: str) -> str:
    """An argparse type: a source server or task id as the control plane's paths take it."""
    from smsrepl.agent.client import _ID

    if not _ID.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid id (letters, digits, '.', '_', '-')")
    return text


def https_url(text: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a URL: {exc}") from None
    if parts.scheme != "https" or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an https://HOST[:PORT] URL")
    return text


def stream_count(text: str) -> int | str:
    """An argparse type: --streams N (1-16) or 'auto'."""
    from smsrepl.errors import ConfigError
    from smsrepl.transport.streams_auto import parse_streams

    try:
        return parse_streams(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--streams {text!r}: ")) from None


def zstd_level(text: str) -> int | str:
    """An argparse type: a zstd level 0-19, or 'auto'."""
    if text == "auto":
        return text
    try:
        level = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a zstd level or 'auto'") from None
    if not 0 <= level <= 19:
        raise argparse.ArgumentTypeError(f"level {level} out of range 0-19")
    return level


def state_home(kind: str) -> str:
    """The per-user directory a ``--state-dir`` defaults to (and validated bundles are kept in)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "smsrepl", kind)
