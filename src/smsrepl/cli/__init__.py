"""The command line: a thin layer over the library (see SPEC "Command line")."""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import threading

# smsrepl uses numpy for elementwise work only: OpenBLAS's thread pool would
# cost each process CPU at start-up and spin beside the data path (measured:
# 3.7% of a receiver's CPU during a full copy). Set before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from smsrepl import __version__
from smsrepl.codec import DEFAULT_LEVEL
from smsrepl.errors import EXIT_USAGE, ConfigError, ReplicationError
from smsrepl.cli.flags import (OneLineParser, add_verbose, address, control_plane_id, directory,
                               https_url, nonempty, number, number_in, seconds, state_dir,
                               subcommands, target_name)
from smsrepl.transport.memory import pin_mmap_threshold


def _state_home(kind: str) -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "smsrepl", kind)


def _passphrase(args) -> bytes | None:
    from smsrepl.transport.certkey import load_passphrase

    return load_passphrase(args.passphrase_file) if getattr(args, "passphrase_file", None) else None


def _certkey(args):
    from smsrepl.transport.certkey import CertKey, ValidatedBundles

    # a sender starts for every round: a bundle validated before is not parsed again
    return CertKey.load(args.certkey, known=ValidatedBundles(_state_home("validated-bundles")))


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


def cmd_certs_init(args) -> int:
    from smsrepl.lab.certs import check_certkey_slot, make_bundle, write_certkey

    passphrase = _passphrase(args)
    check_certkey_slot(args.outdir, overwrite=args.force)  # before making keys for nothing
    path = write_certkey(args.outdir, make_bundle(passphrase), overwrite=args.force)
    print(f"wrote {path}")
    return 0


