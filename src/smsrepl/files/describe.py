"""The receiver's listing of its tree: TREE_DATA frames, made as the sender asked.

A receiver describes its target tree (:func:`describe_tree`) before a round or a
check: every entry as a wire record (files.wire), with content digests for a
check; the sender receives it as a files.listing.Listing. With the native kernels
the frames go a whole directory at a time, breadth first, and can stream while
the receiver still lists.
"""
from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Iterator

from smsrepl import kernels
from smsrepl.codec import Compressor
from smsrepl.files import wire as W
from smsrepl.files.digests import content_digest, records_with_digests
from smsrepl.files.dirscan import scan_dirs, without_temporaries
from smsrepl.files.listing import order_key
from smsrepl.files.names import TEMP_RE, remove_temporaries
from smsrepl.files.scan import root_entry, walk
from smsrepl.protocol import frames as F

#: records per TREE_DATA of a streamed listing (~1,500 entries): the sender starts early
STREAM_BATCH = 128 << 10


def describe_tree(root: str | bytes, *, checksum: bool = False, compressor: Compressor | None = None,
                  stream: bool = False, dirs: Iterable[tuple[bytes, bool]] | None = None,
                  keep_temporaries: bool = False) -> Iterator[F.TreeData]:
    """TREE_DATA frames listing every entry under ``root`` (with content digests when asked).
    Temporaries a killed round left (names.TEMP_RE) are removed first, and not listed.

    With the native kernels and no digests, a directory's records are made in one call
    (files.dirscan), which also finds the temporaries (no walk of its own); the root's own
    entry is then not listed (nobody asks for it). The frames are then ordered (whole
    directories, breadth first), and with ``stream`` (a sender that listed "tree-stream")
    they go every STREAM_BATCH bytes: the sender decides while this end still lists.

    ``dirs``: a TREE_SUBSET's (path, recursive) pairs, native kernels only: those directories'
    entries, and with recursive those of every directory below them; directories that are
    not there are left out.

    ``keep_temporaries``: leave the temporaries where they are (still not listed): a dry run
    changes nothing."""
    comp = compressor or Compressor(1)  # records compress well at the cheapest level
    top = os.fsencode(root)
    ordered = kernels.TREE and not checksum
    batch = STREAM_BATCH if ordered and stream else W.BATCH
    if keep_temporaries and not os.path.isdir(top):  # a dry run's target not made yet: empty
        yield _records(comp, [], last=True, ordered=ordered)
        return
    bodies: Iterable[bytes]
    if dirs is not None:
        subset = [without_temporaries(top, b, remove=not keep_temporaries)
                  for b in scan_dirs(top, on_error=lambda p, exc: None, start=normal_subset(dirs))]
        subset.sort(key=lambda b: order_key(b.rel))  # recursive ones interleave with the others by depth
        bodies = (b.records for b in subset)
    elif ordered:
        bodies = (without_temporaries(top, b, remove=not keep_temporaries).records
                  for b in scan_dirs(top, on_error=lambda p, exc: None))
    elif kernels.TREE:  # with digests: a directory's files read per call (a check's listing)
        root_rec = W.encode_entry(root_entry(top, xattrs=True))
        batches = (without_temporaries(top, b, remove=not keep_temporaries)
                   for b in scan_dirs(top, on_error=lambda p, exc: None))
        bodies = itertools.chain([root_rec], (records_with_digests(top, b.rel, b.records, b.names, b.kinds, b.ends)
                                              for b in batches))
    else:
        if not keep_temporaries:
            remove_temporaries(top)
        bodies = (W.encode_entry(e, content_digest(top, e.path) if checksum and e.kind == "file" else None)
                  for e in walk(top, xattrs=True, on_error=lambda p, exc: None)
                  if not (keep_temporaries and any(TEMP_RE.match(c) for c in e.path.split(b"/"))))
    parts: list[bytes] = []
    size = 0
    last = time.monotonic()
    for rec in bodies:
        parts.append(rec)
        size += len(rec)
        # a batch at least every KEEPALIVE seconds: a long checksum scan must not look idle
        if size >= batch or time.monotonic() - last >= W.KEEPALIVE:
            yield _records(comp, parts, last=False, ordered=ordered)
            parts, size, last = [], 0, time.monotonic()
    yield _records(comp, parts, last=True, ordered=ordered)


def normal_subset(dirs: Iterable[tuple[bytes, bool]]) -> list[tuple[bytes, bool]]:
    """(path, recursive) pairs without repeats and without what a recursive one covers,
    sorted in listing order (breadth first)."""
    want: dict[bytes, bool] = {}
    for path, rec in dirs:
        want[bytes(path)] = want.get(bytes(path), False) or bool(rec)
    roots = [p for p, r in want.items() if r]

    def below_a_root(path: bytes) -> bool:
        return any(path != d and (not d or path.startswith(d + b"/")) for d in roots)

    return sorted(((p, r) for p, r in want.items() if not below_a_root(p)), key=lambda pr: order_key(pr[0]))


def _records(comp: Compressor, parts: list[bytes], *, last: bool, ordered: bool) -> F.TreeData:
    body = b"".join(parts) or b"\0"  # never empty: an empty TREE_DATA carries one padding byte
    codec, payload = comp.encode(body)
    return F.TreeData(codec=codec, raw_len=len(body), payload=payload, last=last, ordered=ordered)

