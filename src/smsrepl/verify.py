"""Consistency checks: compare a source with its copy and report in the 5.4.13 shape."""
from __future__ import annotations

from collections.abc import Callable

from smsrepl.blocks import imagecompare
from smsrepl.consistency import entry, result_body


def compare_block_images(source_path: str, target_path: str, *, max_ranges: int = 1000,
                         on_progress: Callable[[int, int, int], None] | None = None) -> tuple[dict, bool]:
    """Compare two images or devices byte for byte, 4 KiB block by block.

    Returns a consistency result (5.4.13: ``finished_time``, ``check_result``,
    ``consistency_result`` with one entry whose "files" are 4 KiB blocks) plus
    ``different_ranges`` as ``[offset, length]`` pairs (the first ``max_ranges`` runs of
    differing blocks, merged, then the part a shorter target lacks), and whether they match.
    A target larger than the source is compared over the source's size. ``on_progress(bytes
    compared, bytes to compare, blocks found different)``: about every second (imagecompare.compare).
    """
    with imagecompare.open_side(source_path, "source") as src, imagecompare.open_side(target_path, "target") as dst:
        diff = imagecompare.compare(src, dst, max_ranges=max_ranges, on_progress=on_progress)
    result = result_body([entry(target_path, diff.blocks, different=diff.different, missing=diff.missing)])
    result["different_ranges"] = diff.ranges
    return result, diff.same
