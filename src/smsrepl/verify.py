"""Consistency checks: compare a source with its copy and report in the 5.4.13 shape."""
from __future__ import annotations

import time

import numpy as np

from .blocks.device import BlockSource
from .blocks.direct import aligned_buffer
from .blocks.manifest import FINE_BLOCK, runs_of

CHUNK = 8 << 20


def compare_block_images(source_path: str, target_path: str, *, max_ranges: int = 1000) -> tuple[dict, bool]:
    """Compare two images or devices byte for byte, 4 KiB block by block.

    Returns a consistency result (5.4.13: ``finished_time``, ``check_result``,
    ``consistency_result`` with one entry whose "files" are 4 KiB blocks) plus
    ``different_ranges`` as ``[offset, length]`` pairs, and whether they match.
    A target larger than the source is compared over the source's size.
    """
    with BlockSource(source_path) as src, BlockSource(target_path, role="target") as dst:
        nblocks = -(-src.size // FINE_BLOCK)
        covered = min(src.size, dst.size)
        missing = nblocks - (-(-covered // FINE_BLOCK)) if dst.size < src.size else 0
        a, b = aligned_buffer(CHUNK), aligned_buffer(CHUNK)  # both read with O_DIRECT
        different = 0
        ranges: list[list[int]] = []
        pos = 0
        while pos < covered:
            n = min(CHUNK, covered - pos)
            src.readinto(memoryview(a)[:n], pos)
            dst.readinto(memoryview(b)[:n], pos)
            if memoryview(a)[:n] != memoryview(b)[:n]:
                full = n // FINE_BLOCK * FINE_BLOCK
                va = np.frombuffer(a, dtype=np.uint8, count=n)
                vb = np.frombuffer(b, dtype=np.uint8, count=n)
                mask = (va[:full] != vb[:full]).reshape(-1, FINE_BLOCK).any(axis=1)
                if full < n:
                    mask = np.append(mask, bool((va[full:] != vb[full:]).any()))
                different += int(mask.sum())
                for first, count in runs_of(mask, pos // FINE_BLOCK):
                    if len(ranges) < max_ranges:
                        ranges.append([first * FINE_BLOCK, min(count * FINE_BLOCK, src.size - first * FINE_BLOCK)])
            pos += n
        if missing:
            ranges.append([covered, src.size - covered])
    consistent = different == 0 and missing == 0
    result = {
        "finished_time": int(time.time() * 1000),
        "check_result": "consistent" if consistent else "inconsistent",
        "consistency_result": [{
            "dir_check": target_path,
            "num_total_files": nblocks,
            "num_different_files": different,
            "num_target_miss_files": missing,
            "num_target_more_files": 0,
        }],
        "different_ranges": ranges,
    }
    return result, consistent
