"""Whether a block target holds what a manifest says: a few blocks sampled and digested.

Run when the receiver loads a target's state (replica.Replica._same_target): a target name
pointed at another disk, an image deleted and made again by ``--create``, or one written over
by hand holds other data than the manifest describes, and a sync round against that manifest
would send nothing and leave it so. Only blocks the manifest says hold data are compared (a
blank disk matches every all-zero block): the first and last and others spread at random.
"""
from __future__ import annotations

from smsrepl._lazy import np

from smsrepl import kernels
from smsrepl.blocks.manifest import ManifestFile
from smsrepl.blocks.target import BlockTarget
from smsrepl.errors import ManifestError
from smsrepl.kernels import FINE_BLOCK, UNKNOWN_DIGEST

#: blocks compared: a few milliseconds of reads that tell a blank or another disk from the one
#: the state describes (a smaller edit of the target is for a full check, verify)
SAMPLE_BLOCKS = 64


def sample_blocks(target: BlockTarget, man: ManifestFile, limit: int) -> tuple[int, int]:
    """(blocks that differ, blocks compared) among up to SAMPLE_BLOCKS of [0, limit) whose
    manifest digests say they hold data."""
    nblocks = limit // FINE_BLOCK
    if nblocks <= 0:
        return 0, 0
    rng = np.random.default_rng()
    picks = np.unique(np.concatenate(([0, nblocks - 1], rng.integers(0, nblocks, SAMPLE_BLOCKS * 4))))
    try:
        want = man.read_fine_at(picks)
    except ManifestError:
        return 1, 1  # a manifest that fails its own checks vouches for nothing
    keep = (want != 0) & (want != UNKNOWN_DIGEST)
    picks, want = picks[keep][:SAMPLE_BLOCKS], want[keep][:SAMPLE_BLOCKS]
    buf = memoryview(bytearray(FINE_BLOCK))
    got = np.empty(1, dtype="<u8")
    differ = 0
    for b, d in zip(picks.tolist(), want.tolist()):
        try:
            n = target.readinto(buf, b * FINE_BLOCK)
        except OSError:
            n = 0
        if n < FINE_BLOCK:
            differ += 1
            continue
        kernels.block_digests(buf, FINE_BLOCK, got)
        differ += int(got[0]) != d
    return differ, len(picks)
