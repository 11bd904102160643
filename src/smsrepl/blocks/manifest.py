"""Block manifests: what every 4 KiB block of a disk holds, and their diff.

Granularity (two levels)
------------------------
* fine: one 8-byte XXH3-64 digest per 4 KiB block. A 4 KiB guest write
  dirties exactly one fine block, so a sync round resends ~1x the rewritten
  bytes. Digest 0 means "all zero" (and nothing else: real data hashing to 0
  is stored as 1); 2**64-1 means "unknown" and never equals a source digest.
* coarse: one 16-byte XXH3-128 digest per group of 256 fine blocks (1 MiB of
  disk), taken over the group's 2 KiB of fine digests, so it costs no second
  pass over the data.

Sizes for a 1 TiB disk: coarse 16 MiB (held in memory, sent over the wire
when two sides reconcile), fine 2 GiB (kept on disk, read by ranges, and
exchanged only for groups whose coarse digests differ). For a 2 GiB disk:
32 KiB coarse, 4 MiB fine. 1% random 4 KiB rewrites of a disk touch ~92% of
the 1 MiB groups (1 - 0.99**256), which is why change detection compares
fine digests and never resends whole coarse blocks; the coarse level keeps
reconciliation and diffs of mostly-equal manifests cheap.

File layout (little-endian), one self-describing file:

    offset  size  field
    0       8     magic b"SMSRMNF\\n"
    8       2     format version (1)
    10      2     hash algorithm (1 = fine XXH3-64, coarse XXH3-128 of fine)
    12      4     fine block size in bytes (4096)
    16      4     fine blocks per group (256)
    20      4     header check: XXH32 of bytes 0-19 and 24-63
    24      8     device size in bytes
    32      16    root: XXH3-128 of the coarse section
    48      16    reserved, zero
    64      16*G  coarse section, G = ceil(N / 256) groups
    64+16G  8*N   fine section, N = ceil(size / 4096) blocks

The header check catches a damaged header, the root a damaged coarse
section, and each coarse digest its own group of fine digests, so a
truncated or corrupt file raises ManifestError instead of giving a wrong diff.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import xxhash

from smsrepl import kernels
from smsrepl._lazy import np
from smsrepl.durable import fsync_dir
from smsrepl.errors import ManifestError
from smsrepl.kernels import FINE_BLOCK

MAGIC = b"SMSRMNF\n"
VERSION = 1
ALGO_XXH3 = 1
GROUP_BLOCKS = 256
HEADER = struct.Struct("<8sHHIIIQ16s16s")
assert HEADER.size == 64
#: groups refreshed per read at commit (16 MiB of fine digests)
COMMIT_GROUPS = 8192
# coarse digest of a group of all-zero fine blocks
ZERO_GROUP = np.frombuffer(xxhash.xxh3_128_digest(bytes(8 * GROUP_BLOCKS)), dtype="<u8").copy()


def block_count(size: int, block_size: int = FINE_BLOCK) -> int:
    return -(-size // block_size)


def group_count(nblocks: int) -> int:
    return -(-nblocks // GROUP_BLOCKS)


def group_digests(fine: np.ndarray) -> np.ndarray:
    """Coarse digests (shape (G, 2), uint64) of consecutive 256-entry groups of ``fine``."""
    fine = np.ascontiguousarray(fine, dtype="<u8")
    out = np.empty((group_count(len(fine)), 2), dtype="<u8")
    kernels.group_digests(fine, 8 * GROUP_BLOCKS, out)
    return out


def _header_check(buf: bytes) -> int:
    return xxhash.xxh32_intdigest(buf[:20] + buf[24:64])


class ManifestFile:
    """A manifest on disk: the coarse section in memory, the fine one read by range."""

    def __init__(self, path: str, fd: int, size: int, coarse: np.ndarray, writable: bool) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.nblocks = block_count(size)
        self.ngroups = group_count(self.nblocks)
        self.coarse = coarse
        self.writable = writable
        self._fine_base = HEADER.size + 16 * self.ngroups
        self._dirty_groups: set[int] = set()

    # --- creation and opening -------------------------------------------
    @classmethod
    def create(cls, path: str, size: int, *, fine: np.ndarray | None = None) -> ManifestFile:
        """Write a new manifest atomically. Without ``fine`` every block is zero."""
        nblocks = block_count(size)
        ngroups = group_count(nblocks)
        if fine is None:
            coarse = np.tile(ZERO_GROUP, (ngroups, 1))
        else:
            if len(fine) != nblocks:
                raise ValueError(f"fine digests hold {len(fine)} blocks, size needs {nblocks}")
            coarse = group_digests(fine)
        tmp = f"{path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, HEADER.size + 16 * ngroups + 8 * nblocks)
            os.pwrite(fd, coarse.tobytes(), HEADER.size)
            if fine is not None:
                _pwrite_all(fd, np.ascontiguousarray(fine, dtype="<u8"), HEADER.size + 16 * ngroups)
            os.pwrite(fd, _pack_header(size, coarse), 0)
            os.fsync(fd)
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        fsync_dir(path)
        return cls(path, fd, size, coarse, True)

    @classmethod
    def open(cls, path: str, *, writable: bool = False, expect_size: int | None = None) -> ManifestFile:
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as exc:
            raise ManifestError(f"manifest {path!r} cannot be opened: {os.strerror(exc.errno or 0)}") from None
        try:
            head = os.pread(fd, HEADER.size, 0)
            if len(head) < HEADER.size:
                raise ManifestError(f"manifest {path!r} is truncated (header has {len(head)} bytes)")
            magic, version, algo, bsize, per_group, check, size, root, _ = HEADER.unpack(head)
            if magic != MAGIC:
                raise ManifestError(f"manifest {path!r} is not a manifest (bad magic)")
            if check != _header_check(head):
                raise ManifestError(f"manifest {path!r} has a corrupt header")
            if version != VERSION:
                raise ManifestError(f"manifest {path!r} has format version {version}; this build reads {VERSION}")
            if algo != ALGO_XXH3 or bsize != FINE_BLOCK or per_group != GROUP_BLOCKS:
                raise ManifestError(
                    f"manifest {path!r} uses algorithm {algo}, block size {bsize}, group {per_group}; "
                    f"expected {ALGO_XXH3}, {FINE_BLOCK}, {GROUP_BLOCKS}"
                )
            if expect_size is not None and size != expect_size:
                raise ManifestError(f"manifest {path!r} describes {size} bytes, expected {expect_size}")
            nblocks = block_count(size)
            ngroups = group_count(nblocks)
            want = HEADER.size + 16 * ngroups + 8 * nblocks
            have = os.fstat(fd).st_size
            if have != want:
                raise ManifestError(f"manifest {path!r} is {have} bytes long, its header implies {want}")
            coarse_raw = _pread_exact(fd, 16 * ngroups, HEADER.size)
            if xxhash.xxh3_128_digest(coarse_raw) != root:
                raise ManifestError(f"manifest {path!r} has a corrupt coarse section (root mismatch)")
            coarse = np.frombuffer(coarse_raw, dtype="<u8").reshape(ngroups, 2).copy()
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size, coarse, writable)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ManifestFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def root(self) -> bytes:
        return xxhash.xxh3_128_digest(self.coarse.tobytes())

    # --- fine digests -----------------------------------------------------
    def read_fine(self, first: int, count: int, out: np.ndarray | None = None, *, verify: bool = True) -> np.ndarray:
        """Fine digests of blocks [first, first+count); checked against their groups when whole groups are read."""
        if first < 0 or count < 0 or first + count > self.nblocks:
            raise ManifestError(f"manifest {self.path!r}: blocks {first}+{count} outside its {self.nblocks}")
        if out is None:
            out = np.empty(count, dtype="<u8")
        view = out[:count].data.cast("B")
        got = 0
        while got < len(view):  # one read returns at most 2 GiB - 4 KiB on Linux
            n = os.preadv(self.fd, [view[got:]], self._fine_base + 8 * first + got)
            if n == 0:
                raise ManifestError(f"manifest {self.path!r} is truncated in its fine section")
            got += n
        if verify and count:
            g0 = -(-first // GROUP_BLOCKS)
            g1 = (first + count) // GROUP_BLOCKS
            if first + count == self.nblocks:
                g1 = self.ngroups
            if g1 > g0:
                lo = g0 * GROUP_BLOCKS - first
                hi = min(g1 * GROUP_BLOCKS, self.nblocks) - first
                if not np.array_equal(group_digests(out[lo:hi]), self.coarse[g0:g1]):
                    raise ManifestError(f"manifest {self.path!r} has corrupt fine digests in groups {g0}..{g1 - 1}")
        return out[:count]

    def read_fine_at(self, blocks: np.ndarray) -> np.ndarray:
        """Fine digests of the given blocks (increasing): one read per cluster of nearby blocks."""
        blocks = np.asarray(blocks, dtype=np.int64)
        out = np.empty(len(blocks), dtype="<u8")
        for i, j, lo, fine in self._clusters(blocks):
            out[i:j] = fine[blocks[i:j] - lo]
        return out

    def _clusters(self, blocks: np.ndarray, span: int = 1 << 16):
        """``(i, j, lo, fine)``: blocks[i:j] lie in [lo, lo + len(fine)), whose digests ``fine``
        were read at once; scattered blocks on a huge source never read the spans between them."""
        if not len(blocks):
            return
        if blocks[0] < 0 or blocks[-1] >= self.nblocks:
            raise ManifestError(f"manifest {self.path!r}: blocks outside its {self.nblocks}")
        buf = np.empty(span, dtype="<u8")
        i = 0
        while i < len(blocks):
            lo = int(blocks[i])
            j = int(np.searchsorted(blocks, lo + span, side="left"))
            yield i, j, lo, self.read_fine(lo, int(blocks[j - 1]) + 1 - lo, buf, verify=False)
            i = j

    def verify(self, *, chunk_groups: int = 8192) -> None:
        """Check every fine digest against its group's coarse digest (reads the whole fine section)."""
        buf = np.empty(chunk_groups * GROUP_BLOCKS, dtype="<u8")
        for g0 in range(0, self.ngroups, chunk_groups):
            b0 = g0 * GROUP_BLOCKS
            n = min((g0 + chunk_groups) * GROUP_BLOCKS, self.nblocks) - b0
            self.read_fine(b0, n, buf, verify=True)

    def write_fine(self, first: int, values: np.ndarray) -> None:
        """Store fine digests; coarse digests follow at :meth:`commit`."""
        if not self.writable:
            raise ManifestError(f"manifest {self.path!r} is open read-only")
        values = np.ascontiguousarray(values, dtype="<u8")
        if first < 0 or first + len(values) > self.nblocks:
            raise ManifestError(f"manifest {self.path!r}: blocks {first}+{len(values)} outside its {self.nblocks}")
        if not len(values):
            return
        _pwrite_all(self.fd, values, self._fine_base + 8 * first)
        self._dirty_groups.update(range(first // GROUP_BLOCKS, (first + len(values) - 1) // GROUP_BLOCKS + 1))

    def write_fine_at(self, first: int, index: np.ndarray, values: np.ndarray) -> None:
        """Store the digests of blocks ``first + index[i]`` (index increasing), cluster by cluster."""
        blocks = first + np.asarray(index, dtype=np.int64)
        for i, j, lo, fine in self._clusters(blocks):
            fine[blocks[i:j] - lo] = values[i:j]
            self.write_fine(lo, fine)

    def fill_fine(self, first: int, count: int, value: int) -> None:
        chunk = 1 << 20
        buf = np.full(min(count, chunk), value, dtype="<u8")
        pos = first
        while pos < first + count:
            n = min(chunk, first + count - pos)
            self.write_fine(pos, buf[:n])
            pos += n

    def refresh_coarse(self) -> None:
        """Compute every group's digest again from the fine digests (a copy whose fine digests were
        written without commit()) and make it durable."""
        self._dirty_groups.update(range(self.ngroups))
        self.commit()

    def commit(self) -> None:
        """Bring coarse digests and root up to date with the fine ones and make it durable."""
        if not self.writable:
            return
        if self._dirty_groups:
            groups = np.array(sorted(self._dirty_groups), dtype=np.int64)
            self._dirty_groups.clear()
            # contiguous runs of dirty groups, each refreshed with one read and one write
            buf = np.empty(COMMIT_GROUPS * GROUP_BLOCKS, dtype="<u8")
            for r0, rn in runs_of(np.isin(np.arange(groups[0], groups[-1] + 1), groups), int(groups[0])):
                for g0 in range(r0, r0 + rn, COMMIT_GROUPS):  # bounded pieces: memory stays flat
                    g1 = min(g0 + COMMIT_GROUPS, r0 + rn)
                    b0, b1 = g0 * GROUP_BLOCKS, min(g1 * GROUP_BLOCKS, self.nblocks)
                    fine = self.read_fine(b0, b1 - b0, buf, verify=False)
                    self.coarse[g0:g1] = group_digests(fine)
                    _pwrite_all(self.fd, self.coarse[g0:g1], HEADER.size + 16 * g0)
            os.pwrite(self.fd, _pack_header(self.size, self.coarse), 0)
        os.fsync(self.fd)


def _pack_header(size: int, coarse: np.ndarray) -> bytes:
    root = xxhash.xxh3_128_digest(np.ascontiguousarray(coarse).tobytes())
    head = bytearray(HEADER.pack(MAGIC, VERSION, ALGO_XXH3, FINE_BLOCK, GROUP_BLOCKS, 0, size, root, bytes(16)))
    struct.pack_into("<I", head, 20, _header_check(bytes(head)))
    return bytes(head)


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise ManifestError("manifest is truncated")
    return data


def _pwrite_all(fd: int, arr: np.ndarray, offset: int) -> None:
    view = arr.data.cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def run_arrays(mask: np.ndarray, base: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Starts and counts (int64 arrays) of the runs of True in ``mask``, offset by ``base``."""
    idx = np.flatnonzero(mask)
    if not len(idx):
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([idx[0]], idx[breaks]))
    ends = np.concatenate((idx[breaks - 1], [idx[-1]])) + 1
    return starts.astype(np.int64) + base, (ends - starts).astype(np.int64)


def runs_of(mask: np.ndarray, base: int = 0) -> list[tuple[int, int]]:
    """``(first, count)`` runs of True in a boolean array, offset by ``base``."""
    starts, counts = run_arrays(mask, base)
    return list(zip(starts.tolist(), counts.tolist()))


def diff_runs(a: ManifestFile, b: ManifestFile, *, chunk_groups: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(starts, counts)`` arrays of fine-block runs whose digests differ, in order.

    Coarse digests are compared first; fine digests are read (in bounded
    chunks, into reused buffers) only for groups whose coarse digests differ,
    so memory stays at a few chunks whatever the disk size. Runs that touch
    at a chunk edge are yielded as two runs.
    """
    if a.size != b.size:
        raise ManifestError(f"manifests describe different sizes ({a.size} and {b.size} bytes)")
    group_differs = np.any(a.coarse != b.coarse, axis=1)
    buf_a = np.empty(chunk_groups * GROUP_BLOCKS, dtype="<u8")
    buf_b = np.empty_like(buf_a)
    for g0 in range(0, a.ngroups, chunk_groups):
        g1 = min(g0 + chunk_groups, a.ngroups)
        idx = np.flatnonzero(group_differs[g0:g1])
        if not len(idx):
            continue
        s0, s1 = g0 + int(idx[0]), g0 + int(idx[-1]) + 1
        if len(idx) * 4 >= s1 - s0:
            spans = [(s0, s1 - s0)]  # dense: one read per side for the whole span
        else:
            spans = runs_of(group_differs[g0:g1], g0)  # sparse: read only the differing runs
        for r0, rn in spans:
            b0, b1 = r0 * GROUP_BLOCKS, min((r0 + rn) * GROUP_BLOCKS, a.nblocks)
            fa = a.read_fine(b0, b1 - b0, buf_a)
            fb = b.read_fine(b0, b1 - b0, buf_b)
            starts, counts = run_arrays(fa != fb, b0)
            if len(starts):
                yield starts, counts


def diff(a: ManifestFile, b: ManifestFile, *, chunk_groups: int = 8192) -> Iterator[tuple[int, int]]:
    """Yield ``(first_block, count)`` runs of fine blocks whose digests differ, merged across chunks."""
    pending: tuple[int, int] | None = None
    for starts, counts in diff_runs(a, b, chunk_groups=chunk_groups):
        for first, count in zip(starts.tolist(), counts.tolist()):
            if pending and pending[0] + pending[1] == first:
                pending = (pending[0], pending[1] + count)
                continue
            if pending:
                yield pending
            pending = (first, count)
    if pending:
        yield pending
