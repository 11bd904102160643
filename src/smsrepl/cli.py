"""The command line: a thin layer over the library (see SPEC "Command line")."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from . import __version__
from .errors import EXIT_USAGE, ConfigError, ReplicationError


def _state_home(kind: str) -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "smsrepl", kind)


def _passphrase(args) -> bytes | None:
    from .transport.tls import load_passphrase

    return load_passphrase(args.passphrase_file) if getattr(args, "passphrase_file", None) else None


def _certkey(args):
    from .transport.tls import CertKey

    return CertKey.load(args.certkey)


def _targets(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--target {pair!r}: expected NAME=PATH")
        if name in out:
            raise ConfigError(f"--target {name!r} given twice")
        out[name] = path
    return out


def cmd_certs_init(args) -> int:
    from .certs import make_bundle, write_certkey

    bundle = make_bundle(_passphrase(args))
    path = write_certkey(args.outdir, bundle)
    print(f"wrote {path}")
    return 0


def cmd_receive(args) -> int:
    from .transport.receiver import Receiver
    from .transport.sender import parse_address
    from .transport.tls import server_context

    if args.root:
        raise ConfigError("--root (file-level targets) is not supported by this version; use --target NAME=PATH")
    host, port = parse_address(args.listen, listen=True)
    ctx = server_context(_certkey(args), _passphrase(args))
    rx = Receiver(_targets(args.target), ctx, args.state_dir or _state_home("receive"),
                  checkpoint_seconds=args.checkpoint_seconds)
    host, port = rx.bind(host, port)
    print(f"listening on {host}:{port}", file=sys.stderr, flush=True)
    try:
        outcome = rx.serve_forever(once=args.once)
    except KeyboardInterrupt:
        return 130
    finally:
        rx.stop()
    if args.once and outcome is not None and outcome.error is not None:
        print(str(outcome.error), file=sys.stderr)
        return outcome.error.exit_code
    return 0


class _ProgressPrinter:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.t0 = time.monotonic()
        self.last = 0.0

    def __call__(self, p) -> None:
        now = time.monotonic()
        if now - self.last < (0.2 if self.mode == "bar" else 1.0):
            return
        self.last = now
        pct = 100.0 * p.done / p.total if p.total else 100.0
        rate = p.done / max(now - self.t0, 1e-6)
        if self.mode == "bar":
            width = 30
            fill = int(width * pct / 100)
            eta = (p.total - p.done) / rate if rate else 0
            sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {pct:5.1f}% {rate / 1e6:7.1f} MB/s eta {eta:4.0f}s")
            sys.stderr.flush()
        elif self.mode == "json":
            print(json.dumps({
                "subtask_name": "MIGRATE_LINUX_BLOCK" if p.round_kind == "full" else "SYNC_LINUX_BLOCK",
                "progress": int(pct), "replicatesize": p.done, "totalsize": p.total,
                "migrate_speed": round(rate * 8 / 1e6, 2),
            }), flush=True)


def cmd_send_block(args) -> int:
    from .transport.sender import Sender, parse_address
    from .transport.tls import client_context

    ctx = client_context(_certkey(args), _passphrase(args))
    printer = _ProgressPrinter(args.progress) if args.progress != "none" else None
    sender = Sender(args.source, args.target, parse_address(args.to), ctx,
                    args.state_dir or _state_home("send"), level=args.level, on_progress=printer)
    result = sender.run()
    if args.progress == "bar":
        sys.stderr.write("\n")
    summary = {
        "round": result.round_id, "kind": result.kind, "resumed_from": result.resumed_from,
        "source_bytes": result.source_size, "data_bytes": result.data_bytes,
        "wire_bytes": result.wire_bytes, "seconds": round(result.seconds, 3),
    }
    print(json.dumps(summary), file=sys.stderr if args.progress == "json" else sys.stdout)
    return 0


def cmd_send_files(args) -> int:
    raise ConfigError("file-level transfer (send files) is not available in this version yet")


def cmd_verify_block(args) -> int:
    from .verify import compare_block_images

    if not args.target_path:
        raise ConfigError("verify block: remote verification (--to) is not available in this version; give TARGET")
    result, consistent = compare_block_images(args.source, args.target_path)
    print(json.dumps(result))
    return 0 if consistent else 1


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(size_mib=args.size_mib, keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smsrepl", description="Block and file replication over mutual TLS.")
    p.add_argument("--version", action="version", version=f"smsrepl {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    certs = sub.add_parser("certs", help="certificate bundles for a lab").add_subparsers(dest="certs_cmd", required=True)
    ci = certs.add_parser("init", help="write OUTDIR/certkey.json (the 5.7.1 shape)")
    ci.add_argument("outdir")
    ci.add_argument("--passphrase-file")
    ci.set_defaults(func=cmd_certs_init)

    rc = sub.add_parser("receive", help="the target-side endpoint")
    rc.add_argument("--listen", required=True, metavar="HOST:PORT")
    rc.add_argument("--certkey", required=True)
    rc.add_argument("--passphrase-file")
    rc.add_argument("--target", action="append", default=[], metavar="NAME=PATH")
    rc.add_argument("--root")
    rc.add_argument("--state-dir")
    rc.add_argument("--once", action="store_true", help="exit after one session")
    rc.add_argument("--checkpoint-seconds", type=float, default=2.0,
                    help="seconds between durable checkpoints while data flows (default 2)")
    rc.set_defaults(func=cmd_receive)

    send = sub.add_parser("send", help="the source-side endpoint").add_subparsers(dest="send_cmd", required=True)
    sb = send.add_parser("block", help="copy (first run) or sync (later runs) a disk or image")
    sb.add_argument("source")
    sb.add_argument("--to", required=True, metavar="HOST:PORT")
    sb.add_argument("--target", required=True)
    sb.add_argument("--certkey", required=True)
    sb.add_argument("--passphrase-file")
    sb.add_argument("--state-dir")
    sb.add_argument("--progress", choices=["bar", "json", "none"], default="none")
    sb.add_argument("--level", type=int, default=1, help="zstd level, 0 = no compression (default 1)")
    sb.set_defaults(func=cmd_send_block)
    sf = send.add_parser("files", help="file-level transfer (not yet available)")
    sf.add_argument("source")
    sf.add_argument("--to", required=True)
    sf.add_argument("--target", required=True)
    sf.add_argument("--certkey", required=True)
    sf.set_defaults(func=cmd_send_files)

    ver = sub.add_parser("verify", help="compare a source with its copy").add_subparsers(dest="verify_cmd", required=True)
    vb = ver.add_parser("block", help="compare two images or devices block by block")
    vb.add_argument("source")
    vb.add_argument("target_path", nargs="?", metavar="TARGET")
    vb.set_defaults(func=cmd_verify_block)

    demo = sub.add_parser("demo", help="run the whole loop on this machine")
    demo.add_argument("--size-mib", type=int, default=64)
    demo.add_argument("--keep", action="store_true", help="keep the demo's working directory")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except ReplicationError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
