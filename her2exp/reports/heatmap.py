"""A slide's tile scores painted over its thumbnail: where the model sees HER2+ tumour.

Each tile covers `read_size * downsample(level)` level-0 pixels from its (x, y); on a thumbnail
of downsample `down` that is a square of side `extent / down`. A pathologist reads the PNG beside
the QC thumbnail of `her2exp-tile`: same orientation, same scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from her2exp.core.fileio import atomic_write
from her2exp.slides.reader import Slide

THUMB_SIDE = 1024


def score_map(
    shape: tuple[int, int],
    down: float,
    tiles: pd.DataFrame,
    downsamples: tuple[float, ...],
    column: str = "prob_her2_pos",
) -> np.ndarray:
    """(h, w) float map of the tiles' `column` on the thumbnail grid, NaN where no tile was
    scored."""
    grid = np.full(shape, np.nan)
    extent = tiles["read_size"].to_numpy() * np.asarray(downsamples)[tiles["level"].to_numpy()]
    x0 = np.floor(tiles["x"].to_numpy() / down).astype(int)
    y0 = np.floor(tiles["y"].to_numpy() / down).astype(int)
    side = np.maximum(1, np.ceil(extent / down).astype(int))
    for x, y, s, p in zip(x0, y0, side, tiles[column].to_numpy(), strict=True):
        grid[max(0, y) : y + s, max(0, x) : x + s] = p
    return grid


def write_heatmap(
    slide: Slide,
    tiles: pd.DataFrame,
    out: Path,
    title: str,
    threshold: float | None = None,
    *,
    column: str = "prob_her2_pos",
    label: str = "P(HER2+) per tile",
) -> Path:
    """The thumbnail with the tiles' `column` in [0, 1] over it (0 blue - 1 red), a colour bar
    and the threshold (MIL attention maps pass their own column and label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thumb, down = slide.thumbnail(THUMB_SIDE)
    grid = score_map(thumb.shape[:2], down, tiles, slide.level_downsamples, column)
    h, w = thumb.shape[:2]
    fig, ax = plt.subplots(figsize=(8, 8 * h / w + 0.6), dpi=100)
    ax.imshow(thumb)
    shown = ax.imshow(np.ma.masked_invalid(grid), cmap="coolwarm", vmin=0, vmax=1, alpha=0.55)
    bar = fig.colorbar(shown, ax=ax, fraction=0.04, pad=0.02, label=label)
    if threshold is not None:
        bar.ax.axhline(threshold, color="black", linewidth=1.5)
    ax.set_title(title)
    ax.set_axis_off()
    fig.tight_layout()
    try:
        return atomic_write(out, lambda fh: fig.savefig(fh, format="png"))
    finally:
        plt.close(fig)
