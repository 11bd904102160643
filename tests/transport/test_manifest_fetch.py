"""The sender's local copy of the target's manifest, brought equal to the receiver's."""
import numpy as np

from smsrepl.blocks.manifest import GROUP_BLOCKS, ManifestFile
from smsrepl.kernels import FINE_BLOCK
from smsrepl.transport.manifest_fetch import reconcile

GROUPS = 64
SIZE = GROUPS * GROUP_BLOCKS * FINE_BLOCK


def _receiver(tmp_path, fine):
    man = ManifestFile.create(str(tmp_path / "receiver.manifest"), SIZE, fine=fine)
    asked = []

    def request(level, first, count):
        asked.append((level, first, count))
        return man.coarse[first:first + count].copy() if level == "coarse" else man.read_fine(first, count)

    return man, request, asked


def test_a_copy_left_mid_update_is_repaired_and_only_the_groups_that_differ_are_fetched(tmp_path):
    """A sender killed while it copied acknowledged digests into its copy (fine digests written,
    their groups' digests not): the copy's group digests are computed again from what it holds,
    and only the groups that differ from the receiver's are fetched, not the whole manifest (2 GiB
    of a 1 TiB disk's, after every cut)."""
    rng = np.random.default_rng(1)
    fine = rng.integers(1, 1 << 63, GROUPS * GROUP_BLOCKS, dtype=np.uint64).astype("<u8")
    path = str(tmp_path / "target.manifest")
    ManifestFile.create(path, SIZE, fine=fine).close()
    cache = ManifestFile.open(path, writable=True, expect_size=SIZE)
    newer = fine.copy()
    newer[5 * GROUP_BLOCKS:7 * GROUP_BLOCKS] += 1  # what the receiver made durable and acknowledged
    cache.write_fine(5 * GROUP_BLOCKS, newer[5 * GROUP_BLOCKS:7 * GROUP_BLOCKS])
    cache.close()  # killed before commit()
    newer[40 * GROUP_BLOCKS + 3] += 1  # and what it made durable after the last acknowledgement
    man, request, asked = _receiver(tmp_path, newer)
    got = reconcile(request, path, SIZE, man.root.hex())
    assert got.root == man.root
    assert np.array_equal(got.read_fine(0, GROUPS * GROUP_BLOCKS), newer)
    fetched = sum(count for level, _, count in asked if level == "fine")
    assert fetched == GROUP_BLOCKS, asked  # group 40 only
