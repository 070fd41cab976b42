"""Slide reading speed (issue 17): tiles/s from slides vs memory, tiling slides/min.

Why it exists: a run over slides (`data=slides`) reads, decodes and resizes every tile in the
DataLoader workers, so a worker's tiles/s against the same tiles from memory (what
`data.cache=true` pays per tile) says how many workers keep a GPU fed; and `her2exp-tile` must
keep up with a scanner's output (slides per minute). Measured here, once, never asserted by the
tests (they check what each figure counts):

- (a) tiles/s of one worker: 224 px tiles at 0.5 um/px over the tissue of an embedded slide
  (JPEG tiles), read + decoded (+ resized) through each reader, against the same tiles cropped
  (+ resized alike) from the slide's level-0 array in memory. Two scans: 0.25 um/px with 4x
  levels as in Aperio SVS (the 0.5 um/px tile is read at 448 px and reduced) and 0.5 um/px
  (read at the native level, no resize).
- (b) tiling: `her2exp.apps.tile.tile_one` (mask, grid, QC image, per-slide Parquet) on one
  20,000 x 20,000 px slide at 0.5 um/px, 224 px tiles. The slide is one rendered 2,048 px block
  repeated, streamed to disk (`synthetic.write_repeated_slide`): rendering 20,000 px a side
  through `make_cohort` needs several GB and minutes. Writing it is not timed.
- (c) `training_slides_vs_cache`: training images/s with `data=slides` (2 workers) vs the same
  tiles with `data.cache=true` (:mod:`her2exp.bench.slide_train`; goal >= 0.9x).

    python -m her2exp.bench.slides [--rounds 3] [--side 6144] [--big 20000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from her2exp.bench.stain import _time_rounds
from her2exp.data.synthetic_slides import (
    render_slide,
    tissue_cells,
    write_repeated_slide,
    write_slide,
)
from her2exp.slides.reader import Slide
from her2exp.slides.tiling import choose_level, read_tile, resize_tile, tile_grid, tissue_mask

TILE_MPP, TILE_SIZE = 0.5, 224
READERS = ("openslide", "tiffslide")
#: (label, scan mpp, reduction between levels)
SCANS = (("resize: 0.25 um/px scan, 4x levels", 0.25, 4), ("native: 0.5 um/px scan", 0.5, 2))


@dataclass(frozen=True)
class TileRate:
    """One worker's tiles/s from a slide and from memory, over the same `tiles` tiles."""

    scan: str
    reader: str
    tiles: int
    read_size: int
    slide_per_second: float
    memory_per_second: float

    @property
    def ratio(self) -> float:
        return self.slide_per_second / self.memory_per_second


@dataclass(frozen=True)
class TilingRate:
    """`tile_one` on one slide: its seconds (median over rounds), tiles and slides/min."""

    width: int
    height: int
    tiles: int
    seconds: float

    @property
    def slides_per_minute(self) -> float:
        return 60.0 / self.seconds


