"""Path rules of a file-level migration, from the 5.10.1 configuration body.

Keys (both spellings the service uses)::

    EXCLUDE_MIGRATE_PATH, MIGRATE_EXCLUDE_PATH, MIGRATE_EXCLUDE_DIR   not copied, ever
    SYNC_EXCLUDE_PATH, SYNC_EXCLUDE_DIR                                not copied by sync rounds
    ONLY_SYNC_PATH, ONLY_SYNC_DIR                                      sync rounds copy only these
    CONSISTENCY_DIR                                                    directories the check covers
    LINUX_CPU_LIMIT                                                    CPU cap (throttle.cpucap.CpuCap)

A ``config_value`` is a comma-separated list of absolute paths or shell globs
on the source machine: ``*``, ``?`` and ``[...]`` match within one path
component, ``**`` matches any number of components. A pattern names an entry
and everything under it.

Where a rule meets a source directory SRC_DIR (:meth:`PathRules.anchored`), a
pattern whose leading components name SRC_DIR's absolute path (as
``os.path.realpath`` resolves it, or as given; ``*``, ``?`` and ``[...]`` may
stand for one of those components, ``**`` may not) is that host path:
``/srv/cache`` with SRC_DIR ``/srv`` is ``cache`` under SRC_DIR. Every other
pattern is taken relative to SRC_DIR, which stands for the source machine's
``/``: ``/cache`` with SRC_DIR ``/srv`` is ``/srv/cache`` too. A rule naming
SRC_DIR itself is the whole tree for ONLY_SYNC and CONSISTENCY_DIR keys and a
configuration error for the exclude keys (it would exclude everything). With
SRC_DIR ``/`` nothing changes. A pattern naming a directory above SRC_DIR
(``/srv`` with SRC_DIR ``/srv/www``) stays relative: it then most likely
matches nothing, and is reported. A pattern keeps its text and its key, for
messages; ``Pattern.relative`` is the path it stands for under SRC_DIR.

A round's filter (:class:`RoundFilter`) notes which patterns covered an entry
it was asked about; :meth:`RoundFilter.unmatched` lists the others after a walk
of the whole tree (a rule that matches nothing is most often a typo, or a path
meant for another SRC_DIR). An exclude pattern below an excluded directory
counts as matched: the walk never looks there, and the rule is moot anyway.

What migration excludes, sync rounds exclude too (a sync must not bring in
what the copy left out), and a sync round never deletes on the target under
an excluded path.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from smsrepl.errors import ConfigError

TYPE_CHECKING = False  # typing itself is not imported at run time (a check starts in a moment)
if TYPE_CHECKING:
    from typing import Any

MIGRATE_EXCLUDE = ("EXCLUDE_MIGRATE_PATH", "MIGRATE_EXCLUDE_PATH", "MIGRATE_EXCLUDE_DIR")
SYNC_EXCLUDE = ("SYNC_EXCLUDE_PATH", "SYNC_EXCLUDE_DIR")
ONLY_SYNC = ("ONLY_SYNC_PATH", "ONLY_SYNC_DIR")
CONSISTENCY = ("CONSISTENCY_DIR",)
CPU_LIMIT = "LINUX_CPU_LIMIT"


#: the fields of a 5.10.1 ConfigBody (config_status: reserved, unused)
ITEM_FIELDS = ("config_key", "config_value", "config_status")


def parse_configuration_body(raw: bytes, source: str) -> dict:
    """The bytes of a 5.10.1 body, ``{"configurations": [...]}``, as a dict (items unchecked)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{source} is not valid JSON: {exc}") from None
    items = body.get("configurations") if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise ConfigError(f"{source}: expected {{\"configurations\": [...]}} (5.10.1)")
    for key in body:
        if key != "configurations":
            raise ConfigError(f"{source}: unknown field {key!r} (5.10.1 has only \"configurations\")")
    for i, item in enumerate(items):
        for key in item if isinstance(item, dict) else ():
            if key not in ITEM_FIELDS:
                raise ConfigError(f"{source} configurations[{i}]: unknown field {key!r} "
                                  f"(known: {', '.join(ITEM_FIELDS)})")
    return body
KEYS = frozenset(MIGRATE_EXCLUDE + SYNC_EXCLUDE + ONLY_SYNC + CONSISTENCY + (CPU_LIMIT,))
#: the reference's limit on config_value
MAX_VALUE = 1024
_GLOB = b"**"


