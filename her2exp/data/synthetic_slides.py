"""Embedded whole-slide images: small pyramidal tiled TIFFs that OpenSlide reads, no download.

Why: slide reading, tissue masks, tiling and slide-level labels (issue 17) need real slide files
in tests and offline demos. Each slide is one patient of the embedded IHC generator
(`her2exp.data.synthetic`): its HER2 status, score and site colours, rendered as tissue cells on
a white glass background. The file holds level 0 and 2x-reduced levels as top-level
reduced-resolution IFDs (SubFileType 1), tiled, deflate- (exact) or JPEG-compressed, with
resolution tags in pixels per centimetre, so OpenSlide's generic-tiff reader reports the mpp.
Nothing else goes in: no label or macro image, no free-text description. Beside them:
`write_ome_slide` (an OME-TIFF, pyramid in SubIFDs, resolution in OME PhysicalSizeX/Y: what
tiffslide reads and OpenSlide does not) and `write_repeated_slide` (a large slide streamed from one
repeated block, for the benchmarks).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from her2exp.core.fileio import atomic_write, atomic_write_text, safe_name
from her2exp.data import synthetic

#: Glass without tissue: near-white with a little camera noise (what a scanner's background is).
BACKGROUND = (242, 240, 238)
COMPRESSIONS = ("zlib", "jpeg")


@dataclass(frozen=True)
class SlideCohort:
    """The slide table (what `her2exp-tile input=` reads) and, if asked, the level-0
    pixels and tissue-cell masks each slide was written from."""

    table: (
        pd.DataFrame
    )  # path (relative to the folder), slide_id, patient_id, label, her2_score, site
    images: dict[str, np.ndarray]  # slide_id -> (H, W, 3) uint8 level 0; empty unless kept
    tissue: dict[str, np.ndarray]  # slide_id -> (rows, cols) bool: cells that hold tissue
    cell: int  # side of one tissue cell, in level-0 pixels


def tissue_cells(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A tissue mask on the cell grid: the union of 1-3 ellipses, at least a quarter of the
    cells and never the whole slide (so masks and tile counts have something to find)."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64) + 0.5
    for _ in range(100):
        mask = np.zeros((rows, cols), dtype=bool)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0.25, 0.75) * rows, rng.uniform(0.2, 0.8) * cols
            ry, rx = rng.uniform(0.2, 0.45) * rows, rng.uniform(0.15, 0.4) * cols
            mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        if 0.25 <= mask.mean() <= 0.8:
            return mask
    raise RuntimeError("could not draw a tissue mask")  # pragma: no cover - 100 tries suffice


def render_slide(
    patches: np.ndarray, mask: np.ndarray, cell: int, rng: np.random.Generator
) -> np.ndarray:
    """Level 0: one rendered IHC patch per tissue cell (in row order), glass elsewhere."""
    rows, cols = mask.shape
    noise = rng.normal(0.0, 1.5, size=(rows * cell, cols * cell, 3))
    image = np.clip(np.asarray(BACKGROUND, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    for k, (r, c) in enumerate(zip(*np.nonzero(mask), strict=True)):
        image[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = patches[k]
    return image


def pyramid(image: np.ndarray, tile: int, factor: int = 2) -> list[np.ndarray]:
    """Level 0 and its `factor`x area-averaged reductions, down to one tile's size."""
    levels = [image]
    while min(levels[-1].shape[:2]) // factor >= tile:
        prev = levels[-1]
        h, w = (prev.shape[0] // factor) * factor, (prev.shape[1] // factor) * factor
        blocks = prev[:h, :w].reshape(h // factor, factor, w // factor, factor, 3)
        levels.append(np.rint(blocks.astype(np.float32).mean(axis=(1, 3))).astype(np.uint8))
    return levels


def _level_tags(k: int, level_mpp: float, tile: int, compression: str) -> dict:
    """One pyramid level's TIFF tags: tiled RGB, its resolution (what OpenSlide reports as
    mpp), a reduced-resolution image from level 1 on (top-level IFDs, as OpenSlide reads)."""
    per_cm = 1e4 / level_mpp
    return {
        "tile": (tile, tile),
        "compression": compression,
        "photometric": "rgb",
        "resolution": (per_cm, per_cm),
        "resolutionunit": "CENTIMETER",
        "subfiletype": 0 if k == 0 else 1,
        "metadata": None,
    }


def write_slide(
    path: str | Path,
    image: np.ndarray,
    mpp: float,
    tile: int = 256,
    compression: str = "zlib",
    factor: int = 2,
) -> Path:
    """A pyramidal tiled TIFF of `image` at `mpp` um/px, written atomically; `factor`: the
    reduction between levels (2; 4 as in Aperio SVS, so a 0.5 um/px tile of a 0.25 um/px scan
    is read at level 0 and resized)."""
    import tifffile

    if compression not in COMPRESSIONS:
        raise ValueError(f"compression={compression!r}: one of {', '.join(COMPRESSIONS)}")
    levels = pyramid(image, tile, factor)

    buffer = io.BytesIO()  # the embedded slides are a few MB; then one atomic write
    with tifffile.TiffWriter(buffer) as tif:
        for k, level in enumerate(levels):
            tif.write(level, **_level_tags(k, mpp * factor**k, tile, compression))
    return atomic_write(path, buffer.getvalue())


def write_repeated_slide(
    path: str | Path,
    block: np.ndarray,
    shape: tuple[int, int],
    mpp: float,
    tile: int = 256,
    compression: str = "jpeg",
    levels: int | None = None,
) -> Path:
    """A large pyramidal tiled TIFF (`shape` = (height, width)) of `block` repeated, streamed
    tile by tile (memory: the block's pyramid and one tile), written atomically; the file
    `write_slide` would write for the repeated image (a 20,000 px square one would need
    several GB and minutes through `make_cohort`, which is why the benchmark uses this).
    The block's sides must divide by 2 for every reduced level. `levels`: at most this many
    (1: a slide without a pyramid, as some exports are, which a thumbnail reads in strips)."""
    import tifffile

    if compression not in COMPRESSIONS:
        raise ValueError(f"compression={compression!r}: one of {', '.join(COMPRESSIONS)}")
    dims = [tuple(shape)]
    while min(dims[-1]) // 2 >= tile and len(dims) < (levels or len(dims) + 1):
        dims.append((dims[-1][0] // 2, dims[-1][1] // 2))
    if any(side % 2 ** (len(dims) - 1) for side in block.shape[:2]):
        raise ValueError(f"block {block.shape[:2]}: sides must divide by {2 ** (len(dims) - 1)}")
    blocks = pyramid(block, 1)[: len(dims)]

    def tiles(level: np.ndarray, height: int, width: int):  # noqa: ANN202 - a generator
        bh, bw = level.shape[:2]
        for y in range(0, height, tile):
            rows = (y + np.arange(tile)) % bh
            for x in range(0, width, tile):
                yield level[np.ix_(rows, (x + np.arange(tile)) % bw)]

    def write(fh) -> None:  # noqa: ANN001 - the open temporary file
        handle = tifffile.FileHandle(fh, mode="wb", name=Path(path).name)  # fh.name is an fd
        with tifffile.TiffWriter(handle, bigtiff=True) as tif:
            for k, ((height, width), level) in enumerate(zip(dims, blocks, strict=True)):
                tif.write(
                    tiles(level, height, width),
                    shape=(height, width, 3),
                    dtype=np.uint8,
                    **_level_tags(k, mpp * 2**k, tile, compression),
                )

    return atomic_write(path, write)


def write_ome_slide(
    path: str | Path,
    image: np.ndarray,
    mpp: float | None,
    tile: int = 256,
    compression: str = "zlib",
) -> Path:
    """An OME-TIFF of `image`: level 0 in the first IFD, its 2x reductions in SubIFDs, the
    resolution only as OME PhysicalSizeX/Y in micrometres (`mpp=None`: none at all), written
    atomically. OpenSlide sees one level of it and no resolution; tiffslide sees it all."""
    import tifffile

    if compression not in COMPRESSIONS:
        raise ValueError(f"compression={compression!r}: one of {', '.join(COMPRESSIONS)}")
    levels = pyramid(image, tile)
    metadata: dict[str, object] = {"axes": "YXS"}
    if mpp is not None:
        metadata |= {
            "PhysicalSizeX": mpp,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": mpp,
            "PhysicalSizeYUnit": "µm",
        }
    options = {"tile": (tile, tile), "compression": compression, "photometric": "rgb"}
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer, ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, metadata=metadata, **options)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, metadata=None, **options)
    return atomic_write(path, buffer.getvalue())


def make_cohort(
    out: str | Path,
    n_slides: int = 6,
    shape: tuple[int, int] = (1536, 2048),
    cell: int = 128,
    mpp: float = 0.5,
    sites: Sequence[str] = ("site_a", "site_b"),
    compression: str = "zlib",
    seed: int = 0,
    keep_images: bool = False,
) -> SlideCohort:
    """`n_slides` slides (one per patient, both HER2 classes, sites round robin within a class)
    and `out/slides.csv`; byte-identical for identical arguments."""
    height, width = shape
    if n_slides < 2:
        raise ValueError(f"n_slides={n_slides}: at least 2 (one HER2+ and one HER2-)")
    if height % cell or width % cell or min(height, width) < 2 * cell:
        raise ValueError(f"shape={shape}: multiples of cell={cell}, at least two cells a side")
    rng = np.random.default_rng(seed)
    rows, cols = height // cell, width // cell
    masks = [tissue_cells(rng, rows, cols) for _ in range(n_slides)]
    per_slide = max(int(m.sum()) for m in masks)
    data = synthetic.generate(
        n_patients=n_slides,
        patches_per_patient=per_slide,
        image_size=cell,
        sites=sites,
        positive_fraction=0.5,
        seed=seed,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows_out, images, tissue = [], {}, {}
    for i, mask in enumerate(masks):
        first = data.frame.iloc[i * per_slide]
        slide_id = str(first["slide_id"])
        image = render_slide(data.images[i * per_slide : (i + 1) * per_slide], mask, cell, rng)
        name = f"{safe_name(slide_id)}.tiff"
        write_slide(out / name, image, mpp, compression=compression)
        rows_out.append(
            {
                "path": name,
                "slide_id": slide_id,
                "patient_id": str(first["patient_id"]),
                "label": int(first["label"]),
                "her2_score": str(first["her2_score"]),
                "site": str(first["site"]),
            }
        )
        tissue[slide_id] = mask
        if keep_images:
            images[slide_id] = image
    table = pd.DataFrame(rows_out)
    atomic_write_text(out / "slides.csv", table.to_csv(index=False))
    return SlideCohort(table, images, tissue, cell)


def main(argv: list[str] | None = None) -> None:
    """`python -m her2exp.data.synthetic_slides OUT [--n-slides 20]`: the embedded slides of
    `make demo-slides`, with the slide table her2exp-tile reads."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out")
    parser.add_argument("--n-slides", type=int, default=20)
    parser.add_argument("--height", type=int, default=1536)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--compression", choices=("zlib", "jpeg"), default="jpeg")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cohort = make_cohort(
        args.out,
        n_slides=args.n_slides,
        shape=(args.height, args.width),
        compression=args.compression,
        seed=args.seed,
    )
    print(f"her2exp: {len(cohort.table)} embedded slides -> {Path(args.out) / 'slides.csv'}")


if __name__ == "__main__":
    main()
