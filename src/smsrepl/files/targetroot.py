"""The target root and its directories, as the writer of a round sees them.

Directories are opened one component at a time relative to their parent's
descriptor with O_NOFOLLOW, so a symlink in the target (planted or left from an
old tree) is never followed by a write; the descriptors are cached (within the
process's descriptor budget, files.fdbudget). A directory about to change has
its times noted first (the round gives them back where it sets none). An entry
gets its final name by a rename from its temporary one (:meth:`TargetRoot._install`),
which makes way where a directory holds that name.
"""
from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict

from smsrepl import kernels
from smsrepl.errors import TargetWriteError
from smsrepl.files.fdbudget import DescriptorBudget, process_budget
from smsrepl.files.names import DIR_FLAGS, check_path, remove_tree

Parts = tuple[bytes, ...]


class TargetRoot:
    """The root (an O_NOFOLLOW descriptor) and a cache of its directories' descriptors."""

    def __init__(self, root: str | bytes, *, cache: int = 64) -> None:
        self.root = os.fsencode(root)
        try:
            self.root_fd = os.open(self.root, DIR_FLAGS)
        except OSError as exc:
            raise TargetWriteError(f"target root {os.fsdecode(self.root)!r}: {exc.strerror}") from None
        self._fds: OrderedDict[Parts, int] = OrderedDict()
        #: a descriptor of each file system under the root (a disk mounted in the tree) other than
        #: the root's, by device: a syncfs of the root's reaches none of them
        self.root_dev = os.fstat(self.root_fd).st_dev
        self.other_fs: dict[int, int] = {}
        #: directories new in this round made under a temporary name (files.durable), by their
        #: final parts: the name they have until they are renamed
        self._staged: dict[Parts, bytes] = {}
        self._cache = cache
        #: directories whose entries changed (made durable by finish()), with their times before
        #: the first change: a directory the round gives no metadata for gets them back
        self._touched: dict[Parts, tuple[int, int] | None] = {}
        #: descriptors of run files come from the process's budget, shared by its writers
        self._budget: DescriptorBudget | None = process_budget() if kernels.TREE else None
        #: what could not be recreated (device files without root, xattrs the file system refused)
        self.reported: list[str] = []

    def dir_fd(self, parts: Parts) -> int:
        """An O_NOFOLLOW descriptor of directory ``parts`` (which must exist as a real directory)."""
        if not parts:
            return self.root_fd
        fd = self._fds.get(parts)
        if fd is not None:
            self._fds.move_to_end(parts)
            return fd
        parent = self.dir_fd(parts[:-1])
        try:
            fd = os.open(self._staged.get(parts, parts[-1]), DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            what = "is a symlink or not a directory" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else exc.strerror
            raise TargetWriteError(f"target {self._show(parts)!r}: {what}") from None
        try:
            dev = os.fstat(fd).st_dev
            if dev != self.root_dev and dev not in self.other_fs:
                self.other_fs[dev] = os.dup(fd)
        except OSError:
            os.close(fd)
            raise
        self._fds[parts] = fd
        limit = self._cache if self._budget is None else min(self._cache, max(8, self._budget.share() // 8))
        while len(self._fds) > limit:
            old, ofd = self._fds.popitem(last=False)
            os.close(ofd)
        return fd

    def _touch(self, parts: Parts) -> None:
        """Directory ``parts`` is about to change: note its times first."""
        if parts in self._touched:
            return
        try:
            st = os.fstat(self.dir_fd(parts))
            self._touched[parts] = (st.st_atime_ns, st.st_mtime_ns)
        except (OSError, TargetWriteError):
            self._touched[parts] = None

    def _forget(self, parts: Parts) -> None:
        for key in [k for k in self._fds if k[:len(parts)] == parts]:
            os.close(self._fds.pop(key))

    def _show(self, parts: Parts) -> str:
        return os.fsdecode(b"/".join((self.root,) + tuple(parts)))


    def open_regular(self, path: bytes) -> int:
        """A read descriptor of the regular file at ``path`` under the root (never through a
        symlink), or -1 where there is none."""
        parts = check_path(path)
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=self.dir_fd(parts[:-1]))
        except OSError:
            return -1
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return -1
        return fd

    def _close_dirs(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for fd in self.other_fs.values():
            os.close(fd)
        self.other_fs.clear()

    def file_systems(self) -> list[int]:
        """A descriptor of every file system written under the root so far (the root's first)."""
        return [self.root_fd, *self.other_fs.values()]

    @staticmethod
    def _lstat(parts: Parts, parent: int) -> os.stat_result | None:
        try:
            return os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _remove(self, parts: Parts, parent: int, st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            self._forget(parts)
            remove_tree(parts[-1], parent)
        else:
            os.unlink(parts[-1], dir_fd=parent)

    def _install(self, tmp: bytes, parts: Parts, parent: int) -> None:
        self._touch(parts[:-1])
        try:
            os.rename(tmp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
            return
        except OSError as exc:
            if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise
        st = self._lstat(parts, parent)
        if st is not None and stat.S_ISDIR(st.st_mode):  # a directory gives way to a file or link
            self._remove(parts, parent, st)
        os.rename(tmp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)