@dataclass(frozen=True)
class Pattern:
    """One absolute path or glob, as components (bytes: file names need not be UTF-8);
    ``parts`` are relative to the source directory (none: the whole tree), ``text`` and
    ``key`` are what the configuration said."""

    text: str
    parts: tuple[bytes, ...]
    key: str = field(default="", compare=False)

    @property
    def relative(self) -> str:
        """The path or glob the pattern stands for under the source directory, as an absolute
        path (``/`` for the whole tree)."""
        return "/" + os.fsdecode(b"/".join(self.parts))

    @classmethod
    def parse(cls, text: str, where: str, key: str = "") -> "Pattern":
        if not text.startswith("/"):
            raise ConfigError(f"{where}: {text!r} is not an absolute path")
        if "\x00" in text:
            raise ConfigError(f"{where}: {text!r} contains a NUL byte")
        try:
            raw = os.fsencode(text)
        except UnicodeEncodeError:
            raise ConfigError(f"{where}: {text!r} is not valid Unicode (a lone surrogate)") from None
        parts = tuple(p for p in raw.split(b"/") if p and p != b".")
        if b".." in parts:
            raise ConfigError(f"{where}: {text!r} contains '..'")
        if not parts:
            raise ConfigError(f"{where}: {text!r} names the whole tree ('/'); leave the key out instead")
        return cls(text, parts, key)

    def covers(self, path: Sequence[bytes]) -> bool:
        """The pattern names ``path`` or one of its ancestors."""
        return _match(self.parts, tuple(path), prefix_of_path=True)

    def may_be_below(self, path: Sequence[bytes]) -> bool:
        """Something under directory ``path`` could be named by the pattern."""
        return _match(self.parts, tuple(path), prefix_of_pattern=True)


def _match(pat: tuple[bytes, ...], path: tuple[bytes, ...], *, prefix_of_path: bool = False,
           prefix_of_pattern: bool = False) -> bool:
    """Component-wise glob match. ``prefix_of_path``: the pattern may match a leading part of
    the path (an ancestor); ``prefix_of_pattern``: the path may match a leading part of the pattern."""
    if not pat:
        return not path or prefix_of_path
    if not path:
        return prefix_of_pattern or all(p == _GLOB for p in pat)
    head = pat[0]
    if head == _GLOB:
        # ** takes no component, or one more
        return (_match(pat[1:], path, prefix_of_path=prefix_of_path, prefix_of_pattern=prefix_of_pattern)
                or _match(pat, path[1:], prefix_of_path=prefix_of_path, prefix_of_pattern=prefix_of_pattern))
    if not fnmatchcase(path[0], head):
        return False
    return _match(pat[1:], path[1:], prefix_of_path=prefix_of_path, prefix_of_pattern=prefix_of_pattern)


@dataclass(frozen=True)
class PathRules:
    migrate_exclude: tuple[Pattern, ...] = ()
    sync_exclude: tuple[Pattern, ...] = ()
    only_sync: tuple[Pattern, ...] = ()
    consistency_dirs: tuple[Pattern, ...] = ()
    cpu_limit: Any = None
    #: the keys that were given, for messages
    given: frozenset = field(default=frozenset())

    @classmethod
    def from_configurations(cls, body: Any, *, source: str = "configuration") -> "PathRules":
        """Parse and check a 5.10.1 body ``{"configurations": [{"config_key", "config_value"}]}``."""
        items = body.get("configurations") if isinstance(body, Mapping) else None
        if not isinstance(items, list):
            raise ConfigError(f"{source}: expected {{\"configurations\": [...]}} (5.10.1)")
        lists: dict[str, list[Pattern]] = {"m": [], "s": [], "o": [], "c": []}
        cpu = None
        given = set()
        for i, item in enumerate(items):
            where = f"{source} configurations[{i}]"
            if not isinstance(item, Mapping):
                raise ConfigError(f"{where}: expected an object with config_key and config_value")
            key, value = item.get("config_key"), item.get("config_value")
            if not isinstance(key, str) or key.strip() not in KEYS:
                raise ConfigError(f"{where}: unknown config_key {key!r} (known: {', '.join(sorted(KEYS))})")
            key = key.strip()  # the reference's own examples write " EXCLUDE_MIGRATE_PATH"
            given.add(key)
            where = f"{where} ({key})"
            if key == CPU_LIMIT:
                from smsrepl.throttle import CpuCap

                try:
                    CpuCap(value)
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"{where}: {exc}") from None
                cpu = value
                continue
            if not isinstance(value, str):
                raise ConfigError(f"{where}: config_value must be a string of comma-separated paths, "
                                  f"got {type(value).__name__}")
            if len(value) > MAX_VALUE:
                raise ConfigError(f"{where}: config_value is {len(value)} characters, at most {MAX_VALUE}")
            slot = "m" if key in MIGRATE_EXCLUDE else "s" if key in SYNC_EXCLUDE else "o" if key in ONLY_SYNC else "c"
            for text in (t.strip() for t in value.split(",")):
                if text:
                    lists[slot].append(Pattern.parse(text, where, key))
        return cls(tuple(lists["m"]), tuple(lists["s"]), tuple(lists["o"]), tuple(lists["c"]), cpu, frozenset(given))

    def anchored(self, source_dir: str | bytes) -> "PathRules":
        """These rules as they apply to a tree rooted at ``source_dir`` (see the module's
        docstring): patterns naming a host path under it are made relative to it. Taken from
        each pattern's text: anchoring again, or to another directory, gives the same as once."""
        roots = _root_parts(source_dir)
        if not roots[0]:
            return self

        def anchor(p: Pattern, whole_ok: bool) -> Pattern:
            parts = Pattern.parse(p.text, p.key or "rule", p.key).parts
            for root in roots:
                if len(parts) >= len(root) and all(c != _GLOB and fnmatchcase(r, c) for r, c in zip(root, parts)):
                    if len(parts) == len(root) and not whole_ok:
                        raise ConfigError(f"{p.key or 'exclude rule'} {p.text!r} names the source directory "
                                          f"{os.fsdecode(b'/' + b'/'.join(roots[0]))} itself: it would exclude "
                                          f"everything (leave it out, or name a path below it)")
                    return dataclasses.replace(p, parts=parts[len(root):])
            return dataclasses.replace(p, parts=parts)

        return dataclasses.replace(
            self, migrate_exclude=tuple(anchor(p, False) for p in self.migrate_exclude),
            sync_exclude=tuple(anchor(p, False) for p in self.sync_exclude),
            only_sync=tuple(anchor(p, True) for p in self.only_sync),
            consistency_dirs=tuple(anchor(p, True) for p in self.consistency_dirs))

    def for_round(self, kind: str) -> "RoundFilter":
        """What a round of ``kind`` ("full" or "sync") copies and may delete."""
        if kind == "full":
            return RoundFilter(self.migrate_exclude, ())
        if kind == "sync":
            return RoundFilter(self.migrate_exclude + self.sync_exclude, self.only_sync)
        raise ValueError(f"round kind must be 'full' or 'sync', not {kind!r}")


