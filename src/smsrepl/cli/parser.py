"""The command line's parser: every subcommand, its flags and their help, each leaf bound to the
function that runs it."""
from __future__ import annotations

import argparse

from smsrepl import __version__
from smsrepl.codec import DEFAULT_LEVEL
from smsrepl.cli.agent import cmd_agent
from smsrepl.cli.dryrun import max_delete
from smsrepl.cli.flags import (OneLineParser, add_verbose, address, control_plane_id, directory,
                               https_url, nonempty, number, number_in, seconds, state_dir,
                               stream_count, subcommands, target_name, zstd_level)
from smsrepl.cli.lab import cmd_certs_init, cmd_demo
from smsrepl.cli.probe import cmd_netcheck, cmd_status
from smsrepl.cli.receive import cmd_receive
from smsrepl.cli.send import cmd_send_block, cmd_send_files, one_shot_stop
from smsrepl.cli.verify import cmd_verify_block, cmd_verify_files

CERTKEY_HELP = "the certkey.json bundle (smsrepl certs init); both hosts need the same one"
PASSPHRASE_HELP = "file holding the passphrase of the bundle's private keys"
TO_HELP = "the receiver's address"
ROUND_JSON_HELP = ("print each round's summary as one JSON object instead of the human line (on stdout; on "
                   "stderr with --progress json)")


def _receiver_flags(p: argparse.ArgumentParser, *, target_help: str | None = None) -> None:
    """--to, --target (given its help), --certkey and --passphrase-file: a command that connects to
    a receiver."""
    p.add_argument("--to", required=True, type=address(), metavar="HOST:PORT", help=TO_HELP)
    if target_help is not None:
        p.add_argument("--target", required=True, type=target_name, metavar="NAME", help=target_help)
    p.add_argument("--certkey", required=True, metavar="FILE", help=CERTKEY_HELP)
    p.add_argument("--passphrase-file", metavar="FILE", help=PASSPHRASE_HELP)


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
    _receiver_flags(sf, target_help="the receiver's directory target to copy into")
    sf.add_argument("--state-dir", type=state_dir, metavar="DIR", help="accepted for symmetry with send block; the receiver keeps a file "
                                        "target's round record")
    sf.add_argument("--config", metavar="FILE", help="5.10.1 configurations JSON (path rules, LINUX_CPU_LIMIT)")
    sf.add_argument("--checksum", action="store_true",
                    help="find changed files by content, not by size and mtime (reads every file on both ends)")
    sf.add_argument("--streams", type=stream_count, default="auto", metavar="N|auto",
                    help="TLS connections the session runs over (1-16); auto (default): one on a LAN, more the "
                         "longer the link's round trip")
    sf.add_argument("--level", type=zstd_level, default="auto",
                    help=f"zstd level, 0 = no compression, auto (default) = level {DEFAULT_LEVEL} "
                         "while it moves data faster than sending it raw")
    sf.add_argument("--speed-limit", metavar="FILE",
                    help="5.4.10 speed_limit JSON; re-read when it changes during the round")
    sf.add_argument("--progress", choices=["bar", "json", "none"], default="none",
                    help="json: one 5.4.8 report per line on stdout (MIGRATE_LINUX_FILE / SYNC_LINUX_FILE)")
    sf.add_argument("--json", action="store_true", help=ROUND_JSON_HELP)
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
    sf.add_argument("--max-delete", type=max_delete, metavar="N",
                    help="refuse a round (before it changes anything, exit 2) that would delete more than N target "
                         "entries; 0 = no deletion, -1 = no limit (default: refuse one that would delete more than "
                         "half of a target of 10 entries or more)")
    sf.set_defaults(func=one_shot_stop(cmd_send_files))
    sb = send.add_parser("block", help="copy (first run) or sync (later runs) a disk or image")
    sb.add_argument("source", metavar="SOURCE", help="the disk or image to copy")
    _receiver_flags(sb, target_help="the receiver's block target to copy into")
    sb.add_argument("--state-dir", type=state_dir, metavar="DIR", help="where the sender keeps what it copied, for resuming and "
                                                       "sync rounds (default ~/.local/state/smsrepl/send)")
    sb.add_argument("--progress", choices=["bar", "json", "none"], default="none",
                    help="json: one 5.4.8 report per line on stdout; bar: a progress bar on stderr")
    sb.add_argument("--speed-limit", metavar="FILE",
                    help="5.4.10 speed_limit JSON; re-read when the file changes during the transfer")
    sb.add_argument("--config", metavar="FILE", help="5.10.1 configurations JSON (LINUX_CPU_LIMIT)")
    sb.add_argument("--level", type=zstd_level, default=DEFAULT_LEVEL,
                    help=f"zstd level, 0 = no compression, auto = level {DEFAULT_LEVEL} for each frame only while "
                         f"that moves data faster than sending it raw (default {DEFAULT_LEVEL})")
    sb.add_argument("--streams", type=stream_count, default="auto", metavar="N|auto",
                    help="TLS connections the session runs over (1-16); auto (default): one on a LAN, more the "
                         "longer the link's round trip (a long fat link holds one connection below its rate)")
    sb.add_argument("--dirty-map", metavar="FILE",
                    help="changed-block map the source's writes are marked in (smsrepl.blocks.dirtymap); "
                         "sync rounds then read only the blocks it names")
    sb.add_argument("--json", action="store_true", help=ROUND_JSON_HELP)
    sb.add_argument("--continuous", action="store_true",
                    help="after the copy keep running sync rounds; SIGTERM runs the cutover round and exits 0")
    sb.add_argument("--interval", type=number(float), metavar="SECONDS", help="seconds between continuous rounds (default 30)")
    sb.add_argument("--tracking", choices=["auto", "kernel", "scan"],
                    help="how --continuous finds changed blocks: kernel (tracefs block events, needs root), scan "
                         "(every round reads the whole source), auto (default: kernel where it can run)")
    sb.add_argument("--freeze", action="store_true",
                    help="freeze the source's mounted file systems (FIFREEZE) for the round (with --continuous: "
                         "the cutover round) until the receiver made it durable, instead of only syncing them; "
                         "always thawed")
    sb.add_argument("--freeze-timeout", type=seconds(0, 3600, low_open=True), metavar="SECONDS",
                    help="longest a --freeze may last before it is thawed and the round runs again under a new "
                         "one (default 60)")
    sb.add_argument("--dry-run", "-n", action="store_true",
                    help="print how many blocks a round would send (and their ranges; -v: every range); change "
                         "nothing on the target")
    sb.set_defaults(func=one_shot_stop(cmd_send_block))

    nc = sub.add_parser("netcheck", help="measure the link to a receiver; prints the 5.9.1 body")
    _receiver_flags(nc)
    nc.add_argument("--seconds", type=number(float), default=3.0, metavar="SECONDS", help="length of the bulk transfer (default 3)")
    nc.add_argument("--streams", type=stream_count, default="auto", metavar="N|auto",
                    help="also measure N connections at once (auto, the default: as many as a session would run "
                         "over on this link); stderr says what one and N got, migration_speed is the better")
    nc.set_defaults(func=cmd_netcheck)

    st = sub.add_parser("status", help="list a receiver's targets and running sessions")
    _receiver_flags(st)
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
                         "permissions, owner (as rsync's quick check), xattrs (ACLs, SELinux labels); all: both")
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
    ag.add_argument("--streams", type=stream_count, default="auto", metavar="N|auto",
                    help="TLS connections each data session runs over (1-16); auto (default): one on a LAN, "
                         "more the longer the round trip to the target")
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
