"""Block sources and targets, manifests and their diff."""
from smsrepl.blocks.device import BlockSource, BlockTarget
from smsrepl.blocks.manifest import FINE_BLOCK, GROUP_BLOCKS, ManifestFile

__all__ = ["BlockSource", "BlockTarget", "FINE_BLOCK", "GROUP_BLOCKS", "ManifestFile"]
