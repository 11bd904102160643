"""``smsrepl agent``: the reference agent loop against an API v3 control plane, its flags checked
before the first poll."""
from __future__ import annotations

import os

from smsrepl.errors import ConfigError
from smsrepl.cli.flags import state_home


def cmd_agent(args) -> int:
    from smsrepl.agent.client import ControlPlane
    from smsrepl.agent.loop import Agent
    from smsrepl.cli.interrupt import cutover_on_sigterm

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
    agent = Agent(cp, args.source_id, disks, args.state_dir or state_home("agent"), task_id=args.task_id,
                  data_port=args.data_port, poll_interval=args.poll_interval, sync_interval=args.sync_interval,
                  host=args.host, tree=args.tree, tree_target=args.tree_target, tracking=args.tracking,
                  freeze=args.freeze, freeze_timeout=args.freeze_timeout, streams=args.streams)

    cutover_on_sigterm(agent.request_cutover, agent.stop)
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