def _root_parts(source_dir: str | bytes) -> list[tuple[bytes, ...]]:
    """The components of ``source_dir``'s absolute path: as the kernel resolves it, then (if
    other) as given; a host path may name it either way."""
    given = os.path.abspath(os.fsencode(source_dir))
    found = []
    for path in (os.path.realpath(given), given):
        parts = tuple(c for c in path.split(b"/") if c)
        if parts not in found:
            found.append(parts)
    return found


@dataclass(frozen=True)
class RoundFilter:
    exclude: tuple[Pattern, ...]
    only: tuple[Pattern, ...]  # empty: everything not excluded
    #: indexes into exclude + only of the patterns that covered an entry asked about
    _hits: set = field(default_factory=set, init=False, compare=False, repr=False)
    #: (index, pattern) of the exclude and of the only patterns not in _hits yet: all that is
    #: tried again after one pattern covered an entry (the first that covers decides)
    _unhit: list = field(default_factory=list, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._unhit[:] = [list(enumerate(self.exclude)), list(enumerate(self.only, len(self.exclude)))]

    def _note(self, which: int, test) -> None:
        """Note the patterns of list ``which`` (0: exclude, 1: only) not noted yet that pass ``test``."""
        left = []
        for i, p in self._unhit[which]:
            if test(p):
                self._hits.add(i)
            else:
                left.append((i, p))
        self._unhit[which] = left

    def includes(self, path: Sequence[bytes]) -> bool:
        """The entry at ``path`` (components from the tree's root) takes part in the round."""
        for p in self.exclude:
            if p.covers(path):
                if self._unhit[0]:
                    self._note(0, lambda q: q.covers(path))
                return False
        if not self.only:
            return True
        for p in self.only:
            if p.covers(path):
                if self._unhit[1]:
                    self._note(1, lambda q: q.covers(path))
                return True
        return False

    def descend(self, path: Sequence[bytes]) -> bool:
        """Directory ``path`` must be walked: it or something below it may take part."""
        for p in self.exclude:
            if p.covers(path):
                if self._unhit[0]:  # what is below it is never looked at: moot, not unmatched
                    self._note(0, lambda q: q.covers(path) or q.may_be_below(path))
                return False
        return not self.only or any(p.covers(path) or p.may_be_below(path) for p in self.only)

    def unmatched(self) -> list[tuple[str, str]]:
        """(config key, rule text) of the patterns that covered none of the entries asked
        about, in the configuration's order, each once."""
        out: list[tuple[str, str]] = []
        for i, p in enumerate(self.exclude + self.only):
            if i not in self._hits and (p.key, p.text) not in out:
                out.append((p.key, p.text))
        return out


def unmatched_note(key: str, rule: str, source: str | bytes) -> str:
    """The human line about a rule that matched nothing under ``source``."""
    return f"{key} {rule!r} matched nothing under {os.fsdecode(source)}"
