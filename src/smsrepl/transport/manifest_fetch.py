"""The sender's local copy of the target's manifest, brought equal to the receiver's.

A sync round and a consistency check compare the source with the digests of what the target
holds. The sender keeps a copy of the receiver's manifest; when its root differs from the one
WELCOME names, the coarse digests (one per group of blocks) are fetched, and the fine digests
of only the groups that differ (MANIFEST_REQUEST / MANIFEST_DATA, at most
MAX_MANIFEST_ENTRIES a request).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

from smsrepl._lazy import np
from smsrepl.blocks.manifest import GROUP_BLOCKS, ManifestFile, runs_of
from smsrepl.errors import ManifestError, RemoteProtocolError
from smsrepl.transport.limits import MAX_MANIFEST_ENTRIES

log = logging.getLogger("smsrepl.sender")

#: asks the receiver for ``count`` digests of ``level`` ("coarse" or "fine") from ``first``
Request = Callable[[str, int, int], "np.ndarray"]


def open_cache(path: str, size: int, *, verify: bool = False) -> ManifestFile | None:
    """The local copy at ``path``, or None where there is none or it is unusable."""
    if not os.path.exists(path):
        log.info("no local copy of the target manifest; fetching it")
        return None
    try:
        cache = ManifestFile.open(path, writable=True, expect_size=size)
    except ManifestError as exc:
        log.warning("local copy of the target manifest is unusable (%s); fetching it again", exc)
        return None
    if verify:
        try:
            cache.verify()  # the round reads it unverified, range by range
        except ManifestError as exc:
            # a sender stopped between copying acknowledged digests in and committing them: the
            # group digests are computed again from the fine ones, and reconciling fetches the
            # groups that differ from the receiver's, not the whole manifest
            log.info("local copy of the target manifest was left mid-update (%s); its group digests "
                     "are computed again", exc)
            try:
                cache.refresh_coarse()
            except OSError as err:
                cache.close()
                log.warning("local copy of the target manifest cannot be repaired (%s); fetching it again",
                            err.strerror)
                return None
    return cache


def reconcile(request: Request, path: str, size: int, root: str) -> ManifestFile:
    """Make the local copy of the target's manifest equal the receiver's (whose root is ``root``)."""
    cache = open_cache(path, size, verify=True) or ManifestFile.create(path, size)
    if cache.root.hex() == root:
        return cache
    try:
        return _fetch_differences(request, cache, root)
    except BaseException:
        cache.close()
        raise


def _fetch_differences(request: Request, cache: ManifestFile, root: str) -> ManifestFile:
    coarse = np.empty_like(cache.coarse)
    for first in range(0, cache.ngroups, MAX_MANIFEST_ENTRIES):
        n = min(MAX_MANIFEST_ENTRIES, cache.ngroups - first)
        coarse[first:first + n] = request("coarse", first, n)
    differ = np.any(coarse != cache.coarse, axis=1)
    fetched = 0
    for g0, gn in runs_of(differ):
        b0 = g0 * GROUP_BLOCKS
        b1 = min((g0 + gn) * GROUP_BLOCKS, cache.nblocks)
        for first in range(b0, b1, MAX_MANIFEST_ENTRIES):
            n = min(MAX_MANIFEST_ENTRIES, b1 - first)
            cache.write_fine(first, request("fine", first, n))
            fetched += n
    cache.commit()
    log.info("reconciled target manifest: %d of %d groups differed, %d digests fetched",
             int(differ.sum()), cache.ngroups, fetched)
    if cache.root.hex() != root:
        raise RemoteProtocolError("the receiver's manifest does not match its own root after reconciliation")
    return cache
