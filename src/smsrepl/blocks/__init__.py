"""Block sources and targets, manifests and their diff."""
from smsrepl.blocks.source import BlockSource
from smsrepl.blocks.target import BlockTarget
from smsrepl.blocks.manifest import GROUP_BLOCKS, ManifestFile
from smsrepl.kernels import FINE_BLOCK

__all__ = ["BlockSource", "BlockTarget", "FINE_BLOCK", "GROUP_BLOCKS", "ManifestFile"]
