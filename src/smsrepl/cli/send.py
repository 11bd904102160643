"""``smsrepl send files`` and ``smsrepl send block``: one round (copy, or sync of what changed),
or with --continuous sync rounds until the cutover; each round's summary on stdout."""
from __future__ import annotations

import json
import os
import sys

from smsrepl import faults
from smsrepl.errors import ConfigError
from smsrepl.cli.bundle import bundle_certkey, bundle_passphrase
from smsrepl.cli.configfile import read_config
from smsrepl.cli.flags import state_home
from smsrepl.cli.mounted import block_device, warn_written
from smsrepl.cli.progressout import ProgressOutput
from smsrepl.cli.speedwatch import ScheduleWatcher

TYPE_CHECKING = False  # typing itself would cost every command 3 ms of imports

if TYPE_CHECKING:
    from typing import TypeVar

    from smsrepl.replication.continuous import ContinuousSync
    from smsrepl.transport.file_sender import FileSender
    from smsrepl.transport.sender import Sender

    S = TypeVar("S", "Sender", "FileSender")


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

        rules = PathRules.from_configurations(read_config(args.config), source=f"--config {args.config!r}")
        rules = rules.anchored(args.source)  # before anything connects: a rule may exclude the whole tree
    host_sampler = None
    if args.progress == "json":
        from smsrepl.control.hostsample import HostSampler

        host_sampler = HostSampler()
    watcher = ScheduleWatcher(args.speed_limit)
    ctx = client_context(bundle_certkey(args), bundle_passphrase(args))
    if args.dry_run:
        from smsrepl.cli.dryrun import dry_run_files

        return dry_run_files(args, rules, ctx)
    out = ProgressOutput(args.progress)
    watcher.note = out.note

    cont: ContinuousSync | None = None
    last_whole = None
    if args.continuous:
        from smsrepl.files.deletions import LastWholeRound

        last_whole = LastWholeRound()  # the deletion guard's memory of the source, round to round

    def make_sender() -> FileSender:
        cutover = cont is not None and cont.cutover_requested
        sender = FileSender(args.source, args.target, parse_address(args.to), ctx, rules=rules,
                            checksum=args.checksum, level=args.level, streams=args.streams,
                            speed_limit=watcher.load(),
                            on_report=out.report if args.progress != "none" else None, host_sampler=host_sampler,
                            journal=journal, whole="the cutover round walks the whole tree" if cutover else None,
                            max_delete=args.max_delete, last_whole=last_whole)
        return _held(sender, watcher, stop)

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
            from smsrepl.cli.interrupt import cutover_on_sigterm
            from smsrepl.replication.continuous import ContinuousSync

            cont = ContinuousSync(make_sender, interval=interval, on_round=print_summary)
            cutover_on_sigterm(cont.request_cutover, cont.abort, cont.request_round)
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


def _held(sender: S, watcher: ScheduleWatcher, stop) -> S:
    """The round's sender, made known to the --speed-limit watcher and to the one-shot stop."""
    watcher.sender = sender
    if stop is not None:
        stop.sender = sender
    return sender


def _print_summary(args, line: str) -> None:
    """A round's summary (the human line, or with --json the JSON object): on stdout, or on
    stderr with --progress json, whose stdout carries 5.4.8 reports only."""
    print(line, file=sys.stderr if args.progress == "json" else sys.stdout, flush=True)


