"""``smsrepl verify block`` and ``smsrepl verify files``: a source compared with its copy, here or
at a receiver (which sends digests, never data); the 5.4.13 result on stdout, exit 1 when
they differ."""
from __future__ import annotations

import json
import sys

from smsrepl.errors import EXIT_USAGE, ConfigError, ReplicationError
from smsrepl.cli.bundle import bundle_certkey, bundle_passphrase
from smsrepl.cli.configfile import read_config
from smsrepl.cli.progressout import ProgressOutput


def cmd_verify_block(args) -> int:
    from smsrepl.control.checkprogress import CheckProgress
    from smsrepl.control.hostsample import HostSampler
    from smsrepl.control.progress import SYNC_LINUX_BLOCK
    from smsrepl.blocks.imagecompare import compare_block_images

    out = ProgressOutput(args.progress, wire=False)
    progress = None
    if args.progress != "none":
        progress = CheckProgress(out.report, SYNC_LINUX_BLOCK, args.target if args.to else args.target_path,
                                 "4 KiB blocks", HostSampler() if args.progress == "json" else None)
    try:
        if bool(args.target_path) == bool(args.to):
            raise ConfigError("verify block: give TARGET, or --to HOST:PORT --target NAME --certkey FILE")
        _sync_mounted(args.source, out.note)
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


def _sync_mounted(source: str, note) -> None:
    """What the file systems mounted from a block source hold in memory reaches its disk before
    the check reads it (cli/mounted.py)."""
    from smsrepl.cli.mounted import block_device, warn_written

    if not block_device(source):
        return
    from smsrepl.blocks.quiesce import Quiesce

    quiesce = Quiesce(source)
    warn_written(source, quiesce, note, "shows as differences")
    quiesce.begin()


def _verify_block_remote(args, on_progress=None) -> tuple[dict, bool]:
    """The source read now against the receiver's digests of what it verified and made durable."""
    import tempfile

    from smsrepl.control.consistency import consistent, entry, result_body
    from smsrepl.transport.connect import parse_address
    from smsrepl.transport.sender import Sender
    from smsrepl.transport.tls import client_context

    if not (args.target and args.certkey):
        raise ConfigError("verify block --to needs --target NAME and --certkey FILE")
    ctx = client_context(bundle_certkey(args), bundle_passphrase(args))
    with tempfile.TemporaryDirectory(prefix="smsrepl-verify-") as state:
        # a state directory of its own: a sender's session and manifest cache stay untouched
        differ, total = Sender(args.source, args.target, parse_address(args.to), ctx, state).check(
            extent=4096, on_progress=on_progress)
    entries = [entry(args.target, total, different=differ)]
    return result_body(entries), consistent(entries)


def cmd_verify_files(args) -> int:
    from smsrepl.files.compare import compare_trees, compare_with_listing
    from smsrepl.files.rules import PathRules

    out = ProgressOutput(args.progress, wire=False)
    progress = None
    if args.progress != "none":
        from smsrepl.control.checkprogress import CheckProgress
        from smsrepl.control.hostsample import HostSampler
        from smsrepl.control.progress import SYNC_LINUX_FILE

        progress = CheckProgress(out.report, SYNC_LINUX_FILE, args.source, "files",
                                 HostSampler() if args.progress == "json" else None)
    try:
        if bool(args.target_path) == bool(args.to):
            raise ConfigError("verify files: give TARGET_DIR, or --to HOST:PORT --target NAME --certkey FILE")
        dirs: list = list(args.dir_check or [])
        rules = None
        if args.config:
            rules = PathRules.from_configurations(read_config(args.config), source=f"--config {args.config!r}")
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
                                client_context(bundle_certkey(args), bundle_passphrase(args)))
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
