"""The target-side endpoint: accepts TLS sessions and applies them to configured targets only.

``Receiver`` is the public face: it checks its configuration (targets, limits) before anything
listens, and is the endpoint server (server.py) that serves them; ``RootTargets`` is
``receive --root DIR``.
"""
from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterator, Mapping

from smsrepl.durable import private_makedirs
from smsrepl.errors import ConfigError
from smsrepl.transport import targets as target_checks
from smsrepl.transport.connect import TARGET_NAME, check_target_name
from smsrepl.transport.limits import (CHECKPOINT_SECONDS, CONNECT_RATE, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT,
                                      MAX_CONNECTIONS, MAX_UNAUTHENTICATED, MAX_WAITING)
from smsrepl.transport.server import EndpointServer
from smsrepl.transport.session import SessionOutcome
from smsrepl.transport.status import describe


class RootTargets(Mapping[str, str]):
    """``receive --root DIR``: every valid target name is DIR/NAME (an image file for block
    sessions, a directory for file sessions), and nothing outside DIR."""

    def __init__(self, root: str) -> None:
        if not os.path.isdir(root):
            raise ConfigError(f"--root {root!r} is not a directory")
        self.root = os.path.abspath(root)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(TARGET_NAME.match(name)) and name not in (".", "..")

    def __getitem__(self, name: str) -> str:
        if name not in self:
            raise KeyError(name)
        return os.path.join(self.root, name)

    def __iter__(self) -> Iterator[str]:
        return iter(())  # open-ended: names are not listed

    def __len__(self) -> int:
        return 0


class Receiver(EndpointServer):
    """Serves sessions, one per target at a time, writing only to ``targets``."""

    def __init__(
        self,
        targets: dict[str, str] | RootTargets,
        context: ssl.SSLContext,
        state_dir: str,
        *,
        on_session: Callable[[SessionOutcome], None] | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        max_unauthenticated: int = MAX_UNAUTHENTICATED,
        max_waiting: int = MAX_WAITING,
        connect_rate: float = CONNECT_RATE,
        create: bool = False,
    ) -> None:
        """``create``: a target path that does not exist is created (an image file sized to the
        source, or a directory) instead of refused; names below a RootTargets are created either way."""
        for what, value in (("idle timeout", idle_timeout), ("handshake timeout", handshake_timeout)):
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ConfigError(f"{what} {value!r} s must be a positive number of seconds")
        for what, value in (("connection limit", max_connections), ("unauthenticated connection limit",
                                                                     max_unauthenticated),
                            ("waiting connection limit", max_waiting)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{what} {value!r} must be a whole number of at least 1")
        if not 0 < checkpoint_seconds <= 60:
            raise ConfigError(f"checkpoint interval {checkpoint_seconds} s is outside 0-60 s")
        checked: Mapping[str, str]
        if isinstance(targets, RootTargets):
            checked = targets
        elif not targets:
            raise ConfigError("the receiver needs at least one --target NAME=PATH, or --root DIR")
        else:
            checked = {check_target_name(n): os.path.abspath(p) for n, p in targets.items()}
            target_checks.check_at_start(checked, create=create)
        state_dir = os.path.abspath(state_dir)
        private_makedirs(state_dir)
        if not (isinstance(connect_rate, (int, float)) and 0 < connect_rate < float("inf")):
            raise ConfigError(f"connection rate {connect_rate!r} a second must be a positive number")
        super().__init__(checked, context, state_dir, create=create or isinstance(checked, RootTargets),
                         on_session=on_session, idle_timeout=idle_timeout, checkpoint_seconds=checkpoint_seconds,
                         handshake_timeout=handshake_timeout, max_connections=max_connections,
                         max_unauthenticated=max_unauthenticated, max_waiting=max_waiting,
                         connect_rate=connect_rate)

    def status(self) -> tuple[list, list]:
        """(targets, sessions) as a STATUS frame carries them (transport/status.py)."""
        root = self.targets.root if isinstance(self.targets, RootTargets) else None
        return describe(self.targets, self.claims.holders(), self.state_dir, root)