def one_shot_stop(cmd):
    """``cmd`` (send block / send files) with SIGINT and SIGTERM stopping a one-shot run within
    a second, exit 3 and where it got to (interrupt.OneShotStop). --continuous keeps its own
    signals: SIGTERM is the cutover round there."""

    def run(args) -> int:
        if args.continuous:
            from smsrepl.cli.interrupt import hold_early_signals

            hold_early_signals()  # a cutover asked for while the command starts is kept
            faults.point("send.start")
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
    from smsrepl.transport.connect import connect_ahead, parse_address
    from smsrepl.transport.tls import client_context

    from smsrepl.cli.dryrun import check_flags

    check_flags(args)
    interval = _continuous_interval(args)
    _check_live_flags(args)
    watcher = ScheduleWatcher(args.speed_limit)
    cpu_cap = _block_cpu_cap(args.config)
    ctx = client_context(bundle_certkey(args), bundle_passphrase(args))
    state_dir = args.state_dir or state_home("send")
    if args.dry_run:
        from smsrepl.cli.dryrun import dry_run_block

        return dry_run_block(args, ctx, state_dir)
    # a one-shot copy's connection is made while the block machinery is imported (0.1 s): on a
    # 50 ms link its handshakes took two round trips after the imports
    ahead = None if args.continuous else connect_ahead(parse_address(args.to), ctx, args.streams)
    from smsrepl.control.hostsample import HostSampler
    from smsrepl.transport.sender import Sender

    quiesce = None
    if args.continuous or block_device(args.source) or _backs_a_loop_device(args.source):
        from smsrepl.blocks.quiesce import FREEZE_TIMEOUT, Quiesce

        # the file systems mounted from the source are synced (or frozen) for the cutover, or
        # for a one-shot round, which is the copy; also thaws what a killed run of this state
        # directory left frozen
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
    out = ProgressOutput(args.progress)
    watcher.note = out.note
    cont: ContinuousSync | None = None
    quiesced: dict[str, str] = {}  # what a one-shot round's quiesce did to each file system
    if quiesce is not None and not args.continuous and not args.freeze:
        warn_written(args.source, quiesce, out.note,
                     "makes an inconsistent copy: stop the applications writing there, or end with a round under "
                     "--freeze, or use --continuous and cut over")
    if args.freeze and (quiesce is None or not quiesce.mounts()):
        out.note(f"note: --freeze: no file system is mounted from {args.source} here; there is nothing to freeze")

    def make_sender() -> Sender:
        sender = Sender(args.source, args.target, parse_address(args.to), ctx,
                        state_dir, level=args.level, streams=args.streams,
                        speed_limit=watcher.load(), cpu_cap=cpu_cap, on_report=out.report,
                        host_sampler=HostSampler() if args.progress == "json" else None,
                        dirty_map=dirty, trace=cont.trace if cont is not None else None)
        return _held(sender, watcher, stop)

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
        if quiesced:
            summary["quiesced"] = quiesced
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
            from smsrepl.cli.interrupt import cutover_on_sigterm
            from smsrepl.replication.continuous import ContinuousSync

            cont = ContinuousSync(make_sender, interval=interval, dirty_map=dirty, on_round=print_summary,
                                  quiesce=quiesce, tracking=tracking)
            cutover_on_sigterm(cont.request_cutover, cont.abort, cont.request_round)
            cont.run()
        else:
            sender = make_sender()
            assert ahead is not None
            sender.take_connection(ahead)
            from smsrepl.replication.oneshot import quiesced_round

            result, quiesced = quiesced_round(sender, make_sender, quiesce, on_round=print_summary)
            stop.cancel()
            print_summary(result)
    finally:
        watcher.close()
        out.close()
        if dirty is not None:
            dirty.close()
    return 0


def _backs_a_loop_device(source: str) -> bool:
    """An image file attached to a loop device (losetup): what is mounted from that device is
    synced or frozen for a one-shot round, as for a block device's file systems."""
    from smsrepl.blocks.loops import loop_devices_of

    return bool(loop_devices_of(source))


def _check_live_flags(args) -> None:
    """--tracking belongs to --continuous (the tracker lives as long as the process; --freeze
    serves a one-shot round too), --freeze-timeout to --freeze; --tracking kernel excludes
    --dirty-map."""
    if not args.continuous and args.tracking is not None:
        raise ConfigError("--tracking applies to --continuous only")
    if args.freeze_timeout is not None and not args.freeze:
        raise ConfigError("--freeze-timeout applies to --freeze only")
    if args.dirty_map and args.tracking not in (None, "auto"):
        raise ConfigError(f"--tracking {args.tracking} and --dirty-map: give one way of finding changed blocks")


def _dirty_map(path: str, source: str):
    from smsrepl.blocks.source import BlockSource
    from smsrepl.blocks.dirtymap import DirtyMap

    with BlockSource(source) as src:
        size = src.size
    return DirtyMap.open(path, size)


def _block_cpu_cap(path: str | None):
    """The 5.10.1 configuration body for block transfer: only LINUX_CPU_LIMIT applies."""
    if not path:
        return None
    from smsrepl.files.rules import CPU_LIMIT, KEYS
    from smsrepl.throttle import CpuCap

    body = read_config(path)
    for i, item in enumerate(body["configurations"]):
        key = item.get("config_key") if isinstance(item, dict) else None
        if key in KEYS - {CPU_LIMIT}:
            raise ConfigError(f"--config configurations[{i}]: {key} applies to file-level transfer only")
        if key != CPU_LIMIT:
            raise ConfigError(f"--config configurations[{i}]: unknown config_key {key!r}")
    return CpuCap.from_configurations(body)
