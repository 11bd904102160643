"""Fault injection for the fault-matrix tests, off unless ``SMSREPL_FAULTS`` is set.

``SMSREPL_FAULTS`` is a comma-separated list of faults, read once at import:

* ``kill@POINT`` or ``kill@POINT:N``: the process kills itself with SIGKILL the
  N-th time (default the first) it passes POINT, e.g. ``receiver.checkpoint``.
* ``stop@POINT``: the process stops itself (SIGSTOP) there, for a test to look at the
  world in that state (say, a frozen file system) before it sends SIGCONT.
* ``ERRNO@IO:OFFSET``: every ``IO`` (``source.read``, ``target.write``) that touches
  bytes at or past OFFSET fails with that errno (``eio``, ``enospc``, ...), as a
  failing disk would.

Like DRBD's fault injection, the hooks live in the product so that tests exercise the
real code paths in real processes; unset, each hook is one dictionary lookup.
"""
from __future__ import annotations

import errno
import os
import signal

_KILLS: dict[str, int] = {}
_STOPS: set[str] = set()
_IO: dict[str, tuple[int, int]] = {}


def configure(spec: str) -> None:
    """Replace the active faults with ``spec`` (the ``SMSREPL_FAULTS`` syntax)."""
    _KILLS.clear()
    _STOPS.clear()
    _IO.clear()
    for item in filter(None, (p.strip() for p in spec.split(","))):
        what, _, where = item.partition("@")
        name, _, arg = where.partition(":")
        if not name:
            raise ValueError(f"SMSREPL_FAULTS item {item!r}: expected WHAT@POINT[:ARG]")
        code = getattr(errno, what.upper(), None)
        if what == "stop" and not arg:
            _STOPS.add(name)
            continue
        if (what != "kill" and (code is None or not arg)) or (arg and not arg.isdigit()):
            raise ValueError(f"SMSREPL_FAULTS item {item!r}: expected kill@POINT[:N], stop@POINT or ERRNO@IO:OFFSET")
        if what == "kill":
            _KILLS[name] = int(arg or 1)
        else:
            assert code is not None
            _IO[name] = (code, int(arg))


def point(name: str) -> None:
    """A place where a ``kill@`` fault may end the process (or a ``stop@`` one pause it)."""
    if name in _STOPS:
        os.kill(os.getpid(), signal.SIGSTOP)
    if name in _KILLS:
        _KILLS[name] -= 1
        if _KILLS[name] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)


def io(name: str, offset: int, length: int) -> None:
    """Raise the configured OSError if this I/O touches the failing region."""
    fault = _IO.get(name)
    if fault is not None and offset + length > fault[1]:
        raise OSError(fault[0], os.strerror(fault[0]))


configure(os.environ.get("SMSREPL_FAULTS", ""))
