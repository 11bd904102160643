"""``send files --dry-run`` and ``send block --dry-run``: what a round would change, printed;
nothing written on the target. Also the ``--max-delete`` value of ``send files``."""
from __future__ import annotations

import argparse
import sys

from smsrepl.errors import ConfigError, DeletionLimitError

#: ranges a block dry run lists without -v
RANGES_SHOWN = 20


def max_delete(text: str) -> int:
    """--max-delete N: at most N deletions a round (0: none, -1: no limit)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (-1 for no limit)") from None
    if n < -1:
        raise argparse.ArgumentTypeError(f"{n} is below -1 (-1 means no limit)")
    return n


def check_flags(args) -> None:
    """--dry-run looks at one round: not with what runs or marks rounds."""
    if not getattr(args, "dry_run", False):
        return
    for flag, given in (("--continuous", args.continuous), ("--interval", args.interval is not None),
                        ("--dirty-map", getattr(args, "dirty_map", None)),
                        ("--journal", getattr(args, "journal", None)),
                        ("--whole-tree-every", getattr(args, "whole_tree_every", None) is not None),
                        ("--progress", args.progress != "none")):
        if given:
            raise ConfigError(f"--dry-run looks at one round and sends nothing: {flag} does not go with it")


def dry_run_files(args, rules, ctx, out=None) -> int:
    from smsrepl.files.deletions import check_deletions
    from smsrepl.transport.connect import parse_address
    from smsrepl.transport.file_sender import FileSender

    out = out or sys.stdout
    sender = FileSender(args.source, args.target, parse_address(args.to), ctx, rules=rules, checksum=args.checksum)
    plan = sender.plan()
    for line in plan.lines():
        print(line, file=out)
    print(plan.summary(sender.target), file=out, flush=True)
    for line in plan.reported:
        print(f"note: {line}", file=sys.stderr)
    try:
        check_deletions(len(plan.deletions), plan.target_entries, args.max_delete, sender.target)
    except DeletionLimitError as exc:
        print(f"note: a real round would stop before changing anything: {exc}", file=sys.stderr, flush=True)
    return 0


def dry_run_block(args, ctx, state_dir: str, out=None) -> int:
    from smsrepl.transport.connect import parse_address
    from smsrepl.transport.sender import Sender

    out = out or sys.stdout
    sender = Sender(args.source, args.target, parse_address(args.to), ctx, state_dir)
    r = sender.dry_run()
    if getattr(args, "json", False):  # one object, as a real round's summary is one
        import json

        print(json.dumps({"dry_run": True, "round": r.round_id, "kind": r.kind, "resumed_from": r.start,
                          "source_bytes": r.source_size, "blocks": r.blocks, "data_bytes": r.data_bytes,
                          "zero_bytes": r.zero_bytes, "ranges": r.ranges}), file=out, flush=True)
        return 0
    print(r.summary(sender.target), file=out)
    ranges = r.ranges
    if ranges:
        shown = ranges if getattr(args, "verbose", False) else ranges[:RANGES_SHOWN]
        if getattr(args, "verbose", False):
            for off, length in shown:
                print(f"  {off}+{length}", file=out)
        else:
            more = f" ... and {len(ranges) - len(shown)} more (-v lists them all)" if len(ranges) > len(shown) else ""
            print("ranges (offset+length): " + " ".join(f"{o}+{n}" for o, n in shown) + more, file=out)
    out.flush()
    return 0