def rendered_block(side: int = 2048, cell: int = 128, seed: int = 0) -> np.ndarray:
    """A (side, side, 3) uint8 piece of an embedded slide: IHC tissue cells on glass."""
    from her2exp.data import synthetic

    rng = np.random.default_rng(seed)
    mask = tissue_cells(rng, side // cell, side // cell)
    data = synthetic.generate(
        n_patients=2, patches_per_patient=int(mask.sum()), image_size=cell, seed=seed
    )
    return render_slide(data.images[: int(mask.sum())], mask, cell, rng)


def tissue_tiles(slide: Slide, mpp: float = TILE_MPP, size: int = TILE_SIZE):  # noqa: ANN201
    """(level choice, [(x, y), ...]) of the grid's tiles over tissue, as her2exp-tile finds them."""
    thumb, down = slide.thumbnail_at(8.0)
    choice = choose_level(slide, mpp, size)
    grid = tile_grid(slide, tissue_mask(thumb), down, choice, 0.5)
    return choice, list(zip(grid["x"].tolist(), grid["y"].tolist(), strict=True))


def from_slide(slide: Slide, choice, coords, size: int = TILE_SIZE) -> list[np.ndarray]:  # noqa: ANN001
    """The tiles read, decoded and resized through `slide` (what a DataLoader worker does)."""
    return [read_tile(slide, x, y, choice.level, choice.read_size, size) for x, y in coords]


def from_memory(image: np.ndarray, choice, coords, size: int = TILE_SIZE) -> list[np.ndarray]:  # noqa: ANN001
    """The same tiles cropped from the level-0 array and resized alike (no read, no decode),
    each a copy of its own, as a dataset hands it to the collate function."""
    step = choice.step
    return [np.array(resize_tile(image[y : y + step, x : x + step], size)) for x, y in coords]


def tile_rates(
    image: np.ndarray, folder: Path, rounds: int, compression: str = "jpeg"
) -> list[TileRate]:
    """(a): each scan written from `image`, each reader against memory."""
    rates = []
    for label, mpp, factor in SCANS:
        path = write_slide(
            folder / f"scan_{mpp}.tiff", image, mpp, compression=compression, factor=factor
        )
        for reader in READERS:
            with Slide(path, reader=reader) as slide:
                choice, coords = tissue_tiles(slide)
                seconds = _time_rounds(
                    {
                        "slide": lambda s=slide, c=choice, xy=coords: from_slide(s, c, xy),
                        "memory": lambda c=choice, xy=coords: from_memory(image, c, xy),
                    },
                    rounds,
                )
            n = len(coords)
            rates.append(
                TileRate(
                    label, reader, n, choice.read_size, n / seconds["slide"], n / seconds["memory"]
                )
            )
    return rates


def tiling_rate(path: Path, out: Path, rounds: int) -> TilingRate:
    """(b): seconds of `tile_one` (what her2exp-tile runs per slide) at 0.5 um/px, 224 px."""
    from her2exp.apps.tile import SlideJob, tile_one
    from her2exp.config.commands import TilesConfig
    from her2exp.slides.signature import slide_signature

    tiles = OmegaConf.structured(TilesConfig(mpp=TILE_MPP, size=TILE_SIZE))
    job = SlideJob("bench", str(path), 0, "0", "bench", "site", "", None, slide_signature(path))
    seconds, rows = [], {}
    for _ in range(rounds):
        start = time.perf_counter()
        rows = tile_one(job, tiles, out)
        seconds.append(time.perf_counter() - start)
    return TilingRate(rows["width"], rows["height"], rows["tiles"], statistics.median(seconds))


def training_slides_vs_cache(rounds: int) -> dict[str, float]:
    """(c) training images/s reading tiles from the slides (2 workers) vs the same tiles in
    memory (`data.cache=true`): :mod:`her2exp.bench.slide_train`."""
    from her2exp.bench import slide_train

    return slide_train.main(["--rounds", str(rounds)])


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run (a), (b) and (c); print one line per figure; return them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--side", type=int, default=6144, help="(a): slide side in px")
    parser.add_argument("--big", type=int, default=20000, help="(b): slide side in px")
    parser.add_argument("--block", type=int, default=2048, help="rendered block side in px")
    parser.add_argument("--compression", default="jpeg", choices=["jpeg", "zlib"])
    args = parser.parse_args(argv)
    block = rendered_block(args.block)
    reps = -(-args.side // args.block)
    image = np.ascontiguousarray(np.tile(block, (reps, reps, 1))[: args.side, : args.side])
    with tempfile.TemporaryDirectory(prefix="her2exp-bench-slides-") as tmp:
        folder = Path(tmp)
        print(
            f"bench: slide tiles, {TILE_SIZE} px at {TILE_MPP} um/px over tissue of a "
            f"{args.side} px slide, one worker, {args.compression} tiles"
        )
        rates = tile_rates(image, folder, args.rounds, args.compression)
        for r in rates:
            print(
                f"  {r.scan} (read {r.read_size} px) {r.reader}: {r.tiles} tiles, slide "
                f"{r.slide_per_second:.0f} tiles/s, memory {r.memory_per_second:.0f} tiles/s, "
                f"ratio {r.ratio:.3g}"
            )
        big = write_repeated_slide(
            folder / "big.tiff", block, (args.big, args.big), TILE_MPP, compression=args.compression
        )
        tiling = tiling_rate(big, folder / "tiled", args.rounds)
        print(
            f"bench: tiling a {tiling.width} x {tiling.height} px slide at {TILE_MPP} um/px, "
            f"{TILE_SIZE} px tiles (tile_one): {tiling.tiles} tiles in {tiling.seconds:.2f} s, "
            f"{tiling.slides_per_minute:.1f} slides/min"
        )
    return {"tiles": rates, "tiling": tiling, "training": training_slides_vs_cache(args.rounds)}


if __name__ == "__main__":
    main()