def cmd_receive(args) -> int:
    from smsrepl.transport.receiver import Receiver
    from smsrepl.transport.connect import parse_address
    from smsrepl.transport.tls import server_context
    from smsrepl.cli import logsetup

    logsetup.configure(args.verbose, args.log_file, args.log_format)
    import logging

    # SIGHUP (logrotate, systemctl reload) reopens the log file, if any; it never ends the receiver
    signal.signal(signal.SIGHUP, lambda signum, frame: threading.Thread(target=logsetup.reopen).start())
    logging.getLogger("smsrepl.receiver.rounds").setLevel(logging.INFO)  # a line per round, stages included

    from smsrepl.transport.receiver import RootTargets

    if args.root and args.target:
        raise ConfigError("give --target NAME=PATH ... or --root DIR, not both")
    host, port = parse_address(args.listen, listen=True)
    _check_listen(host, port)
    ctx = server_context(_certkey(args), _passphrase(args))
    rx = Receiver(RootTargets(args.root) if args.root else _targets(args.target), ctx, args.state_dir or _state_home("receive"),
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


def _service_log():
    import logging

    """The receiver's start and stop lines in its --log-file (stderr has them already)."""
    log = logging.getLogger("smsrepl.receiver.service")
    log.setLevel(logging.INFO)
    return log


class _ProgressOutput:
    """--progress json: one 5.4.8 report per line on stdout; bar: a tqdm bar on stderr, one a
    round, with log lines and notes written above it while it is shown (never through it)."""

    def __init__(self, mode: str, *, wire: bool = True) -> None:
        self.mode = mode
        self.wire = wire  # False: nothing crosses a wire (a local check), no rate of it on the bar
        self.bar = None
        self._redirect = None  # tqdm's logging redirect while a bar is shown

    def report(self, rep: dict) -> None:
        if self.mode == "json":
            print(json.dumps(rep, ensure_ascii=False), flush=True)
        elif self.mode == "bar":
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            if self.bar is None:
                self.bar = tqdm(total=rep["totalsize"], unit="B", unit_scale=True, unit_divisor=1024,
                                desc=rep["subtask_name"], file=sys.stderr, dynamic_ncols=True)
                self._redirect = logging_redirect_tqdm()
                self._redirect.__enter__()
            self.bar.update(rep["replicatesize"] - self.bar.n)
            # the round's last report says 0 (nothing moves any more): end_round shows the average
            if self.wire and (rep["migrate_speed"] or rep["progress"] < 100):
                self.bar.set_postfix_str(f"{rep['migrate_speed']:.0f} Mbit/s on the wire", refresh=False)

    def note(self, line: str) -> None:
        """A line for the operator on stderr: above the bar while one is shown."""
        if self.bar is not None:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def end_round(self, wire_bytes: int, seconds: float) -> None:
        """Close the round's bar, its rate the round's average: before the summary is printed,
        so that nothing redraws the bar after it."""
        if self.bar is not None and seconds > 0:
            from smsrepl.cli.summary import human_rate

            self.bar.set_postfix_str(f"{human_rate(wire_bytes / seconds)} on the wire, average", refresh=False)
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None


class _ScheduleWatcher:
    """Re-reads the --speed-limit file when it changes, for the running session (a thread
    checks four times a second, so a new schedule applies within about 0.25 s)."""

    INTERVAL = 0.25

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.mtime = None
        if path:
            try:
                self.mtime = os.stat(path).st_mtime_ns
            except OSError as exc:
                raise ConfigError(f"--speed-limit {path!r} cannot be read: {exc.strerror}") from None
            self.load()  # a bad schedule is refused before anything starts
        self._stop = threading.Event()
        #: the running round's sender (continuous sync makes one per round)
        self.sender = None
        #: where a line for the operator goes (above a progress bar, when there is one)
        self.note = lambda line: print(line, file=sys.stderr)

    def load(self):
        from smsrepl.throttle import SpeedSchedule

        if not self.path:
            return None
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise ConfigError(f"--speed-limit {self.path!r} cannot be read: {exc.strerror}") from None
        try:
            return SpeedSchedule.from_json(data)
        except ConfigError as exc:
            raise ConfigError(f"--speed-limit {self.path!r}: {exc.message}") from None

    def watch(self) -> None:
        if self.path:
            threading.Thread(target=self._loop, name="speed-limit-watch", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            if self.sender is not None:
                self.poll()

    def poll(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            return
        if mtime != self.mtime:
            self.mtime = mtime
            try:
                self.sender.replace_schedule(self.load())
                import logging

                logging.getLogger("smsrepl").info("speed limit reloaded from %s", self.path)
            except ReplicationError as exc:  # keep the old schedule, say why
                self.note(f"ignoring changed speed limit: {exc}")


def _read_config(path: str) -> dict:
    """A 5.10.1 configuration body from a file."""
    from smsrepl.files.rules import parse_configuration_body

    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(f"--config {path!r} cannot be read: {exc.strerror}") from None
    return parse_configuration_body(raw, f"--config {path!r}")


def _block_cpu_cap(path: str | None):
    """The 5.10.1 configuration body for block transfer: only LINUX_CPU_LIMIT applies."""
    if not path:
        return None
    from smsrepl.files.rules import CPU_LIMIT, KEYS
    from smsrepl.throttle import CpuCap

    body = _read_config(path)
    for i, item in enumerate(body["configurations"]):
        key = item.get("config_key") if isinstance(item, dict) else None
        if key in KEYS - {CPU_LIMIT}:
            raise ConfigError(f"--config configurations[{i}]: {key} applies to file-level transfer only")
        if key != CPU_LIMIT:
            raise ConfigError(f"--config configurations[{i}]: unknown config_key {key!r}")
    return CpuCap.from_configurations(body)


def cmd_send_files(args, stop=None) -> int:
    from smsrepl.transport.file_sender import FileSender
    from smsrepl.transport.connect import parse_address
    from smsrepl.transport.tls import client_context

    from smsrepl.cli.dryrun import check_flags

    check_flags(args)
    interval = _continuous_interval(args)
    journal = _open_journal(args)
    rules = None
    if args.config:
        from smsrepl.files.rules import PathRules

        rules = PathRules.from_configurations(_read_config(args.config), source=f"--config {args.config!r}")
        rules = rules.anchored(args.source)  # before anything connects: a rule may exclude the whole tree
    host_sampler = None
    if args.progress == "json":
        from smsrepl.control.progress import HostSampler

        host_sampler = HostSampler()
    watcher = _ScheduleWatcher(args.speed_limit)
    ctx = client_context(_certkey(args), _passphrase(args))
    if args.dry_run:
        from smsrepl.cli.dryrun import dry_run_files

        return dry_run_files(args, rules, ctx)
    out = _ProgressOutput(args.progress)
    watcher.note = out.note

    cont = None

    def make_sender() -> FileSender:
        cutover = cont is not None and cont.cutover_requested
        sender = FileSender(args.source, args.target, parse_address(args.to), ctx, rules=rules,
                            checksum=args.checksum, level=args.level, speed_limit=watcher.load(),
                            on_report=out.report if args.progress != "none" else None, host_sampler=host_sampler,
                            journal=journal, whole="the cutover round walks the whole tree" if cutover else None,
                            max_delete=args.max_delete)
        watcher.sender = sender
        if stop is not None:
            stop.sender = sender
        return sender

    def print_summary(result) -> None:
        from smsrepl.cli.summary import files_round_line

        out.end_round(result.wire_bytes, result.seconds)
        summary = result.summary()
        _print_summary(args, json.dumps(summary) if args.json else files_round_line(summary))
        for line in result.stats.reported:
            print(f"note: {line}", file=sys.stderr)
        from smsrepl.files.rules import unmatched_note

        for key, rule in result.stats.unmatched_rules:
            print(f"note: {unmatched_note(key, rule, os.path.abspath(args.source))}", file=sys.stderr)

    watcher.watch()
    try:
        if args.continuous:
            from smsrepl.replication.continuous import ContinuousSync

            cont = ContinuousSync(make_sender, interval=interval, on_round=print_summary)
            _cutover_on_sigterm(cont.request_cutover, cont.abort, cont.request_round)
            cont.run()
        else:
            sender = make_sender()
            sender.open()  # the receiver lists its tree while the round's modules load
            result = sender.run()
            stop.cancel()
            print_summary(result)
    finally:
        watcher.close()
        out.close()
        if journal is not None:
            journal.close()
    return 0


def _open_journal(args):
    """The change journal of ``send files --continuous`` (files.journal), or None: without
    --continuous, with --journal off, or where it cannot run (one notice line)."""
    if args.journal is not None and not args.continuous:
        raise ConfigError("--journal applies to --continuous only")
    if args.whole_tree_every is not None:
        if not args.continuous:
            raise ConfigError("--whole-tree-every applies to --continuous only")
        if not 0 <= args.whole_tree_every <= 1_000_000:
            raise ConfigError(f"--whole-tree-every {args.whole_tree_every}: must be from 0 to 1000000")
    if not args.continuous or args.journal == "off":
        return None
    if args.checksum:
        print("notice: --checksum reads every file each round; no change journal", file=sys.stderr, flush=True)
        return None
    from smsrepl.files.journal import open_journal

    return open_journal(args.source, whole_every=10 if args.whole_tree_every is None else args.whole_tree_every,
                        notice=lambda line: print(line, file=sys.stderr, flush=True))


def _print_summary(args, line: str) -> None:
    """A round's summary (the human line, or with --json the JSON object): on stdout, or on
    stderr with --progress json, whose stdout carries 5.4.8 reports only."""
    print(line, file=sys.stderr if args.progress == "json" else sys.stdout, flush=True)


def _one_shot_stop(cmd):
    """``cmd`` (send block / send files) with SIGINT and SIGTERM stopping a one-shot run within
    a second, exit 3 and where it got to (interrupt.OneShotStop). --continuous keeps its own
    signals: SIGTERM is the cutover round there."""

    def run(args) -> int:
        if args.continuous:
            return cmd(args)
        from smsrepl.cli.interrupt import OneShotStop

        stop = OneShotStop()
        stop.install()
        try:
            return cmd(args, stop)
        except (Exception, KeyboardInterrupt):
            if stop.hit.is_set():  # whatever the stop broke on its way out
                return stop.say()
            raise

    run.__doc__ = cmd.__doc__
    return run


def _continuous_interval(args) -> float:
    """Seconds between continuous rounds, from --interval (which needs --continuous)."""
    if args.interval is not None and not args.continuous:
        raise ConfigError("--interval applies to --continuous only")
    interval = 30.0 if args.interval is None else args.interval
    if not 0 <= interval <= 86400:
        raise ConfigError(f"--interval {interval}: must be between 0 and 86400 seconds")
    return interval


def cmd_send_block(args, stop=None) -> int:
    from smsrepl.control.progress import HostSampler
    from smsrepl.transport.connect import parse_address
    from smsrepl.transport.sender import Sender
    from smsrepl.transport.tls import client_context

    from smsrepl.cli.dryrun import check_flags

    check_flags(args)
    interval = _continuous_interval(args)
    _check_live_flags(args)
    watcher = _ScheduleWatcher(args.speed_limit)
    cpu_cap = _block_cpu_cap(args.config)
    ctx = client_context(_certkey(args), _passphrase(args))
    state_dir = args.state_dir or _state_home("send")
    if args.dry_run:
        from smsrepl.cli.dryrun import dry_run_block

        return dry_run_block(args, ctx, state_dir)
    quiesce = None
    if args.continuous:
        from smsrepl.blocks.quiesce import FREEZE_TIMEOUT, Quiesce

        # also thaws what a killed run of this state directory left frozen
        quiesce = Quiesce(args.source, freeze=args.freeze, state_dir=state_dir,
                          timeout=FREEZE_TIMEOUT if args.freeze_timeout is None else args.freeze_timeout)
        quiesce.check()
    dirty, tracking = None, "scan"
    if args.dirty_map:
        dirty, tracking = _dirty_map(args.dirty_map, args.source), "map"
    elif args.continuous:
        from smsrepl.blocks.tracker import open_tracking

        dirty = open_tracking(args.source, args.tracking or "auto",
                              notice=lambda line: print(line, file=sys.stderr, flush=True))
        tracking = "kernel" if dirty is not None else "scan"
    out = _ProgressOutput(args.progress)
    watcher.note = out.note
    cont = None

    def make_sender() -> Sender:
        sender = Sender(args.source, args.target, parse_address(args.to), ctx,
                        state_dir, level=args.level,
                        speed_limit=watcher.load(), cpu_cap=cpu_cap, on_report=out.report,
                        host_sampler=HostSampler() if args.progress == "json" else None,
                        dirty_map=dirty, trace=cont.trace if cont is not None else None)
        watcher.sender = sender
        if stop is not None:
            stop.sender = sender
        return sender

    def print_summary(result) -> None:
        from smsrepl.cli.summary import block_round_line

        out.end_round(result.wire_bytes, result.seconds)
        summary = {
            "round": result.round_id, "kind": result.kind, "resumed_from": result.resumed_from,
            "source_bytes": result.source_size, "data_bytes": result.data_bytes,
            "wire_bytes": result.wire_bytes, "seconds": round(result.seconds, 3),
            "dirty_blocks": result.dirty_blocks,
            "stages": result.stages,
        }
        if result.reconcile:  # a sender without local state: reconciled, or why it copied everything
            summary["reconcile"] = result.reconcile
        if cont is not None:
            summary["tracking"] = tracking
            if result.whole_reason:
                summary["whole_source_because"] = result.whole_reason
            summary["lag"] = cont.lag()
            if cont.cutover_quiesce is not None:
                summary["cutover"] = cont.cutover_quiesce
        _print_summary(args, json.dumps(summary) if args.json else block_round_line(summary))

    watcher.watch()
    try:
        if args.continuous:
            from smsrepl.replication.continuous import ContinuousSync

            cont = ContinuousSync(make_sender, interval=interval, dirty_map=dirty, on_round=print_summary,
                                  quiesce=quiesce, tracking=tracking)
            _cutover_on_sigterm(cont.request_cutover, cont.abort, cont.request_round)
            cont.run()
        else:
            result = make_sender().run()
            stop.cancel()
            print_summary(result)
    finally:
        watcher.close()
        out.close()
        if dirty is not None:
            dirty.close()
    return 0


def _check_live_flags(args) -> None:
    """--tracking, --freeze and --freeze-timeout belong to --continuous (the tracker lives as long
    as the process, and the cutover is its last round); --tracking kernel excludes --dirty-map."""
    if not args.continuous:
        for flag, value in (("--tracking", args.tracking), ("--freeze", args.freeze or None),
                            ("--freeze-timeout", args.freeze_timeout)):
            if value is not None:
                raise ConfigError(f"{flag} applies to --continuous only")
    if args.dirty_map and args.tracking not in (None, "auto"):
        raise ConfigError(f"--tracking {args.tracking} and --dirty-map: give one way of finding changed blocks")


def _dirty_map(path: str, source: str):
    from smsrepl.blocks.device import BlockSource
    from smsrepl.blocks.dirtymap import DirtyMap

    with BlockSource(source) as src:
        size = src.size
    return DirtyMap.open(path, size)


def _cutover_on_sigterm(cutover, abort, round_now=None) -> None:
    """First SIGTERM: the cutover round; a second one, or SIGINT: abort, resumably; SIGUSR1: a round now."""
    import signal

    def on_term(signum, frame):
        if signum == signal.SIGTERM and not getattr(on_term, "seen", False):
            on_term.seen = True
            print("SIGTERM: running the cutover round", file=sys.stderr, flush=True)
            cutover()
        else:
            abort()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    if round_now is not None:
        signal.signal(signal.SIGUSR1, lambda signum, frame: round_now())


def cmd_netcheck(args) -> int:
    from smsrepl.transport.netcheck import run_netcheck
    from smsrepl.transport.connect import parse_address
    from smsrepl.transport.tls import client_context

    if not 0.2 <= args.seconds <= 600:
        raise ConfigError(f"--seconds {args.seconds}: must be between 0.2 and 600")
    ctx = client_context(_certkey(args), _passphrase(args))
    result = run_netcheck(parse_address(args.to), ctx, seconds=args.seconds)
    print(json.dumps(result.body()))
    return 0



def cmd_status(args) -> int:
    from smsrepl.transport.connect import parse_address
    from smsrepl.transport.status import fetch_status, format_report
    from smsrepl.transport.tls import client_context

    ctx = client_context(_certkey(args), _passphrase(args))
    report = fetch_status(parse_address(args.to), ctx)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def cmd_verify_block(args) -> int:
    from smsrepl.control.checkprogress import CheckProgress
    from smsrepl.control.progress import SYNC_LINUX_BLOCK, HostSampler
    from smsrepl.blocks.imagecompare import compare_block_images

    out = _ProgressOutput(args.progress, wire=False)
    progress = None
    if args.progress != "none":
        progress = CheckProgress(out.report, SYNC_LINUX_BLOCK, args.target if args.to else args.target_path,
                                 "4 KiB blocks", HostSampler() if args.progress == "json" else None)
    try:
        if bool(args.target_path) == bool(args.to):
            raise ConfigError("verify block: give TARGET, or --to HOST:PORT --target NAME --certkey FILE")
        if args.to:
            result, consistent = _verify_block_remote(args, progress)
        else:
            result, consistent = compare_block_images(args.source, args.target_path, on_progress=progress)
        if progress is not None:
            progress.finish(result["consistency_result"][0]["num_different_files"])
    except ReplicationError as exc:  # SPEC: 2 on error
        out.close()
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    out.close()
    # with --progress json stdout holds the reports alone
    print(json.dumps(result), file=sys.stderr if args.progress == "json" else sys.stdout, flush=True)
    return 0 if consistent else 1


def _verify_block_remote(args, on_progress=None) -> tuple[dict, bool]:
    """The source read now against the receiver's digests of what it verified and made durable."""
    import tempfile

    from smsrepl.control.consistency import consistent, entry, result_body
    from smsrepl.transport.connect import parse_address
    from smsrepl.transport.sender import Sender
    from smsrepl.transport.tls import client_context

    if not (args.target and args.certkey):
        raise ConfigError("verify block --to needs --target NAME and --certkey FILE")
    ctx = client_context(_certkey(args), _passphrase(args))
    with tempfile.TemporaryDirectory(prefix="smsrepl-verify-") as state:
        # a state directory of its own: a sender's session and manifest cache stay untouched
        differ, total = Sender(args.source, args.target, parse_address(args.to), ctx, state).check(
            extent=4096, on_progress=on_progress)
    entries = [entry(args.target, total, different=differ)]
    return result_body(entries), consistent(entries)


def cmd_verify_files(args) -> int:
    from smsrepl.files.compare import compare_trees, compare_with_listing
    from smsrepl.files.rules import PathRules

    out = _ProgressOutput(args.progress, wire=False)
    progress = None
    if args.progress != "none":
        from smsrepl.control.checkprogress import CheckProgress
        from smsrepl.control.progress import SYNC_LINUX_FILE, HostSampler

        progress = CheckProgress(out.report, SYNC_LINUX_FILE, args.source, "files",
                                 HostSampler() if args.progress == "json" else None)
    try:
        if bool(args.target_path) == bool(args.to):
            raise ConfigError("verify files: give TARGET_DIR, or --to HOST:PORT --target NAME --certkey FILE")
        dirs: list = list(args.dir_check or [])
        rules = None
        if args.config:
            rules = PathRules.from_configurations(_read_config(args.config), source=f"--config {args.config!r}")
            rules = rules.anchored(args.source)  # host paths under SRC_DIR name what is below it
            dirs += list(rules.consistency_dirs)
        kw = {"rules": rules, "mode": args.compare, "on_progress": progress, "list_paths": args.list}
        if args.to:
            from smsrepl.transport.file_sender import FileSender
            from smsrepl.transport.connect import parse_address
            from smsrepl.transport.tls import client_context

            if not (args.target and args.certkey):
                raise ConfigError("verify files --to needs --target NAME and --certkey FILE")
            sender = FileSender(args.source, args.target, parse_address(args.to),
                                client_context(_certkey(args), _passphrase(args)))
            result, checks = compare_with_listing(args.source, sender.describe_target, dirs, **kw)
        else:
            result, checks = compare_trees(args.source, args.target_path, dirs, **kw)
    except ReplicationError as exc:  # SPEC: 2 on error, whatever the error's transfer exit code
        out.close()
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    if progress is not None:
        progress.finish(sum(e["num_different_files"] + e["num_target_miss_files"] + e["num_target_more_files"]
                            for e in result["consistency_result"]))
    out.close()
    if args.list:
        for check in checks:
            print(f"# {check.dir_check}", file=sys.stderr)
            for row in check.combined():
                print(row, file=sys.stderr)
    # with --progress json, stdout carries 5.4.8 reports only: the result goes to stderr
    print(json.dumps(result), file=sys.stderr if args.progress == "json" else sys.stdout)
    return 0 if result["check_result"] == "consistent" else 1


def _max_delete(text: str) -> int:
    from smsrepl.cli.dryrun import max_delete

    return max_delete(text)


def _file_level(text: str):
    if text == "auto":
        return text
    try:
        level = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a zstd level or 'auto'") from None
    if not 0 <= level <= 19:
        raise argparse.ArgumentTypeError(f"level {level} out of range 0-19")
    return level


def cmd_agent(args) -> int:
    from smsrepl.agent.client import ControlPlane
    from smsrepl.agent.loop import Agent

    try:
        with open(args.token_file) as fh:
            token = fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"--token-file {args.token_file!r} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--token-file {args.token_file!r} is not UTF-8 text") from None
    if not token:
        raise ConfigError(f"--token-file {args.token_file!r} is empty")
    disks = {}
    for item in args.disk or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--disk {item!r}: expected NAME=PATH (e.g. /dev/vda=/dev/vda)")
        if name in disks:
            raise ConfigError(f"--disk {name} given twice")
        _check_disk(item, path)
        disks[name] = path
    if args.ca_file:
        _check_ca_file(args.ca_file)
    cp = ControlPlane(args.endpoint, token, verify=args.ca_file or True, retries=2, backoff=0.5, max_backoff=5.0)
    agent = Agent(cp, args.source_id, disks, args.state_dir or _state_home("agent"), task_id=args.task_id,
                  data_port=args.data_port, poll_interval=args.poll_interval, sync_interval=args.sync_interval,
                  host=args.host, tree=args.tree, tree_target=args.tree_target, tracking=args.tracking,
                  freeze=args.freeze, freeze_timeout=args.freeze_timeout)

    _cutover_on_sigterm(agent.request_cutover, agent.stop)
    return agent.run()


def _check_disk(item: str, path: str) -> None:
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError(f"--disk {item!r}: {path}: {exc.strerror}") from None
    if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
        raise ConfigError(f"--disk {item!r}: {path} is not a block device or an image file")


def _check_ca_file(path: str) -> None:
    """--ca-file: a readable file of PEM certificates (requests would fail on it at the first poll)."""
    import ssl

    try:
        with open(path, "rb") as fh:
            data = fh.read(16 << 20)
    except OSError as exc:
        raise ConfigError(f"--ca-file {path!r} cannot be read: {exc.strerror}") from None
    try:
        ssl.create_default_context(cadata=data.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError, ValueError):
        raise ConfigError(f"--ca-file {path!r} holds no PEM CA certificate") from None


def cmd_demo(args) -> int:
    from smsrepl.lab.demo import run_demo

    return run_demo(size_mib=args.size_mib, keep=args.keep)


CERTKEY_HELP = "the certkey.json bundle (smsrepl certs init); both hosts need the same one"
PASSPHRASE_HELP = "file holding the passphrase of the bundle's private keys"
TO_HELP = "the receiver's address"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="smsrepl", description="Block and file replication over mutual TLS.")
    p.add_argument("--version", action="version", version=f"smsrepl {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens to stderr (also accepted after "
                                                                "the subcommand)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to run")

    certs = sub.add_parser("certs", help="certificate bundles for a lab").add_subparsers(dest="certs_cmd", required=True, help="write a bundle")
    ci = certs.add_parser("init", help="write OUTDIR/certkey.json (the 5.7.1 shape)")
    ci.add_argument("outdir", metavar="OUTDIR", help="directory to write certkey.json in (created, mode 0700, "
                                                     "when missing); copy that one file to both hosts")
    ci.add_argument("--passphrase-file", metavar="FILE", help=PASSPHRASE_HELP + " to encrypt the private keys with")
    ci.add_argument("--force", action="store_true", help="replace an existing OUTDIR/certkey.json (hosts holding "
                                                        "the old bundle can no longer connect)")
    ci.set_defaults(func=cmd_certs_init)

    rc = sub.add_parser("receive", help="the target-side endpoint")
    rc.add_argument("--listen", required=True, type=address(listen=True), metavar="HOST:PORT",
                    help="address to accept senders on; a bare PORT listens on every address, IPv4 and IPv6")
    rc.add_argument("--certkey", required=True, metavar="FILE", help=CERTKEY_HELP)
    rc.add_argument("--passphrase-file", metavar="FILE", help=PASSPHRASE_HELP)
    rc.add_argument("--target", action="append", default=[], metavar="NAME=PATH",
                    help="a target senders may name: an image file or device (block) or a directory (files); "
                         "repeatable")
    rc.add_argument("--root", metavar="DIR", help="every target NAME is DIR/NAME: an image file (block) or a directory (files)")
    rc.add_argument("--create", action="store_true",
                    help="create a --target PATH that does not exist (an image file sized to the source, or a "
                         "directory), for a lab; without it a missing target is refused at start")
    rc.add_argument("--state-dir", type=state_dir, metavar="DIR", help="where the receiver keeps its checkpoints and manifests "
                                                       "(default ~/.local/state/smsrepl/receive)")
    rc.add_argument("--once", action="store_true", help="exit after one session")
    rc.add_argument("--checkpoint-seconds", type=seconds(0, 3600, low_open=True), default=2.0, metavar="SECONDS",
                    help="seconds between durable checkpoints while data flows (default 2)")
    rc.add_argument("--log-file", metavar="FILE",
                    help="append log lines (rounds, warnings) to FILE instead of stderr; reopened when "
                         "moved (logrotate) and on SIGHUP. 'listening on HOST:PORT' goes to both")
    rc.add_argument("--log-format", choices=["text", "json"], default="text",
                    help="text (default), or json: one object a line with time (ISO 8601 UTC), level, "
                         "logger, message and the line's fields")
    rc.set_defaults(func=cmd_receive)

    send = sub.add_parser("send", help="the source-side endpoint").add_subparsers(dest="send_cmd", required=True, help="what to copy")
    sf = send.add_parser("files", help="copy (first run) or sync (later runs) a directory tree")
    sf.add_argument("source", metavar="SRC_DIR", help="the directory tree to copy")
    sf.add_argument("--to", required=True, type=address(), metavar="HOST:PORT", help=TO_HELP)
    sf.add_argument("--target", required=True, type=target_name, metavar="NAME", help="the receiver's directory target to copy into")
    sf.add_argument("--certkey", required=True, metavar="FILE", help=CERTKEY_HELP)
    sf.add_argument("--passphrase-file", metavar="FILE", help=PASSPHRASE_HELP)
    sf.add_argument("--state-dir", type=state_dir, metavar="DIR", help="accepted for symmetry with send block; the receiver keeps a file "
                                        "target's round record")
    sf.add_argument("--config", metavar="FILE", help="5.10.1 configurations JSON (path rules, LINUX_CPU_LIMIT)")
    sf.add_argument("--checksum", action="store_true",
                    help="find changed files by content, not by size and mtime (reads every file on both ends)")
    sf.add_argument("--level", type=_file_level, default="auto",
                    help=f"zstd level, 0 = no compression, auto (default) = level {DEFAULT_LEVEL} "
                         "while it moves data faster than sending it raw")
    sf.add_argument("--speed-limit", metavar="FILE",
                    help="5.4.10 speed_limit JSON; re-read when it changes during the round")
    sf.add_argument("--progress", choices=["bar", "json", "none"], default="none",
                    help="json: one 5.4.8 report per line on stdout (MIGRATE_LINUX_FILE / SYNC_LINUX_FILE)")
    sf.add_argument("--json", action="store_true",
                    help="print each round's summary as one JSON object instead of the human line (on stdout; "
                         "on stderr with --progress json)")
    sf.add_argument("--continuous", action="store_true",
                    help="after the copy keep running sync rounds (SIGUSR1: a round now); SIGTERM runs the "
                         "cutover round and exits 0")
    sf.add_argument("--interval", type=number(float), metavar="SECONDS", help="seconds between continuous rounds (default 30)")
    sf.add_argument("--journal", choices=["auto", "off"],
                    help="with --continuous, how sync rounds find what changed: auto (default) = a fanotify change "
                         "journal where the kernel and privileges allow (root), rounds then scan only the "
                         "directories it names; off = every round walks the whole tree")
    sf.add_argument("--whole-tree-every", type=number(int), metavar="N",
                    help="with the journal, every Nth round walks the whole tree anyway (writes through a shared "
                         "mmap raise no event); 0 = only when the journal cannot vouch (default 10). The "
                         "cutover round always walks the whole tree")
    sf.add_argument("--dry-run", "-n", action="store_true",
                    help="print what a round would change, one line per entry as rsync -i does, and a summary; "
                         "change nothing on the target")
    sf.add_argument("--max-delete", type=_max_delete, metavar="N",
                    help="refuse a round (before it changes anything, exit 2) that would delete more than N target "
                         "entries; 0 = no deletion, -1 = no limit (default: refuse one that would delete more than "
                         "half of a target of 10 entries or more)")
    sf.set_defaults(func=_one_shot_stop(cmd_send_files))
    sb = send.add_parser("block", help="copy (first run) or sync (later runs) a disk or image")
    sb.add_argument("source", metavar="SOURCE", help="the disk or image to copy")
    sb.add_argument("--to", required=True, type=address(), metavar="HOST:PORT", help=TO_HELP)
    sb.add_argument("--target", required=True, type=target_name, metavar="NAME", help="the receiver's block target to copy into")
    sb.add_argument("--certkey", required=True, metavar="FILE", help=CERTKEY_HELP)
    sb.add_argument("--passphrase-file", metavar="FILE", help=PASSPHRASE_HELP)
    sb.add_argument("--state-dir", type=state_dir, metavar="DIR", help="where the sender keeps what it copied, for resuming and "
                                                       "sync rounds (default ~/.local/state/smsrepl/send)")
    sb.add_argument("--progress", choices=["bar", "json", "none"], default="none",
                    help="json: one 5.4.8 report per line on stdout; bar: a progress bar on stderr")
    sb.add_argument("--speed-limit", metavar="FILE",
                    help="5.4.10 speed_limit JSON; re-read when the file changes during the transfer")
    sb.add_argument("--config", metavar="FILE", help="5.10.1 configurations JSON (LINUX_CPU_LIMIT)")
    sb.add_argument("--level", type=_file_level, default=DEFAULT_LEVEL,
                    help=f"zstd level, 0 = no compression, auto = level {DEFAULT_LEVEL} for each frame only while "
                         f"that moves data faster than sending it raw (default {DEFAULT_LEVEL})")
    sb.add_argument("--dirty-map", metavar="FILE",
                    help="changed-block map the source's writes are marked in (smsrepl.blocks.dirtymap); "
                         "sync rounds then read only the blocks it names")
    sb.add_argument("--json", action="store_true",
                    help="print each round's summary as one JSON object instead of the human line (on stdout; "
                         "on stderr with --progress json)")
    sb.add_argument("--continuous", action="store_true",
                    help="after the copy keep running sync rounds; SIGTERM runs the cutover round and exits 0")
    sb.add_argument("--interval", type=number(float), metavar="SECONDS", help="seconds between continuous rounds (default 30)")
    sb.add_argument("--tracking", choices=["auto", "kernel", "scan"],
                    help="how --continuous finds changed blocks: kernel (tracefs block events, needs root), scan "
                         "(every round reads the whole source), auto (default: kernel where it can run)")
    sb.add_argument("--freeze", action="store_true",
                    help="the cutover freezes the source's mounted file systems (FIFREEZE) until its round has "
                         "read the last block, instead of only syncing them; always thawed")
    sb.add_argument("--freeze-timeout", type=seconds(0, 3600, low_open=True), metavar="SECONDS",
                    help="longest a --freeze may last before it is thawed and the cutover round runs again "
                         "(default 60)")
    sb.add_argument("--dry-run", "-n", action="store_true",
                    help="print how many blocks a round would send (and their ranges; -v: every range); change "
                         "nothing on the target")
    sb.set_defaults(func=_one_shot_stop(cmd_send_block))

    nc = sub.add_parser("netcheck", help="measure the link to a receiver; prints the 5.9.1 body")
    nc.add_argument("--to", required=True, type=address(), metavar="HOST:PORT", help=TO_HELP)
    nc.add_argument("--certkey", required=True, metavar="FILE", help=CERTKEY_HELP)
    nc.add_argument("--passphrase-file", metavar="FILE", help=PASSPHRASE_HELP)
    nc.add_argument("--seconds", type=number(float), default=3.0, metavar="SECONDS", help="length of the bulk transfer (default 3)")
    nc.set_defaults(func=cmd_netcheck)

    st = sub.add_parser("status", help="list a receiver's targets and running sessions")
    st.add_argument("--to", required=True, type=address(), metavar="HOST:PORT", help=TO_HELP)
    st.add_argument("--certkey", required=True, metavar="FILE", help=CERTKEY_HELP)
    st.add_argument("--passphrase-file", metavar="FILE", help=PASSPHRASE_HELP)
    st.add_argument("--json", action="store_true",
                    help="print the report as JSON ({\"targets\": [...], \"sessions\": [...]}) instead of tables")
    st.set_defaults(func=cmd_status)

    ver = sub.add_parser("verify", help="compare a source with its copy").add_subparsers(dest="verify_cmd", required=True, help="what to compare")
    vb = ver.add_parser("block", help="compare two images or devices block by block")
    vb.add_argument("source", metavar="SOURCE", help="the disk or image that was copied")
    vb.add_argument("target_path", nargs="?", metavar="TARGET", help="its copy, an image or device on this host "
                                                                     "(or give --to)")
    vb.add_argument("--to", type=address(), metavar="HOST:PORT", help="compare with a receiver's target (it sends its digests, "
                                                     "never data)")
    vb.add_argument("--target", type=target_name, metavar="NAME", help="with --to: the receiver's target to compare with")
    vb.add_argument("--certkey", metavar="FILE", help="with --to: " + CERTKEY_HELP)
    vb.add_argument("--passphrase-file", metavar="FILE", help=PASSPHRASE_HELP)
    vb.add_argument("--progress", choices=["bar", "json", "none"], default="none",
                    help="json: one 5.4.8 report per line on stdout (SYNC_LINUX_BLOCK; the result then goes to "
                         "stderr); bar: a progress bar on stderr")
    vb.set_defaults(func=cmd_verify_block)
    vf = ver.add_parser("files", help="compare two directory trees (5.4.13 counts)")
    vf.add_argument("source", type=directory("source directory"), metavar="SRC_DIR", help="the directory tree that was copied")
    vf.add_argument("target_path", nargs="?", type=directory("target directory"), metavar="TARGET_DIR", help="its copy on this host (or give --to)")
    vf.add_argument("--to", type=address(), metavar="HOST:PORT", help="compare with a receiver's target (it sends digests and "
                                                     "metadata, never file data)")
    vf.add_argument("--target", type=target_name, metavar="NAME", help="with --to: the receiver's target to compare with")
    vf.add_argument("--certkey", metavar="FILE", help="with --to: " + CERTKEY_HELP)
    vf.add_argument("--passphrase-file", metavar="FILE", help=PASSPHRASE_HELP)
    vf.add_argument("--dir-check", action="append", metavar="PATH",
                    help="a directory to check, absolute from the tree's root (repeatable; default: all)")
    vf.add_argument("--config", metavar="FILE", help="5.10.1 configurations JSON, as given to send files: "
                                                      "its CONSISTENCY_DIR entries pick the directories, and "
                                                      "what its rules left out of the copy stays out of the check")
    vf.add_argument("--list", action="store_true",
                    help="also list every path on stderr, as rclone check --combined: '=' same, '*' different, "
                         "'+' only on the source (missing on the target), '-' only on the target, '!' unreadable; "
                         "names escaped as ls -b does (\\\\, \\n, \\t, \\ooo)")
    vf.add_argument("--compare", choices=["data", "metadata", "all"], default="data",
                    help="data (default): kind, size and content (XXH3-128 of every file on both sides), "
                         "symlink targets, device numbers, as rclone check; metadata: no data read, size, mtime, "
                         "permissions, owner (as rsync's quick check); all: both")
    vf.add_argument("--progress", choices=["bar", "json", "none"], default="none",
                    help="json: one 5.4.8 report per line on stdout (the result then goes to stderr); "
                         "bar: a progress bar on stderr")
    vf.set_defaults(func=cmd_verify_files, quick=True)

    ag = sub.add_parser("agent", help="the reference agent loop against an API v3 control plane")
    ag.add_argument("--endpoint", required=True, type=https_url, metavar="URL", help="https://... of the control plane")
    ag.add_argument("--token-file", required=True, metavar="FILE", help="file holding the X-Auth-Token")
    ag.add_argument("--source-id", required=True, type=control_plane_id, metavar="ID", help="this source server's id in the control plane")
    ag.add_argument("--task-id", type=control_plane_id, metavar="ID", help="the task, when START does not name one")
    ag.add_argument("--disk", action="append", metavar="NAME=PATH",
                    help="a registered source disk (5.3.2 name, e.g. /dev/vda) and the device or image to read")
    ag.add_argument("--tree", type=directory("source tree"), metavar="DIR", help="the source tree of file-level tasks (MIGRATE_FILE), e.g. /")
    ag.add_argument("--tree-target", default="root", type=target_name, metavar="NAME",
                    help="the receiver's directory target for the tree (default root)")
    ag.add_argument("--ca-file", metavar="FILE", help="trust this CA for the control plane's HTTPS")
    ag.add_argument("--data-port", type=number_in(int, 1, 65535), default=8900, metavar="PORT", help="the receiver's data port (default 8900)")
    ag.add_argument("--host", type=nonempty, help="connect here instead of the task's migration_ip (a lab)")
    ag.add_argument("--state-dir", type=state_dir, metavar="DIR", help="where the agent keeps its state "
                                                       "(default ~/.local/state/smsrepl/agent)")
    ag.add_argument("--poll-interval", type=seconds(0, 3600, low_open=True), default=5.0, metavar="SECONDS",
                    help="seconds between command polls (default 5)")
    ag.add_argument("--sync-interval", type=seconds(0, 86400), default=30.0, metavar="SECONDS",
                    help="seconds between continuous sync rounds (default 30)")
    ag.add_argument("--tracking", choices=["auto", "kernel", "scan"], default="auto",
                    help="how sync rounds of a syncing task find changed blocks (see send block --tracking)")
    ag.add_argument("--freeze", action="store_true",
                    help="the cutover freezes the source disks' file systems until its round has read them")
    ag.add_argument("--freeze-timeout", type=seconds(0, 3600, low_open=True), metavar="SECONDS",
                    help="longest a --freeze may last before it is thawed and the cutover runs again (default 60)")
    ag.set_defaults(func=cmd_agent)

    demo = sub.add_parser("demo", help="run the whole loop on this machine")
    demo.add_argument("--size-mib", type=number_in(int, 1, 1 << 20), default=64, metavar="MIB",
                      help="size of the demo's first disk image (default 64)")
    demo.add_argument("--keep", action="store_true", help="keep the demo's working directory")
    demo.set_defaults(func=cmd_demo)
    for leaf in subcommands(p):
        add_verbose(leaf)
    return p


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
