"""``smsrepl netcheck`` and ``smsrepl status``: questions to a running receiver (the link's
figures as the 5.9.1 body; its targets and sessions)."""
from __future__ import annotations

import json
import sys

from smsrepl.errors import ConfigError
from smsrepl.cli.bundle import bundle_certkey, bundle_passphrase


def cmd_netcheck(args) -> int:
    from smsrepl.transport.netcheck import run_netcheck
    from smsrepl.transport.connect import parse_address
    from smsrepl.transport.tls import client_context

    if not 0.2 <= args.seconds <= 600:
        raise ConfigError(f"--seconds {args.seconds}: must be between 0.2 and 600")
    ctx = client_context(bundle_certkey(args), bundle_passphrase(args))
    result = run_netcheck(parse_address(args.to), ctx, seconds=args.seconds, streams=args.streams)
    if result.streams > 1:
        print(f"one connection: {result.speed_mbit:.1f} Mbit/s; {result.streams} connections: "
              f"{result.streams_speed_mbit:.1f} Mbit/s", file=sys.stderr)
    print(json.dumps(result.body()))
    return 0


def cmd_status(args) -> int:
    from smsrepl.transport.connect import parse_address
    from smsrepl.transport.status import fetch_status, format_report
    from smsrepl.transport.tls import client_context

    ctx = client_context(bundle_certkey(args), bundle_passphrase(args))
    report = fetch_status(parse_address(args.to), ctx)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0
