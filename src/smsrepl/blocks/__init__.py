"""Block sources and targets, manifests and their diff."""
from .device import BlockSource, BlockTarget
from .manifest import FINE_BLOCK, GROUP_BLOCKS, ManifestFile

__all__ = ["BlockSource", "BlockTarget", "FINE_BLOCK", "GROUP_BLOCKS", "ManifestFile"]
