"""``smsrepl receive``: the target-side endpoint, listening until SIGINT/SIGTERM (or one session
with --once)."""
from __future__ import annotations

import signal
import sys
import threading

from smsrepl.errors import ConfigError
from smsrepl.cli.bundle import bundle_certkey, bundle_passphrase
from smsrepl.cli.flags import state_home

TYPE_CHECKING = False  # typing itself would cost every command 3 ms of imports

if TYPE_CHECKING:
    import logging


def cmd_receive(args) -> int:
    from smsrepl.transport.receiver import Receiver
    from smsrepl.transport.connect import parse_address
    from smsrepl.transport.tls import server_context
    from smsrepl.cli.logsetup import configure as configure_logging, reopen as reopen_log

    configure_logging(args.verbose, args.log_file, args.log_format)
    import logging

    # SIGHUP (logrotate, systemctl reload) reopens the log file, if any; it never ends the receiver
    signal.signal(signal.SIGHUP, lambda signum, frame: threading.Thread(target=reopen_log).start())
    logging.getLogger("smsrepl.receiver.rounds").setLevel(logging.INFO)  # a line per round, stages included

    from smsrepl.transport.receiver import RootTargets

    if args.root and args.target:
        raise ConfigError("give --target NAME=PATH ... or --root DIR, not both")
    host, port = parse_address(args.listen, listen=True)
    _check_listen(host, port)
    ctx = server_context(bundle_certkey(args), bundle_passphrase(args))
    rx = Receiver(RootTargets(args.root) if args.root else _targets(args.target), ctx, args.state_dir or state_home("receive"),
                  checkpoint_seconds=args.checkpoint_seconds, create=args.create)
    host, port = rx.bind(host, port)
    for signum in (signal.SIGINT, signal.SIGTERM):  # sessions end checkpointed, then exit 0
        signal.signal(signum, lambda n, frame: rx.request_stop(signal.Signals(n).name))
    if args.log_file:  # first: whoever sees the stderr line finds it in the log too
        _service_log().info("listening on %s", _shown_address(host, port), extra={"host": host, "port": port})
    print(f"listening on {_shown_address(host, port)}", file=sys.stderr, flush=True)
    try:
        outcome = rx.serve_forever(once=args.once)
    finally:
        rx.stop()
    if args.once and outcome is not None and outcome.error is not None:
        print(str(outcome.error), file=sys.stderr)
        return outcome.error.exit_code
    return 0


def _targets(pairs: list[str]) -> dict[str, str]:
    from smsrepl.transport.connect import TARGET_NAME

    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--target {pair!r}: expected NAME=PATH")
        if not TARGET_NAME.match(name) or name in (".", ".."):
            raise ConfigError(f"--target {pair!r}: the name {name!r} is invalid: use letters, digits, '.', '_' "
                              "and '-' only")
        if name in out:
            raise ConfigError(f"--target {name!r} given twice")
        out[name] = path
    return out


def _check_listen(host: str, port: int) -> None:
    """An address the receiver cannot listen on (not this host's, in use) is refused before the
    receiver makes its state directory."""
    import errno
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        if host == "::" and exc.errno == errno.EAFNOSUPPORT:
            return  # no IPv6 here: the receiver listens on 0.0.0.0
        raise ConfigError(f"--listen {_shown_address(host, port)}: cannot listen there: {exc.strerror}") from None


def _shown_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _service_log() -> logging.Logger:
    """The receiver's start and stop lines in its --log-file (stderr has them already)."""
    import logging

    log = logging.getLogger("smsrepl.receiver.service")
    log.setLevel(logging.INFO)
    return log
