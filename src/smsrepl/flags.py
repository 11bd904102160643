"""Command-line plumbing: a parser whose usage errors are one line, and the value types of
the flags (a bad value is refused while parsing: one line naming the flag, exit 2)."""
from __future__ import annotations

import argparse
import math


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
