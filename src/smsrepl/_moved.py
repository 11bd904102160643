"""The import paths of modules that the layout of docs/ARCHITECTURE.md moved, kept working.

An agent written against an earlier release imports, say, ``smsrepl.ratelimit`` or
``smsrepl.continuous``; that import now gives the module's new home (``smsrepl.throttle``,
``smsrepl.replication.continuous``) with a DeprecationWarning naming it, instead of an
ImportError in the middle of a migration. Nothing in the package uses these names.

The names those modules offered stay, with these exceptions (functions no product path called,
removed with the layout): ``ratelimit.judge_over_speed``, ``parse_agent_time`` and
``OverSpeedVerdict`` (the control plane's own over-speed judgement), ``SpeedSchedule.from_file``,
``to_json``, ``next_change`` and ``seconds_until_change``, ``ProgressTracker.eta``, ``rate_bps``
and ``progress``, ``SessionStateMachine.event_for``.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED = {
    "smsrepl.certs": "smsrepl.lab.certs",
    "smsrepl.checkprogress": "smsrepl.control.checkprogress",
    "smsrepl.consistency": "smsrepl.control.consistency",
    "smsrepl.continuous": "smsrepl.replication.continuous",
    "smsrepl.demo": "smsrepl.lab.demo",
    "smsrepl.dryrun": "smsrepl.cli.dryrun",
    "smsrepl.flags": "smsrepl.cli.flags",
    "smsrepl.interrupt": "smsrepl.cli.interrupt",
    "smsrepl.lag": "smsrepl.replication.lag",
    "smsrepl.layout": "smsrepl.agent.layout",
    "smsrepl.logsetup": "smsrepl.cli.logsetup",
    "smsrepl.memory": "smsrepl.transport.memory",
    "smsrepl.netcheck": "smsrepl.transport.netcheck",
    "smsrepl.progress": "smsrepl.control.progress",
    "smsrepl.ratelimit": "smsrepl.throttle",
    "smsrepl.session": "smsrepl.replication.session",
    "smsrepl.state": "smsrepl.control.state",
    "smsrepl.summary": "smsrepl.cli.summary",
    "smsrepl.testdata": "smsrepl.lab.testdata",
    "smsrepl.verify": "smsrepl.blocks.imagecompare",
    "smsrepl.agent.fakecp": "smsrepl.lab.fakecp",
    "smsrepl.blocks.tracepage": "smsrepl._pure.trace",
}


class _Alias:  # a loader
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # a throw-away module: exec_module puts the real one in its place

    def exec_module(self, module: ModuleType) -> None:
        warnings.warn(f"{module.__name__} moved to {self.new}; import it from there",
                      DeprecationWarning, stacklevel=2)
        # the import machinery hands back what sys.modules holds under the old name
        sys.modules[module.__name__] = importlib.import_module(self.new)


class MovedModules:  # a meta path finder
    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        # _Alias is a Loader by its methods: importlib.abc (and typing for a cast) would cost
        # every command 25 ms of imports
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))  # type: ignore[arg-type]


def install() -> None:
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules())
