"""The receiver's checks of its targets, made before anything is written to them.

- A target path that does not exist is refused: a typo such as ``/dev/vdx-typo`` must not
  become a regular file (under /dev that is RAM) that takes a disk's data and reports
  success. ``receive --create`` (``Receiver(create=True)``) creates missing image files and
  directories, for a lab; names below ``--root DIR`` are created as before (the root is the
  operator's explicit choice).
- A block device mounted or claimed by another program is refused (the O_EXCL open itself is
  BlockTarget's; here it is checked at start-up, so the receiver does not start).
- A session of the wrong kind for its target (``send files`` to an image file or device,
  ``send block`` to a directory) is the same configuration mistake both ways: exit 2, SMS.2013,
  the message naming the target, what it is and what the sender asked for.
- A name the receiver does not have is answered with the names it has (not their paths).
"""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping

from smsrepl.errors import ConfigError, RefusedError, TargetInUseError, TargetKindError, TargetMissingError

#: target names listed at most in a refusal of an unknown name
LIST_NAMES = 20

CREATE_HINT = "receive --create makes missing image files and directories, for a lab"


def kind_of(path: str) -> str | None:
    """'directory', 'block device', 'image file' or 'special file'; None where nothing is (a
    dangling symlink included: opening it would create the file it points to)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError:
        return "special file"  # unreadable: opening it says why
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISREG(mode):
        return "image file"
    return "special file"


def missing(name: str, path: str) -> TargetMissingError:
    return TargetMissingError(f"target {name!r} ({path}) does not exist; check the path ({CREATE_HINT})")


def check_at_start(targets: Mapping[str, str], *, create: bool) -> None:
    """Refuse to start with a target that does not exist (unless ``create``) or a block device
    another program holds: the operator sees a typo or a mounted disk at once, not a sender later."""
    for name, path in targets.items():
        kind = kind_of(path)
        if kind is None and not create:
            raise missing(name, path)
        if kind == "block device":
            check_not_in_use(name, path)
        if kind == "image file":
            check_no_loop_device(name, path)
        if kind == "directory" and os.path.islink(path):
            # a file session opens its root with O_NOFOLLOW, as every directory in it: each one
            # would fail, and a sender would retry what can never work
            raise TargetKindError(f"target {name!r} ({path}) is a symlink to a directory; give the directory "
                                  f"itself ({os.path.realpath(path)}): the receiver follows no symlink in a tree target")
    check_distinct(targets)


def check_distinct(targets: Mapping[str, str]) -> None:
    """ConfigError when two target names are one file, device or directory (by path, symlinks
    resolved, or by inode), or one target lies inside a directory target: sessions of the two
    would write the same data at once (and a file round's deletions remove what the other
    wrote), each reporting success."""
    seen: dict[tuple, str] = {}
    dirs: list[tuple[str, str]] = []
    reals = {name: os.path.realpath(path) for name, path in targets.items()}
    for name, path in targets.items():
        keys: list[tuple] = [("path", reals[name])]
        try:
            st = os.stat(path)
            keys.append(("device", st.st_rdev) if stat.S_ISBLK(st.st_mode) else ("inode", st.st_dev, st.st_ino))
            if stat.S_ISDIR(st.st_mode):
                dirs.append((name, reals[name].rstrip("/") + "/"))
        except OSError:
            pass  # made by --create: its path says it all
        for key in keys:
            if key in seen:
                raise ConfigError(f"targets {seen[key]!r} and {name!r} are the same {kind_of(path) or 'path'} "
                                  f"({path}): sessions of both would write it at once; give each target its own")
            seen[key] = name
    for name, path in targets.items():
        for dname, below in dirs:
            if dname != name and reals[name].startswith(below):
                raise ConfigError(f"target {name!r} ({path}) lies inside target {dname!r} ({targets[dname]}): "
                                  f"a file session of {dname!r} would write or delete it; give targets that do "
                                  f"not overlap")


def check_not_in_use(name: str, path: str) -> None:
    """TargetInUseError when the kernel refuses an exclusive open of the device (EBUSY: mounted,
    a member of an array or a mapping, or opened O_EXCL by another program). Other failures
    are left to the session that opens it, which names them."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise in_use(name, path) from None
        return
    os.close(fd)


def check_no_loop_device(name: str, path: str) -> None:
    """TargetInUseError when an image file backs a loop device: writing it would change that
    device (and a file system mounted from it) under the kernel."""
    from smsrepl.blocks.loops import loop_devices_of

    loops = [f"/dev/{n}" for n, _ in loop_devices_of(path)]
    if loops:
        raise TargetInUseError(f"target {name!r} ({path}) is the backing file of {', '.join(loops)}: writing it "
                               f"would change that disk under whatever uses it; detach it first (losetup -d "
                               f"{loops[0]}); nothing was written")


def in_use(name: str, path: str) -> TargetInUseError:
    return TargetInUseError(f"target {name!r} ({path}) is in use (mounted or held by another program); "
                            f"nothing was written")


def check_kind(name: str, path: str, session: str) -> None:
    """TargetKindError when the existing ``path`` is of the wrong kind for a ``session`` of kind
    'files', 'block' or 'verify' (a block consistency check)."""
    kind = kind_of(path)
    if session == "files" and kind in ("image file", "block device"):
        raise TargetKindError(f"target {name!r} is {_a(kind)} ({path}), not a directory: `send files` and "
                              f"`verify files` need one; use `send block` or `verify block`")
    if session in ("block", "verify") and kind == "directory":
        verb = "send" if session == "block" else "verify"
        raise TargetKindError(f"target {name!r} is a directory ({path}), not an image file or block device: "
                              f"`{verb} block` needs one; use `{verb} files`")


def unknown(name: str, targets: Mapping[str, str]) -> RefusedError:
    """The refusal of a target name the receiver was not given, listing the names it was."""
    names = sorted(targets)
    if not names:  # --root: any valid name below it
        return RefusedError(f"no target named {name!r}: its targets are the names below its --root "
                            f"(letters, digits, '.', '_' and '-')", code=TargetMissingError.code)
    shown = ", ".join(names[:LIST_NAMES]) + (f" and {len(names) - LIST_NAMES} more" if len(names) > LIST_NAMES else "")
    return RefusedError(f"no target named {name!r}; its targets are: {shown}", code=TargetMissingError.code)


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind
