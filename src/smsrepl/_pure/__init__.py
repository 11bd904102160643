"""Pure-Python (numpy + xxhash) twin of the native kernels in ``smsrepl._native``.

This module is the *reference*: every function returns bit-for-bit the same
results as the C code (``_native/blockscan.c`` and ``_native/delta.c``), which the
tests check on random inputs. Use it through :mod:`smsrepl.kernels`
(``SMSREPL_BACKEND=pure``).

Definitions shared with the C code
----------------------------------
Block digest: an all-zero block -> ``ZERO_DIGEST`` (0); otherwise
``XXH3_64bits(block)`` (seed 0) with 0 -> 1 and 0xFFFF_FFFF_FFFF_FFFF -> 0xFFFF_FFFF_FFFF_FFFE,
so real data never takes a reserved value (``UNKNOWN_DIGEST`` = 2**64-1).

Weak rolling checksum of bytes ``b[0..n)`` (32 bit)::

    W = sum_{k=0}^{n-1} (b[k] + 1) * M**(n-1-k)   mod 2**32,   M = 0x9E3779B1

(Horner: ``h = h*M + byte + 1``). Rolling a window of length n one byte on:
``h' = h*M + (in+1) - (out+1)*M**n  (mod 2**32)``.

Strong checksum: ``XXH3_64bits(block)`` (seed 0, no remapping).

Delta search: see :func:`delta_search` (identical to the C algorithm).
"""
from __future__ import annotations

import xxhash

from smsrepl._lazy import import_numpy

TYPE_CHECKING = False
if TYPE_CHECKING:
    import numpy as np
else:
    np = import_numpy()

ZERO_DIGEST = 0
UNKNOWN_DIGEST = 0xFFFF_FFFF_FFFF_FFFF

WEAK_MULT = 0x9E3779B1
BUCKET_MULT = 0x85EBCA6B
#: Hash-chain entries examined per position of the new data.
DELTA_MAX_CHAIN = 8
#: Per MiB of new data (MiB = position >> 20): positions whose strong hash was
#: computed without finding a match. Once reached, no candidate is verified for
#: the rest of that MiB.
DELTA_FAIL_BUDGET = 32

_MASK32 = 0xFFFF_FFFF
_xxh3 = xxhash.xxh3_64_intdigest


def _nblocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def _check_bs(block_size: int, multiple_of_8: bool) -> None:
    if block_size <= 0 or (multiple_of_8 and block_size % 8):
        what = "a positive multiple of 8" if multiple_of_8 else "positive"
        raise ValueError(f"block_size must be {what}, got {block_size}")


def _bytes_view(buf) -> memoryview:
    mv = memoryview(buf)
    if not mv.c_contiguous:
        raise BufferError("buffer is not C-contiguous")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def _out_array(out, dtype, count: int, name: str) -> np.ndarray:
    mv = memoryview(out)
    if mv.readonly:
        raise TypeError(f"{name} must be a writable buffer")
    raw = np.frombuffer(mv.cast("B"), dtype=np.uint8)
    itemsize = np.dtype(dtype).itemsize
    if raw.size < count * itemsize:
        raise ValueError(f"{name} too small: need {count * itemsize} bytes, got {raw.size}")
    return raw[: count * itemsize].view(dtype)


