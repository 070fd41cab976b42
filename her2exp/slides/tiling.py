"""Where the tiles of a slide are: tissue mask on a thumbnail, a grid at a physical resolution.

The pieces `her2exp-tile` is built from (issue 17), each a pure function over a `Slide` or an
array: `tissue_mask` (Otsu on optical density, holes filled, specks dropped), `choose_level` (the
pyramid level at or just finer than the target mpp, and the region to read there), `tile_grid`
(level-0 coordinates of the tiles with enough tissue) and `read_tile` (one tile, resized to the
model's input size). Tiles are coordinates, never pixels: a manifest of 10^6 tiles stays small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from her2exp.slides.reader import Slide, SlideError

#: Levels whose mpp is within this of the target count as "at" it (scanners round their mpp).
MPP_TOLERANCE = 0.02


#: Glass transmits nearly everything: a mean optical density below this is never tissue.
GLASS_OD = 0.05


def tissue_mask(thumbnail: np.ndarray, min_object_fraction: float = 0.001) -> np.ndarray:
    """Tissue (True) on an RGB thumbnail at a few um per pixel (`tiles.mask_mpp`, where a pixel
    averages nuclei and cytoplasm): Otsu's threshold on the mean optical density after a 3-px
    median filter (saturation alone misses the pale counterstain of IHC), holes filled
    (lumens, fat), objects under `min_object_fraction` of the thumbnail dropped (dust, specks).
    Glass alone gives no tissue."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    od = -np.log((thumbnail.astype(np.float64) + 1.0) / 256.0).mean(axis=-1)
    od = ndimage.median_filter(od, size=3)
    if float(od.max()) < GLASS_OD or float(od.max() - od.min()) < 0.02:
        return np.zeros(od.shape, dtype=bool)
    mask = od > max(threshold_otsu(od), GLASS_OD)
    mask = ndimage.binary_fill_holes(mask)
    labels, _ = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())
    keep = sizes > max(1, int(min_object_fraction * mask.size))
    keep[0] = False  # the background label
    return keep[labels]


@dataclass(frozen=True)
class LevelChoice:
    """Read `read_size` level pixels at `level` for one tile of `size` px at the target mpp."""

    level: int
    read_size: int
    level_mpp: float
    step: int  # the tile's side in level-0 pixels (the grid's stride)


def choose_level(slide: Slide, target_mpp: float, size: int) -> LevelChoice:
    """The coarsest level at or finer than `target_mpp` (never coarser: detail lost there
    cannot be resized back); a target finer than level 0 reads level 0 and enlarges."""
    if not (target_mpp > 0 and math.isfinite(target_mpp)):
        raise SlideError(f"tiles.mpp={target_mpp}: a positive number of microns per pixel")
    candidates = [
        k
        for k in range(len(slide.level_downsamples))
        if slide.level_mpp(k) <= target_mpp * (1.0 + MPP_TOLERANCE)
    ]
    level = max(candidates, key=lambda k: slide.level_mpp(k)) if candidates else 0
    level_mpp = slide.level_mpp(level)
    read_size = max(1, round(size * target_mpp / level_mpp))
    step = max(1, round(size * target_mpp / slide.mpp))
    return LevelChoice(level, read_size, level_mpp, step)


def tile_grid(
    slide: Slide,
    mask: np.ndarray,
    mask_downsample: float,
    choice: LevelChoice,
    min_tissue: float,
) -> pd.DataFrame:
    """Tiles of a regular grid from the slide's top left, each with the fraction of its
    footprint the mask calls tissue; those under `min_tissue` are dropped."""
    width, height = slide.dimensions
    xs = np.arange(0, width - choice.step + 1, choice.step)
    ys = np.arange(0, height - choice.step + 1, choice.step)
    integral = np.pad(mask.astype(np.float64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    rows = []
    for y in ys:
        for x in xs:
            fraction = _mask_fraction(integral, x, y, choice.step, mask_downsample)
            if fraction >= min_tissue:
                rows.append((int(x), int(y), fraction))
    frame = pd.DataFrame(rows, columns=["x", "y", "tissue_fraction"])
    frame["level"] = choice.level
    frame["read_size"] = choice.read_size
    return frame


def _mask_fraction(integral: np.ndarray, x: int, y: int, step: int, down: float) -> float:
    """Mean of the mask over the level-0 square (x, y, step) mapped onto the mask's pixels."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    x0, y0 = min(w - 1, int(x / down)), min(h - 1, int(y / down))
    x1, y1 = (
        max(x0 + 1, min(w, math.ceil((x + step) / down))),
        max(y0 + 1, min(h, math.ceil((y + step) / down))),
    )
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return float(total) / ((x1 - x0) * (y1 - y0))


def read_tile(slide: Slide, x: int, y: int, level: int, read_size: int, size: int) -> np.ndarray:
    """One tile as (size, size, 3) uint8: the region at `level`, area-resized when needed."""
    return resize_tile(slide.read(x, y, level, (read_size, read_size)), size)


def resize_tile(region: np.ndarray, size: int) -> np.ndarray:
    """A square region at the model's input size: area mean when reducing, bilinear when
    enlarging, untouched when it is already `size`."""
    if region.shape[0] == size and region.shape[1] == size:
        return region
    from PIL import Image

    resample = Image.BOX if region.shape[0] > size else Image.BILINEAR
    return np.asarray(Image.fromarray(region).resize((size, size), resample))
