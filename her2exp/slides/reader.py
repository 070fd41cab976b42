"""One whole-slide image opened for reading: OpenSlide (SVS, NDPI, MIRAX, generic tiled TIFF).

Why a wrapper: the tiler and the slide datasets need the same few things (level geometry, the
physical resolution, an RGB region, a thumbnail), the same refusals (no resolution, not a slide,
damaged) worded once with the slide named, and a record of the slide that keeps patient data out:
vendor, dimensions, levels and mpp only, never a label or macro image or the free-text
properties where scanners put case numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class SlideError(ValueError):
    """A slide that cannot be used, in one line naming it."""


@dataclass(frozen=True)
class SlideInfo:
    """What may be recorded of a slide (its ids may be pseudonyms; its properties may not be)."""

    vendor: str
    width: int
    height: int
    level_count: int
    level_downsamples: tuple[float, ...]
    mpp: float  # um per level-0 pixel (the mean of x and y)
    mpp_assumed: bool  # tiles.assume_mpp was used: the file holds no resolution


class Slide:
    """An open slide: `read` regions, a `thumbnail`, the `info` to record; close it when done."""

    def __init__(self, path: str | Path, assume_mpp: float | None = None) -> None:
        import openslide

        self.path = Path(path)
        if not self.path.is_file():
            raise SlideError(f"slide {self.path}: no such file")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideError(
                f"slide {self.path}: not a slide OpenSlide can open (unsupported format, "
                "truncated or damaged)"
            ) from exc
        except openslide.OpenSlideError as exc:
            raise SlideError(f"slide {self.path}: {exc}") from exc
        self.mpp, self.mpp_assumed = self._resolution(assume_mpp)

    def _resolution(self, assume_mpp: float | None) -> tuple[float, bool]:
        props = self._osr.properties
        try:
            mpp_x = float(props["openslide.mpp-x"])
            mpp_y = float(props["openslide.mpp-y"])
        except (KeyError, ValueError):
            mpp_x = mpp_y = math.nan
        if math.isfinite(mpp_x) and math.isfinite(mpp_y) and mpp_x > 0 and mpp_y > 0:
            return (mpp_x + mpp_y) / 2.0, False
        if assume_mpp is None:
            raise SlideError(
                f"slide {self.path}: its resolution (microns per pixel) is unknown; set "
                "tiles.assume_mpp=<um/px> if you know it"
            )
        return float(assume_mpp), True

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self._osr.dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._osr.level_downsamples)

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def read(self, x: int, y: int, level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of `size` (w, h) at `level`, its top left at level-0 (x, y).

        Outside the slide, and where a scanner left no data, is white (as glass)."""
        try:
            region = self._osr.read_region((int(x), int(y)), int(level), size)
        except Exception as exc:  # noqa: BLE001 - a damaged tile: one line naming the slide
            raise SlideError(f"slide {self.path}: region ({x}, {y}) unreadable: {exc}") from exc
        rgba = np.asarray(region, dtype=np.uint8)
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        return np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """(RGB thumbnail whose longer side is at most `max_side`, its downsample from level 0)."""
        width, height = self.dimensions
        scale = max(width, height) / max_side
        level = self._osr.get_best_level_for_downsample(max(scale, 1.0))
        lw, lh = self._osr.level_dimensions[level]
        image = self.read(0, 0, level, (lw, lh))
        if max(lw, lh) > max_side:
            from PIL import Image

            tw, th = max(1, round(width / scale)), max(1, round(height / scale))
            image = np.asarray(Image.fromarray(image).resize((tw, th), Image.BOX))
        return image, width / image.shape[1]

    def thumbnail_at(self, mpp: float) -> tuple[np.ndarray, float]:
        """A thumbnail at about `mpp` um per pixel (never finer than level 0)."""
        width, height = self.dimensions
        return self.thumbnail(math.ceil(max(width, height) / max(1.0, mpp / self.mpp)))

    def info(self) -> SlideInfo:
        width, height = self.dimensions
        vendor = str(self._osr.properties.get("openslide.vendor", "unknown"))
        downsamples = self.level_downsamples
        return SlideInfo(
            vendor, width, height, len(downsamples), downsamples, self.mpp, self.mpp_assumed
        )

    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
