"""A slide file's identity by its content, cheap enough to take for every slide of a table.

Why: a slide is known to a table by its path and its id, and both lie. One scan copied under two
slide ids (or two patients) puts the same tissue in train and test; a scan replaced at the same
path after tiling gives training other pixels than the tiled coordinates were chosen on. Hashing
whole slides (gigabytes each) would take longer than tiling them, so the signature hashes what
any two different scans differ in and what a re-scan changes: the file size, its first and last
`EDGE_BYTES` (the TIFF header and directories, and the tail where the scanner writes its last
levels) and, for a TIFF, level 0's dimensions and the stored (still compressed) bytes of
`SAMPLED_TILES` tiles spread over it - tissue, not only the header a re-save might keep.

One function, used everywhere a slide is compared: `her2exp-tile` (duplicates in the table, a
slide changed since it was tiled), `data=slides` and predict on a tile manifest (the same checks
before training or scoring) and the data fingerprint a resume compares.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

EDGE_BYTES = 1 << 20  # from each end of the file
SAMPLED_TILES = 8  # stored tiles (or strips) of level 0, spread evenly over it
TILE_BYTES = 1 << 18  # at most this much of each sampled tile (a stripped TIFF has huge strips)
VERSION = "s1"  # a prefix: a signature from another recipe never equals this one's


def slide_signature(path: str | Path) -> str:
    """`s1:<sha256>` of the file's size, both ends and (a TIFF) level 0's shape and a sample of
    its stored tiles; OSError when the file cannot be read (the caller names the slide)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        digest.update(str(size).encode())
        fh.seek(0)
        digest.update(fh.read(EDGE_BYTES))
        fh.seek(max(0, size - EDGE_BYTES))
        digest.update(fh.read(EDGE_BYTES))
        shape, tiles = _sampled_tiles(Path(path))
        digest.update(str(shape).encode())
        for offset, count in tiles:
            fh.seek(offset)
            digest.update(fh.read(count))
    return f"{VERSION}:{digest.hexdigest()}"


def _sampled_tiles(path: Path) -> tuple[tuple[int, ...], list[tuple[int, int]]]:
    """(shape of the first page - level 0 of a TIFF slide -, (offset, byte count) of up to
    SAMPLED_TILES of its stored tiles); nothing for a file tifffile cannot parse (a vendor
    format that is not TIFF: its ends and size alone identify it)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            shape = tuple(int(v) for v in page.shape)
    except Exception:  # noqa: BLE001 - not a TIFF, or damaged: the readers will say which
        return (), []
    if not len(offsets):
        return shape, []
    picks = np.unique(np.linspace(0, len(offsets) - 1, SAMPLED_TILES).round().astype(int))
    return shape, [(int(offsets[i]), int(min(counts[i], TILE_BYTES))) for i in picks if counts[i]]
