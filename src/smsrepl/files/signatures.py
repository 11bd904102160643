"""Block signatures of the receiver's copy of a file, for a delta (SIG_REQUEST -> SIG_DATA).

The sender asks before it sends a large changed file as a delta (files.remote):
each block's weak and strong hash (kernels.file_signature), read in steps, several
frames for a large file.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

from smsrepl import kernels
from smsrepl.errors import RemoteProtocolError
from smsrepl.files.apply import TreeWriter
from smsrepl.protocol import frames as F


def signature_frames(w: TreeWriter, req: F.SigRequest) -> Iterator[F.SigData]:
    """SIG_DATA frames for the receiver's copy of ``req.path`` (one empty frame where there is none)."""
    from smsrepl._lazy import np

    bs = req.block_size
    if not 0 < bs <= 1 << 24:
        raise RemoteProtocolError(f"SIG_REQUEST block size {bs} out of range")
    fd = w.open_regular(req.path)
    if fd < 0:
        yield F.SigData(True, bs, 0, 0, np.empty(0, np.uint32), np.empty(0, np.uint64))
        return
    try:
        size = os.fstat(fd).st_size
        nblocks = -(-size // bs)
        per = max(1, min(F.MAX_SIG, (8 << 20) // bs))  # blocks per read, and per frame
        first = 0
        while True:
            data = os.pread(fd, per * bs, first * bs) if first < nblocks else b""
            n = -(-len(data) // bs)
            weak, strong = np.empty(n, np.uint32), np.empty(n, np.uint64)
            if n:
                kernels.file_signature(data, bs, weak, strong)
            first_here, first = first, first + n
            last = first >= nblocks or not n
            yield F.SigData(last, bs, size, first_here, weak, strong)
            if last:
                return
    finally:
        os.close(fd)