def _zero_flags(a: np.ndarray, block_size: int) -> np.ndarray:
    """Boolean array: block i of the uint8 array ``a`` is all zero."""
    n = a.size
    nfull = n // block_size
    flags = np.empty(_nblocks(n, block_size), dtype=bool)
    if nfull:
        full = a[: nfull * block_size].view(np.uint64).reshape(nfull, block_size // 8)
        flags[:nfull] = ~full.any(axis=1)
    if n % block_size:
        flags[nfull] = not a[nfull * block_size :].any()
    return flags


def block_digests(buf, block_size: int, out) -> int:
    _check_bs(block_size, True)
    mv = _bytes_view(buf)
    nb = _nblocks(len(mv), block_size)
    dst = _out_array(out, np.uint64, nb, "out")
    flags = _zero_flags(np.frombuffer(mv, dtype=np.uint8), block_size)
    nonzero = 0
    for i in range(nb):
        if flags[i]:
            dst[i] = ZERO_DIGEST
            continue
        h = _xxh3(mv[i * block_size : (i + 1) * block_size])
        if h == ZERO_DIGEST:
            h = 1
        elif h == UNKNOWN_DIGEST:
            h = UNKNOWN_DIGEST - 1
        dst[i] = h
        nonzero += 1
    return nonzero


def zero_map(buf, block_size: int, out) -> int:
    _check_bs(block_size, True)
    mv = _bytes_view(buf)
    nb = _nblocks(len(mv), block_size)
    dst = _out_array(out, np.uint8, nb, "out")
    flags = _zero_flags(np.frombuffer(mv, dtype=np.uint8), block_size)
    dst[:] = flags
    return int(np.count_nonzero(flags))


def _weak_powers(n: int) -> np.ndarray:
    """uint64 array of M**(n-1-k) mod 2**32 for k in 0..n-1."""
    p = np.full(n, WEAK_MULT, dtype=np.uint64)
    p[-1] = 1
    # cumulative product from the right, reduced mod 2**32 (uint64 wraps mod 2**64,
    # which preserves the value mod 2**32)
    p = np.multiply.accumulate(p[::-1], dtype=np.uint64)[::-1]
    return p & np.uint64(_MASK32)


def _weak_rows(a: np.ndarray, powers: np.ndarray) -> np.ndarray:
    """Weak checksum of each row of the 2-D uint8 array ``a`` (all of equal length)."""
    # (b+1) <= 256, powers < 2**32: each product < 2**40, a row of <= 2**23 bytes
    # sums below 2**63, so the uint64 sum is exact before the final mod 2**32.
    out = np.empty(a.shape[0], dtype=np.uint64)
    rows = max(1, (1 << 22) // max(1, a.shape[1]))
    for s in range(0, a.shape[0], rows):
        chunk = a[s : s + rows].astype(np.uint64) + np.uint64(1)
        out[s : s + rows] = (chunk * powers).sum(axis=1, dtype=np.uint64)
    return (out & np.uint64(_MASK32)).astype(np.uint32)


def weak_checksum(buf) -> int:
    """Weak rolling checksum of a whole buffer (see module docstring)."""
    a = np.frombuffer(_bytes_view(buf), dtype=np.uint8)
    if a.size == 0:
        return 0
    return int(_weak_rows(a.reshape(1, -1), _weak_powers(a.size))[0])


def file_signature(buf, block_size: int, weak_out, strong_out) -> int:
    _check_bs(block_size, False)
    mv = _bytes_view(buf)
    n = len(mv)
    nb = _nblocks(n, block_size)
    weak = _out_array(weak_out, np.uint32, nb, "weak_out")
    strong = _out_array(strong_out, np.uint64, nb, "strong_out")
    a = np.frombuffer(mv, dtype=np.uint8)
    nfull = n // block_size
    if nfull:
        weak[:nfull] = _weak_rows(a[: nfull * block_size].reshape(nfull, block_size),
                                  _weak_powers(block_size))
    if n % block_size:
        weak[nfull] = weak_checksum(mv[nfull * block_size :])
    for i in range(nb):
        strong[i] = _xxh3(mv[i * block_size : (i + 1) * block_size])
    return nb


def delta_search(weak, strong, block_size: int, old_len: int, data) -> np.ndarray:
    """rsync-style search of ``data`` (new file) against the old file's signature.

    Returns an int64 array of shape (n, 3): ``(0, offset, length)`` = literal
    bytes of ``data``; ``(1, first_block, count)`` = copy ``count`` consecutive
    old blocks. Rows cover ``data`` exactly, in order.

    Algorithm (the C code in ``_native/delta.c`` is the same, step for step):

    * ``nfull = old_len // bs`` full old blocks; a short last block
      (``last_len = old_len % bs > 0``) is block ``nfull``.
    * Table: ``tsize`` = smallest power of two >= max(16, 2*nfull);
      ``bucket(h) = ((h * BUCKET_MULT) mod 2**32) >> (32 - log2(tsize))``. Full
      blocks are inserted from the highest index down, each pushed on the front of
      its bucket's chain, except that a block whose (weak, strong) equal those of
      the chain's current head replaces the head's index (runs of identical blocks
      collapse to one entry holding the lowest index).
    * Scan ``pos`` from 0 while ``pos + bs <= len(data)`` with the rolling weak sum
      ``h`` of ``data[pos:pos+bs]``. The failure counter resets when ``pos >> 20``
      changes. Jump check: at the first position after a match (counter below
      DELTA_FAIL_BUDGET, ``prev+1`` a full block), XXH3 of the window equal to
      ``strong[prev+1]`` is a match by itself (no weak sum needed, so unchanged
      runs cost one XXH3 per block); otherwise ``prev+1`` counts as tried here.
      If the counter is below DELTA_FAIL_BUDGET, the candidates are, in order:
      ``prev+1`` (the old block after the previous match, if not jump-checked,
      a full block and its weak == h), then among the first DELTA_MAX_CHAIN chain entries of
      ``bucket(h)`` those with weak == h (other than prev+1). With any candidate,
      XXH3 of the window is computed once and the first candidate with an equal
      strong sum matches; if none matches (and the jump check, if any, failed),
      the counter goes up by one.
      On a match: literal up to pos, copy the block, jump ``bs`` bytes and
      recompute ``h``. Otherwise roll one byte.
    * End: the short last block can only match the last ``last_len`` bytes of
      data (if they start at or after ``pos``): weak and strong must both match.
    * Copies of consecutive old blocks merge into one row.
    """
    _check_bs(block_size, False)
    bs = block_size
    dmv = _bytes_view(data)
    n = len(dmv)
    nfull, last_len = divmod(old_len, bs)
    nb = nfull + (1 if last_len else 0)
    w = np.frombuffer(_bytes_view(weak), dtype=np.uint8)
    s = np.frombuffer(_bytes_view(strong), dtype=np.uint8)
    if w.size < 4 * nb:
        raise ValueError(f"weak too small: need {4 * nb} bytes, got {w.size}")
    if s.size < 8 * nb:
        raise ValueError(f"strong too small: need {8 * nb} bytes, got {s.size}")
    wl = w[: 4 * nb].view(np.uint32).tolist()
    sl = s[: 8 * nb].view(np.uint64).tolist()

    tbits = 4
    while (1 << tbits) < 2 * nfull:
        tbits += 1
    shift = 32 - tbits
    # chains: bucket -> list of block indexes, head first
    chains: dict[int, list[int]] = {}
    for j in range(nfull - 1, -1, -1):
        b = ((wl[j] * BUCKET_MULT) & _MASK32) >> shift
        ch = chains.get(b)
        if ch is None:
            chains[b] = [j]
            continue
        hd = ch[0]
        if wl[hd] == wl[j] and sl[hd] == sl[j]:
            ch[0] = j
        else:
            ch.insert(0, j)

    mn = pow(WEAK_MULT, bs, 1 << 32)
    out_tab = [((c + 1) * mn) & _MASK32 for c in range(256)]
    rows: list[list[int]] = []

    def emit(kind: int, a: int, length: int) -> None:
        if rows:
            last = rows[-1]
            if last[0] == kind and last[1] + last[2] == a:
                last[2] += length
                return
        rows.append([kind, a, length])

    buf = dmv.tobytes() if not isinstance(data, bytes) else data
    pos = lit = 0
    prev = -1
    h = 0
    need = True
    cur_mib = -1
    fails = 0
    M = WEAK_MULT
    while nfull and pos + bs <= n:
        mib = pos >> 20
        if mib != cur_mib:
            cur_mib = mib
            fails = 0
        match = -1
        jtried = False
        sw = 0
        if need:
            need = False
            # jump check: right after a match, the next old block by strong sum only
            if fails < DELTA_FAIL_BUDGET and prev + 1 < nfull:
                sw = _xxh3(buf[pos : pos + bs])
                jtried = True
                if sw == sl[prev + 1]:
                    match = prev + 1
            if match < 0:
                h = weak_checksum(buf[pos : pos + bs])
        if match < 0 and fails < DELTA_FAIL_BUDGET:
            nx = prev + 1
            fast = prev >= 0 and nx < nfull
            cands = []
            if not jtried and fast and wl[nx] == h:
                cands.append(nx)
            ch = chains.get(((h * BUCKET_MULT) & _MASK32) >> shift)
            if ch:
                for j in ch[:DELTA_MAX_CHAIN]:
                    if wl[j] == h and not (fast and j == nx):
                        cands.append(j)
            if cands or jtried:
                if not jtried:
                    sw = _xxh3(buf[pos : pos + bs])
                for j in cands:
                    if sl[j] == sw:
                        match = j
                        break
                else:
                    fails += 1
        if match >= 0:
            if pos > lit:
                emit(0, lit, pos - lit)
            emit(1, match, 1)
            pos += bs
            lit = pos
            prev = match
            need = True
        else:
            if pos + bs < n:
                h = (h * M + buf[pos + bs] + 1 - out_tab[buf[pos]]) & _MASK32
            pos += 1
    if last_len and n >= last_len and n - last_len >= pos:
        tail = buf[n - last_len :]
        if weak_checksum(tail) == wl[nfull] and _xxh3(tail) == sl[nfull]:
            if n - last_len > lit:
                emit(0, lit, n - last_len - lit)
            emit(1, nfull, 1)
            lit = n
    if n > lit:
        emit(0, lit, n - lit)
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def group_digests(buf, group_size: int, out) -> int:
    """Canonical XXH3-128 of each ``group_size`` slice of ``buf`` (the last may be short)."""
    _check_bs(group_size, False)
    mv = _bytes_view(buf)
    ng = _nblocks(len(mv), group_size)
    dst = memoryview(out).cast("B")
    if len(dst) < 16 * ng:
        raise ValueError(f"out too small: need {16 * ng} bytes, got {len(dst)}")
    for i in range(ng):
        dst[16 * i:16 * i + 16] = xxhash.xxh3_128_digest(mv[i * group_size:(i + 1) * group_size])
    return ng


def read_ranges(fd: int, buf, offsets, lengths, depth: int) -> int:
    """Range i of fd into buf at the sum of the lengths before it, one pread after another
    (the native kernel keeps ``depth`` in flight). Returns the bytes read; fewer only where
    the file ended."""
    import os

    dst = memoryview(buf).cast("B")
    offs = np.frombuffer(offsets, dtype=np.int64)
    lens = np.frombuffer(lengths, dtype=np.int64)
    if len(offs) != len(lens) or (offs < 0).any() or (lens < 0).any():
        raise ValueError("read_ranges: offsets and lengths must be int64 arrays of one length, none negative")
    if int(lens.sum()) > len(dst):
        raise ValueError(f"read_ranges: the ranges need {int(lens.sum())} bytes, the buffer has {len(dst)}")
    pos = 0
    for off, n in zip(offs.tolist(), lens.tolist()):
        got = 0
        while got < n:
            k = os.preadv(fd, [dst[pos + got:pos + n]], off + got)
            if k == 0:
                return pos + got
            got += k
        pos += n
    return pos


def write_ranges(fd: int, buf, offsets, lengths) -> int:
    """Range i of ``buf`` (at the sum of the lengths before it) to fd at offsets[i]."""
    import os

    src = memoryview(buf).cast("B")
    offs = np.frombuffer(offsets, dtype=np.int64)
    lens = np.frombuffer(lengths, dtype=np.int64)
    if len(offs) != len(lens) or (offs < 0).any() or (lens < 0).any():
        raise ValueError("write_ranges: offsets and lengths must be int64 arrays of one length, none negative")
    if int(lens.sum()) > len(src):
        raise ValueError(f"write_ranges: the ranges need {int(lens.sum())} bytes, the buffer has {len(src)}")
    pos = 0
    for off, n in zip(offs.tolist(), lens.tolist()):
        done = 0
        while done < n:
            done += os.pwrite(fd, src[pos + done:pos + n], off + done)
        pos += n
    return pos


_HASH_BUF = 1 << 20


def hash_files(dir_fd: int, names, out, budget: int) -> tuple[int, int, list[tuple[int, int]]]:
    """Twin of filehash.c: XXH3-128 of whole regular files relative to ``dir_fd`` into
    ``out[16*i:16*i+16]`` until more than ``budget`` bytes were read (one file at least)."""
    import errno as _errno
    import os
    import stat

    view = memoryview(out).cast("B")
    if len(view) < 16 * len(names):
        raise ValueError(f"out too small: need {16 * len(names)} bytes, got {len(view)}")
    buf = bytearray(_HASH_BUF)
    total, i = 0, 0
    errors: list[tuple[int, int]] = []
    while i < len(names) and (i == 0 or total <= budget):
        name = names[i]
        if not isinstance(name, bytes) or b"\0" in name:
            raise ValueError(f"names[{i}] must be bytes without NUL")
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK,
                         dir_fd=dir_fd)
        except OSError as exc:
            errors.append((i, _errno.EINVAL if exc.errno == _errno.ELOOP else exc.errno or _errno.EIO))
            i += 1
            continue
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                errors.append((i, _errno.EISDIR if stat.S_ISDIR(mode) else _errno.EINVAL))
            else:
                h = xxhash.xxh3_128()
                while n := os.readv(fd, [buf]):
                    h.update(memoryview(buf)[:n])
                    total += n
                view[16 * i:16 * i + 16] = h.digest()
        except OSError as exc:
            errors.append((i, exc.errno or _errno.EIO))
        finally:
            os.close(fd)
        i += 1
    return i, total, errors
