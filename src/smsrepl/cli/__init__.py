"""The command line: a thin layer over the library (see SPEC "Command line").

``main`` parses (cli.parser) and runs the subcommand's function (cli.send, cli.receive,
cli.verify, cli.agent, cli.probe, cli.lab); a ReplicationError it raises becomes its one
stderr line and exit code.
"""
from __future__ import annotations

import gc
import sys

from smsrepl.errors import ReplicationError
from smsrepl.cli.parser import build_parser
from smsrepl.transport.memory import pin_mmap_threshold

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quick = getattr(args, "quick", False)  # a check: done in a moment, nothing to tune for
    if not quick:
        pin_mmap_threshold()  # endpoints run for days: memory must track what is live (see memory.py)
    # what the imports made lives as long as the process: keep the collector from walking it
    # again and again (it took 5% of a sender's time in a round of small files)
    gc.freeze()
    if args.verbose or not quick or "logging" in sys.modules:
        from smsrepl.cli.logsetup import configure as configure_logging

        configure_logging(args.verbose)
    try:
        return args.func(args)
    except ReplicationError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        if argv is None:  # the program's own run, which exits next: the interpreter's exit
            # collects everything the collector tracks, the command's imports and state too
            # (20 ms of a sync round's process after importing the sender; 3 ms frozen)
            gc.freeze()
