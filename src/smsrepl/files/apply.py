"""Apply tree entries under a target root: atomically, and never outside it.

Every name is checked (files.names) and every directory opened without following
a symlink (files.targetroot). A file's data goes to a temporary name in its
directory, gets its owner, mode, xattrs and times, and is renamed onto its final
name only once durable (files.durable): a half-written file never appears under
that name. Directory times are set last (adding entries changes them), by
:meth:`TreeWriter.finish`.
"""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable

import xxhash

from smsrepl import kernels
from smsrepl._lazy import np
from smsrepl.errors import DecompressionError, RemoteProtocolError, TargetWriteError
from smsrepl.files.durable import PendingFiles
from smsrepl.files.names import check_path, temp_name, unlink_quiet
from smsrepl.files.scan import KINDS as KIND_OF, Entry
from smsrepl.files.targetroot import Parts

#: hole granularity when writing sparse files
SPARSE_BLOCK = 4096
_ZERO_BLOCK = bytes(SPARSE_BLOCK)


class TreeWriter(PendingFiles):
    """Writes entries under a target root (see the module's docstring); ``fsync``: made durable
    before they are named (off only where nothing needs it: a test's scratch tree)."""

    def __init__(self, root: str | bytes, *, preserve_owner: bool | None = None, fsync: bool = True,
                 cache: int = 64) -> None:
        super().__init__(root, preserve_owner=os.geteuid() == 0 if preserve_owner is None else preserve_owner,
                         fsync=fsync, cache=cache)
        self._dirs: list[tuple[Parts, Entry]] = []

    def __enter__(self) -> "TreeWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- entries ---------------------------------------------------------------
    def existing(self, path: bytes) -> os.stat_result | None:
        parts = check_path(path)
        self.settle_staged(parts)
        try:
            return os.stat(parts[-1], dir_fd=self.dir_fd(parts[:-1]), follow_symlinks=False)
        except FileNotFoundError:
            return None

    def mkdir(self, entry: Entry) -> None:
        """Create directory ``entry`` (or keep it); its metadata is set by finish()."""
        parts = check_path(entry.path)
        if parts not in self._staged:  # else made earlier in the round, under a temporary name
            parent = self.dir_fd(parts[:-1])
            st = self._lstat(parts, parent)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                self._touch(parts[:-1])
                self._remove(parts, parent, st)
                st = None
            if st is None:
                self._touch(parts[:-1])
                if not self.stage_dir(parts, parent):
                    os.mkdir(parts[-1], 0o700, dir_fd=parent)
        self._dirs.append((parts, entry))

    def write_file(self, entry: Entry, chunks: Iterable[bytes | memoryview], *, sparse: bool = True) -> None:
        """Write a regular file from its data, in order; atomically replaces what is there."""
        sink = self.open_file(entry, sparse=sparse)
        try:
            for chunk in chunks:
                sink.write(chunk)
        except BaseException:
            sink.abort()
            raise
        sink.commit()

    def write_small(self, entry: Entry, data) -> None:
        """write_file() for a whole file in one buffer, without a FileSink: the common case
        of many small files, where per-file overhead is what counts."""
        parts = check_path(entry.path)
        self.settle_staged(parts)
        parent = self.dir_fd(parts[:-1])
        self._touch(parts[:-1])  # before its temporary name changes the directory's times
        tmp = temp_name(parts[-1])
        if len(data) != entry.size:
            raise RemoteProtocolError(f"{os.fsdecode(entry.path)!r}: got {len(data)} bytes, "
                                      f"the entry says {entry.size}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
        try:
            if self._write_data(fd, data, 0, True):
                os.ftruncate(fd, len(data))  # a file ending in a hole
            self._set_meta_fd(fd, entry, new=True)
        except BaseException:
            os.close(fd)
            unlink_quiet(tmp, parent)
            raise
        os.close(fd)
        if self.fsync:
            self._defer(tmp, parts, len(data))
        else:
            self._install(tmp, parts, parent)

    def open_file(self, entry: Entry, *, sparse: bool = True, digest: bool = False) -> "FileSink":
        """Start writing regular file ``entry`` under a temporary name (see FileSink); with
        ``digest``, commit() can check the data against an XXH3-128."""
        parts = check_path(entry.path)
        self.settle_staged(parts)
        parent = self.dir_fd(parts[:-1])
        self._touch(parts[:-1])  # before its temporary name changes the directory's times
        tmp = temp_name(parts[-1])
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
        return FileSink(self, entry, parts, parent, tmp, fd, sparse, digest)

    def symlink(self, entry: Entry) -> None:
        parts = check_path(entry.path)
        self.settle_staged(parts)
        parent = self.dir_fd(parts[:-1])
        self._touch(parts[:-1])  # before its temporary name changes the directory's times
        tmp = temp_name(parts[-1])
        os.symlink(entry.link or b"", tmp, dir_fd=parent)
        try:
            if self.preserve_owner:
                os.chown(tmp, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
            if entry.xattrs:  # a symlink's own: its SELinux label, say
                self._set_xattrs(_in_dir(parent, tmp), entry)
            os.utime(tmp, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent, follow_symlinks=False)
        except BaseException:
            unlink_quiet(tmp, parent)
            raise
        self._install(tmp, parts, parent)

    def hardlink(self, entry: Entry, to: bytes) -> None:
        """Make ``entry`` another name of the already applied ``to``."""
        parts, target = check_path(entry.path), check_path(to)
        self.settle_staged(parts)
        if to in self._pending_paths:
            self.flush_pending()  # ``to`` still waits under its temporary name
        parent = self.dir_fd(parts[:-1])
        tdir = self.dir_fd(target[:-1])
        have = self._lstat(parts, parent)
        if have is not None:
            other = os.stat(target[-1], dir_fd=tdir, follow_symlinks=False)
            if (have.st_dev, have.st_ino) == (other.st_dev, other.st_ino):
                return
        self._touch(parts[:-1])  # before its temporary name changes the directory's times
        tmp = temp_name(parts[-1])
        os.link(target[-1], tmp, src_dir_fd=tdir, dst_dir_fd=parent, follow_symlinks=False)
        self._install(tmp, parts, parent)

    def special(self, entry: Entry) -> bool:
        """A FIFO, socket or device node; False (and reported) where it cannot be made."""
        parts = check_path(entry.path)
        parent = self.dir_fd(parts[:-1])
        self.settle_staged(parts)
        kind = {"fifo": stat.S_IFIFO, "chardev": stat.S_IFCHR, "blockdev": stat.S_IFBLK, "socket": stat.S_IFSOCK}
        if entry.kind in ("chardev", "blockdev") and os.geteuid() != 0:
            self.reported.append(f"{os.fsdecode(entry.path)}: device file not recreated (needs root)")
            return False
        self._touch(parts[:-1])  # before its temporary name changes the directory's times
        tmp = temp_name(parts[-1])
        os.mknod(tmp, 0o600 | kind[entry.kind], entry.rdev, dir_fd=parent)
        try:
            self._set_meta_path(tmp, parent, entry)
        except BaseException:
            unlink_quiet(tmp, parent)
            raise
        self._install(tmp, parts, parent)
        return True

    def set_meta(self, entry: Entry) -> None:
        """Bring an existing entry's owner, mode, xattrs and times to ``entry``'s (data untouched).

        The entry there must be of the same kind (RemoteProtocolError otherwise): a
        mode meant for a FIFO must never reach a file through a symlink, nor an
        open() meant for a file block on a FIFO."""
        parts = check_path(entry.path)
        self.settle_staged(parts)
        if entry.path in self._pending_paths:
            self.flush_pending()
        parent = self.dir_fd(parts[:-1])
        st = self._lstat(parts, parent)
        if st is None:
            return
        if KIND_OF.get(stat.S_IFMT(st.st_mode)) != entry.kind:
            raise RemoteProtocolError(f"metadata for a {entry.kind} at {os.fsdecode(entry.path)!r}, "
                                      f"which is a {KIND_OF.get(stat.S_IFMT(st.st_mode), 'unknown')} here")
        if entry.kind == "symlink":
            if self.preserve_owner:
                os.chown(parts[-1], entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
            self._set_xattrs(_in_dir(parent, parts[-1]), entry)
            os.utime(parts[-1], ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent, follow_symlinks=False)
        elif entry.kind == "dir":
            self._dirs.append((parts, entry))
        elif entry.kind == "file":
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
            except PermissionError:  # mode 000 and not root: what can be set without data access
                self._set_meta_path(parts[-1], parent, entry)
                return
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise RemoteProtocolError(f"{os.fsdecode(entry.path)!r} changed kind while being updated")
                self._set_meta_fd(fd, entry)
            finally:
                os.close(fd)
        else:
            self._set_meta_path(parts[-1], parent, entry)

    def set_root_meta(self, entry: Entry) -> None:
        """The target root takes the source root's metadata (at finish())."""
        self._dirs.append(((), entry))

    def readlink(self, path: bytes) -> bytes:
        parts = check_path(path)
        self.settle_staged(parts)
        return os.readlink(parts[-1], dir_fd=self.dir_fd(parts[:-1]))

    def delete(self, path: bytes, *, recursive: bool = False) -> None:
        """Remove an entry; symlinks are removed, not followed. A directory goes only when empty
        (what is left in it, such as excluded entries, keeps it), or with everything in it when
        ``recursive``. An entry whose parent is already gone is gone."""
        parts = check_path(path)
        self.settle_staged(parts)
        self.flush_pending()
        try:
            parent = self.dir_fd(parts[:-1])
        except TargetWriteError:
            return  # a parent removed or replaced by a file earlier in the round
        st = self._lstat(parts, parent)
        if st is None:
            return
        self._touch(parts[:-1])
        if stat.S_ISDIR(st.st_mode) and not recursive:
            self._forget(parts)
            try:
                os.rmdir(parts[-1], dir_fd=parent)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                return
        else:
            self._remove(parts, parent, st)

    def finish(self) -> None:
        """Set the metadata of the directories created or touched, deepest first, and make
        every rename, link and removal durable (fsync of the directories they changed)."""
        self.close_stages()
        self.flush_pending()
        given = self._set_dirs_meta(times=True)
        self._dirs.clear()
        for parts, times in self._touched.items():
            if times is not None and parts not in given:
                try:
                    os.utime(self.dir_fd(parts), ns=times)
                except (OSError, TargetWriteError):
                    pass  # removed later in the round
        self._sync_dirs()

    def keep_cut(self) -> None:
        """A round cut short: the files received whole keep their names, with the new
        directories holding them, and those directories get their owner, mode and xattrs
        (made 0700, they would keep that until a round covers them again), not their times:
        what they hold is not all there, and the next round that covers them sets those."""
        self.close_stages()
        self.flush_pending()
        self._set_dirs_meta(times=False)
        self._dirs.clear()

    def _set_dirs_meta(self, *, times: bool) -> set[Parts]:
        """The metadata of the directories of the round's DIR entries, deepest first; the
        ones given it."""
        given = set()
        for parts, entry in sorted(self._dirs, key=lambda d: len(d[0]), reverse=True):
            try:
                fd = self.dir_fd(parts)
            except TargetWriteError:
                continue  # a later entry of the round replaced it (a file where the directory was)
            self._set_meta_fd(fd, entry, times=times)
            given.add(parts)
        return given

    # --- helpers ---------------------------------------------------------------
    @staticmethod
    def _write_data(fd: int, chunk, pos: int, sparse: bool) -> bool:
        """Write ``chunk`` at ``pos``, all-zero blocks skipped when ``sparse``; True if its end was skipped."""
        view = memoryview(chunk).cast("B")
        runs = [(0, len(view))]
        # bytes: a C-speed search rules out zero blocks without numpy's per-call cost (small files)
        if sparse and len(view) >= SPARSE_BLOCK and (not isinstance(chunk, bytes) or _ZERO_BLOCK in chunk):
            # all-zero 4 KiB blocks stay holes, as rsync --sparse keeps them
            zero = np.empty(-(-len(view) // SPARSE_BLOCK), dtype=np.uint8)
            if kernels.zero_map(view, SPARSE_BLOCK, zero):
                from smsrepl.blocks.manifest import run_arrays

                starts, counts = run_arrays(zero == 0)
                runs = [(s * SPARSE_BLOCK, min(len(view), (s + c) * SPARSE_BLOCK))
                        for s, c in zip(starts.tolist(), counts.tolist())]
        for lo, hi in runs:
            done = 0
            while done < hi - lo:
                done += os.pwrite(fd, view[lo + done:hi], pos + lo + done)
        return bool(len(view)) and (not runs or runs[-1][1] < len(view))

    def _set_meta_fd(self, fd: int, entry: Entry, *, new: bool = False, times: bool = True) -> None:
        if self.preserve_owner:
            os.fchown(fd, entry.uid, entry.gid)
        os.fchmod(fd, entry.mode)  # after chown, which clears set-id bits
        if entry.xattrs or not new:  # a file just created has none to remove
            self._set_xattrs(fd, entry)
        if times:
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))

    def _set_meta_path(self, name: bytes, parent: int, entry: Entry) -> None:
        """Owner, mode and times of an entry that cannot be opened for reading (special files),
        through an O_PATH descriptor: chmod by name would follow a symlink put there meanwhile."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise RemoteProtocolError(f"{os.fsdecode(entry.path)!r} is a symlink here, not a {entry.kind}")
            proc = f"/proc/self/fd/{fd}"
            if self.preserve_owner:
                os.chown(proc, entry.uid, entry.gid)
            os.chmod(proc, entry.mode)
            self._set_xattrs(_in_dir(parent, name), entry)
            os.utime(proc, ns=(entry.mtime_ns, entry.mtime_ns))
        finally:
            os.close(fd)

    def _set_xattrs(self, where: int | bytes, entry: Entry) -> None:
        """``entry``'s xattrs (and no others) on an open file ``where``, or on the entry at path
        ``where`` itself (_in_dir: a symlink or special file, which cannot be opened for them)."""
        want = getattr(entry, "xattrs", None)
        if want is None:
            return
        own = {} if isinstance(where, int) else {"follow_symlinks": False}
        try:
            have = {os.fsencode(n) for n in os.listxattr(where, **own)}
        except OSError:
            have = set()
        for name, value in want.items():
            try:
                os.setxattr(where, name, value, **own)
            except OSError as exc:
                self.reported.append(f"{os.fsdecode(entry.path)}: xattr {os.fsdecode(name)} not set "
                                     f"({exc.strerror})")
        for name in have - set(want):
            try:
                os.removexattr(where, name, **own)
            except OSError:
                pass


def _in_dir(parent: int, name: bytes) -> bytes:
    """A path of entry ``name`` of the directory open at ``parent`` that no rename of the
    directories above can redirect (the xattr calls take no directory descriptor)."""
    return b"/proc/self/fd/%d/%s" % (parent, name)


class FileSink:
    """A regular file being written: write() its data in order, then commit() (durable,
    metadata set, renamed onto its name) or abort() (the temporary is removed)."""

    def __init__(self, w: TreeWriter, entry: Entry, parts, parent: int, tmp: bytes, fd: int, sparse: bool,
                 digest: bool = False) -> None:
        self.w, self.entry, self.parts, self.parent, self.tmp, self.fd, self.sparse = w, entry, parts, parent, tmp, fd, sparse
        self.pos = 0
        self.holes = False
        self.digest = xxhash.xxh3_128() if digest else None

    def write(self, chunk) -> None:
        if self.pos + len(chunk) > self.entry.size:
            self.abort()
            raise RemoteProtocolError(f"{os.fsdecode(self.entry.path)!r}: more data than its {self.entry.size} bytes")
        if self.digest is not None:
            self.digest.update(chunk)
        if len(chunk):
            self.holes = self.w._write_data(self.fd, chunk, self.pos, self.sparse)
            self.pos += len(chunk)

    def commit(self, digest: bytes | None = None) -> None:
        try:
            if self.pos != self.entry.size:
                raise RemoteProtocolError(f"{os.fsdecode(self.entry.path)!r}: got {self.pos} bytes, "
                                          f"the entry says {self.entry.size}")
            if digest is not None and (self.digest is None or digest != self.digest.digest()):
                raise DecompressionError(f"{os.fsdecode(self.entry.path)!r}: data does not match its digest")
            if self.holes:
                os.ftruncate(self.fd, self.pos)  # a file ending in a hole
            self.w._set_meta_fd(self.fd, self.entry, new=True)
        except BaseException:
            self.abort()
            raise
        os.close(self.fd)
        self.fd = -1
        if self.w.fsync:
            self.w._defer(self.tmp, self.parts, self.pos)
        else:
            self.w._install(self.tmp, self.parts, self.parent)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            unlink_quiet(self.tmp, self.parent)

