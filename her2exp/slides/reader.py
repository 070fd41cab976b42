"""One whole-slide image opened for reading, through OpenSlide or tiffslide (one interface).

Why a wrapper: the tiler and the slide datasets need the same few things (level geometry, the
physical resolution, an RGB region, a thumbnail), the same refusals (no resolution, not a slide,
damaged) worded once with the slide named, and a record of the slide that keeps patient data out:
vendor, dimensions, levels, mpp and the reader only, never a label or macro image or the
free-text properties where scanners put case numbers.

Two backends behind it (`reader=`, `tiles.reader`): OpenSlide (SVS, NDPI, MIRAX, SCN, generic
tiled TIFF, ...) and tiffslide (tifffile + zarr: any tiled or stripped TIFF tifffile reads, and
OME-TIFF with its pyramid in SubIFDs and its resolution in OME PhysicalSizeX/Y). `auto` takes
tiffslide for an OME-TIFF (OpenSlide opens one as a single-level generic TIFF, blind to its
SubIFD levels and to OME's resolution), else OpenSlide where it opens the file (it knows the
vendor formats and their quirks and is the reference decoder), else tiffslide for a TIFF that
OpenSlide refuses (e.g. untiled). Whichever reads, regions are the same: outside the scan is
white, and on a plain tiled TIFF both return the same pixels where the level-0 coordinates fall
on a level's pixels (every tile of a grid does; between, OpenSlide interpolates a sub-pixel
shift and tiffslide takes the pixel at or before).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from her2exp.config.choices import READERS  # tiles.reader, checked before a slide is opened

#: OME length units -> micrometres (OME's default unit is the micrometre).
OME_UNITS = {
    "pm": 1e-6,
    "nm": 1e-3,
    "µm": 1.0,
    "μm": 1.0,
    "um": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}


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
    reader: str  # openslide | tiffslide: the backend that read it


def on_white(rgba: np.ndarray) -> np.ndarray:
    """RGB uint8 of an RGBA region composited on white (transparent = no data = glass).

    In integers, (rgb * a + 255 * (255 - a)) / 255 rounded: the float form's result for every
    (rgb, a) at 2 bytes a channel where the float form held 12 (a 24,576 px level's read held
    GBs of it), and no arithmetic at all where the region is opaque (nearly always)."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:4]
    if int(alpha.min()) == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


class _OpenSlideBackend:
    """openslide-python over the openslide-bin library (from PyPI, no system package)."""

    name = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise _Unsupported(str(path)) from exc
        except openslide.OpenSlideError as exc:
            raise SlideError(f"slide {path}: {exc}") from exc
        self.dimensions = tuple(self._osr.dimensions)
        self.level_dimensions = tuple(tuple(d) for d in self._osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        self.vendor = str(self._osr.properties.get("openslide.vendor", "unknown"))

    def mpp_xy(self) -> tuple[float, float] | None:
        props = self._osr.properties
        try:
            return float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
        except (KeyError, ValueError):
            return None

    def best_level(self, downsample: float) -> int:
        return int(self._osr.get_best_level_for_downsample(downsample))

    def read(self, x: int, y: int, level: int, size: tuple[int, int]) -> np.ndarray:
        return on_white(np.asarray(self._osr.read_region((x, y), level, size), dtype=np.uint8))

    def close(self) -> None:
        self._osr.close()


class _TiffSlideBackend:
    """tiffslide (tifffile + zarr, OpenSlide's API): TIFF and OME-TIFF, SubIFD pyramids."""

    name = "tiffslide"

    def __init__(self, path: Path) -> None:
        import tifffile
        import tiffslide

        try:
            self._ts = tiffslide.TiffSlide(str(path))
            props = self._ts.properties
            series = self._ts.ts_tifffile.series[props["tiffslide.series-index"]]
            self.dimensions = tuple(self._ts.dimensions)
            self.level_dimensions = tuple(tuple(d) for d in self._ts.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in self._ts.level_downsamples)
        except (tifffile.TiffFileError, NotImplementedError, KeyError, IndexError) as exc:
            raise _Unsupported(str(path)) from exc
        except (OSError, ValueError) as exc:  # a truncated file: IFDs past its end
            raise SlideError(f"slide {path}: truncated or damaged ({exc})") from exc
        _check_complete(path, series)
        shape = dict(zip(series.axes, series.shape, strict=True))
        samples = shape.get("S", shape.get("C", 1))
        if series.dtype != np.uint8 or samples not in (1, 3, 4):
            self._ts.close()
            raise SlideError(
                f"slide {path}: {samples} channel(s) of {series.dtype}, not an 8-bit RGB "
                "(brightfield) slide"
            )
        self.ome = bool(self._ts.ts_tifffile.is_ome)
        self.vendor = (
            "ome-tiff" if self.ome else str(props.get("tiffslide.vendor") or "generic-tiff")
        )

    def mpp_xy(self) -> tuple[float, float] | None:
        """OME PhysicalSizeX/Y where the file is OME (authoritative there), else what tiffslide
        read from the vendor's description or the TIFF resolution tags."""
        if self.ome:
            mpp = _ome_mpp(self._ts.ts_tifffile.ome_metadata)
            if mpp is not None:
                return mpp
        props = self._ts.properties
        try:
            return float(props["tiffslide.mpp-x"]), float(props["tiffslide.mpp-y"])
        except (KeyError, TypeError, ValueError):
            return None

    def best_level(self, downsample: float) -> int:
        return int(self._ts.get_best_level_for_downsample(downsample))

    def read(self, x: int, y: int, level: int, size: tuple[int, int]) -> np.ndarray:
        """The region, white outside the level (tiffslide pads with black)."""
        w, h = size
        region = np.asarray(self._ts.read_region((x, y), level, (w, h), as_array=True))
        if region.shape[-1] == 4:
            region = on_white(region)
        elif region.shape[-1] == 1:
            region = np.repeat(region, 3, axis=-1)
        region = np.array(region, dtype=np.uint8)  # a writable copy
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        x0, y0 = int(x / ds), int(y / ds)  # tiffslide's own level-0 -> level mapping
        cols, rows = np.arange(x0, x0 + w), np.arange(y0, y0 + h)
        region[(rows < 0) | (rows >= lh)] = 255
        region[:, (cols < 0) | (cols >= lw)] = 255
        return region

    def close(self) -> None:
        self._ts.close()


def _check_complete(path: Path, series: Any) -> None:
    """Every level's tile data inside the file: tifffile opens a truncated TIFF without a
    word (and reads its missing tiles as black), so the cut is found here, at open."""
    size = path.stat().st_size
    for level in series.levels:
        for page in level.pages:
            ends = (
                []
                if page is None
                else [o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=True)]
            )
            if not ends or max(ends) > size:
                raise SlideError(
                    f"slide {path}: truncated or damaged (tile data past the end of the file)"
                )


class _Unsupported(Exception):
    """A backend does not know the file's format (auto tries the next)."""


def _ome_mpp(xml: str | None) -> tuple[float, float] | None:
    """(x, y) um per pixel of the first OME Image's Pixels, None where either size is absent."""
    if not xml:
        return None
    from tifffile import xml2dict

    image = xml2dict(xml).get("OME", {}).get("Image", {})
    pixels = (image[0] if isinstance(image, list) else image).get("Pixels", {})
    sizes = []
    for axis in ("X", "Y"):
        value, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if value is None or unit not in OME_UNITS:
            return None
        sizes.append(float(value) * OME_UNITS[unit])
    return sizes[0], sizes[1]


def _is_ome(path: Path) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome)
    except Exception:  # noqa: BLE001 - not a TIFF (or unreadable): the readers will say
        return False


def open_backend(path: Path, reader: str) -> _OpenSlideBackend | _TiffSlideBackend:
    """The backend `reader` names; `auto` as the module docstring says (and why)."""
    if reader not in READERS:
        raise SlideError(f"slide {path}: reader={reader!r} is not allowed ({', '.join(READERS)})")
    order = {"openslide": [_OpenSlideBackend], "tiffslide": [_TiffSlideBackend]}.get(reader)
    if order is None:
        order = [_TiffSlideBackend] if _is_ome(path) else [_OpenSlideBackend, _TiffSlideBackend]
    for backend in order:
        try:
            return backend(path)
        except _Unsupported:
            continue
    names = " or ".join("OpenSlide" if b is _OpenSlideBackend else "tiffslide" for b in order)
    raise SlideError(
        f"slide {path}: not a slide {names} can open (unsupported format, truncated or damaged)"
    )


class Slide:
    """An open slide: `read` regions, a `thumbnail`, the `info` to record; close it when done.

    `reader`: auto | openslide | tiffslide (the module docstring says what auto picks and why);
    `self.reader` is the backend that opened it."""

    def __init__(
        self, path: str | Path, assume_mpp: float | None = None, reader: str = "auto"
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SlideError(f"slide {self.path}: no such file")
        self._backend = open_backend(self.path, reader)
        self.reader: str = self._backend.name
        try:
            self.mpp, self.mpp_assumed = self._resolution(assume_mpp)
        except SlideError:
            self._backend.close()
            raise

    def _resolution(self, assume_mpp: float | None) -> tuple[float, bool]:
        mpp_x, mpp_y = self._backend.mpp_xy() or (math.nan, math.nan)
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
        return self._backend.dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._backend.level_downsamples

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def read(self, x: int, y: int, level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of `size` (w, h) at `level`, its top left at level-0 (x, y).

        Outside the slide, and where a scanner left no data, is white (as glass). A region
        that does not fit in memory is refused with its size, never with an empty reason."""
        w, h = int(size[0]), int(size[1])
        try:
            return self._backend.read(int(x), int(y), int(level), (w, h))
        except MemoryError as exc:  # its str is often empty: say what did not fit
            reason = f"out of memory reading {w} x {h} px at level {level} "
            reason += f"({w * h * 3 / 2**20:,.0f} MiB as RGB)" + (f": {exc}" if str(exc) else "")
            raise SlideError(f"slide {self.path}: region ({x}, {y}) unreadable: {reason}") from exc
        except Exception as exc:  # noqa: BLE001 - a damaged tile: one line naming the slide
            reason = str(exc) or type(exc).__name__  # never an empty reason
            raise SlideError(f"slide {self.path}: region ({x}, {y}) unreadable: {reason}") from exc

    def level0_row(self, level: int, row: int) -> int:
        """The level-0 y of a read at `level` that starts on its row `row`: tiffslide floors
        y / downsample; OpenSlide interpolates between rows, least where y / downsample is
        nearest `row` (not at all where the downsample is a whole number)."""
        down = self.level_downsamples[level]
        if self.reader == "openslide":
            return round(row * down)
        y = math.ceil(row * down)
        return y + (int(y / down) < row)  # where the product rounded up to a whole number

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """(RGB thumbnail whose longer side is at most `max_side`, its downsample from level 0).

        The level nearest above it is read in strips of about `BLOCK_PIXELS` at most, each
        reduced as it comes (`reduce_level`): a slide without a pyramid is level 0 alone, and
        a read of all of it would hold many GB (times `tiles.processes`)."""
        width, height = self.dimensions
        scale = max(width, height) / max_side
        level = self._backend.best_level(max(scale, 1.0))
        lw, lh = self._backend.level_dimensions[level]
        size = (lw, lh)
        if max(lw, lh) > max_side:
            size = (max(1, round(width / scale)), max(1, round(height / scale)))
        image = reduce_level(self, level, (lw, lh), size)
        return image, width / image.shape[1]

    def thumbnail_at(self, mpp: float) -> tuple[np.ndarray, float]:
        """A thumbnail at about `mpp` um per pixel (never finer than level 0)."""
        width, height = self.dimensions
        return self.thumbnail(math.ceil(max(width, height) / max(1.0, mpp / self.mpp)))

    def info(self) -> SlideInfo:
        width, height = self.dimensions
        downsamples = self.level_downsamples
        return SlideInfo(
            self._backend.vendor,
            width,
            height,
            len(downsamples),
            downsamples,
            self.mpp,
            self.mpp_assumed,
            self.reader,
        )

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


#: The level pixels a thumbnail reads at once (24 MiB as RGB; OpenSlide's read holds about 11
#: bytes a pixel while it decodes): what bounds a thumbnail's memory, whatever the slide's size
#: (140 MiB over the process's own through OpenSlide, 90 through tiffslide, for the two
#: thumbnails of her2exp-tile on a 24,576 px slide without a pyramid; a whole read: 21 GB, 4 GB).
BLOCK_PIXELS = 2**23


def reduce_level(
    slide: Slide,
    level: int,
    src: tuple[int, int],
    out: tuple[int, int],
    budget: int = BLOCK_PIXELS,
) -> np.ndarray:
    """`level` (`src` = its (width, height)) reduced to `out` (w, h): PIL's BOX resize of the
    whole level, holding no more of it at once than a strip of `budget` pixels.

    A level that small is read whole and resized by PIL, as thumbnails always were (a
    pyramid's level above a thumbnail usually is that small). A larger one is read in
    full-width strips of whole thumbnail rows (never fewer level rows than one thumbnail row
    averages), each reduced across by PIL (its first pass works row by row: these are the rows
    it makes of the whole level) and down by `_box_down`, PIL's second pass redone with PIL's
    own coefficients (`_box_rows`): the very pixels of the whole resize wherever the strips
    hold the level's own rows, i.e. at level 0, at any level through tiffslide and at
    OpenSlide's levels of a whole-number downsample. (PIL on each strip with a `box` would
    not do: its float32 box edges move a level row that sits on a thumbnail row's edge to the
    next thumbnail row.) At an OpenSlide level of a fractional downsample, a strip that does
    not start at the top starts between two level rows, which OpenSlide interpolates (up to
    1 / (2 downsample) of a row: at 2.001 up to 45 grey levels on the embedded texture, at
    whole-number downsamples none)."""
    from PIL import Image

    (lw, lh), (tw, th) = src, out
    if lw * lh <= budget:
        image = slide.read(0, 0, level, src)
        return image if out == src else np.asarray(Image.fromarray(image).resize(out, Image.BOX))
    rows = _box_rows(lh, th)
    per_strip = max(1, int((budget / lw - 2) * th / lh))
    thumb = np.empty((th, tw, 3), dtype=np.uint8)
    for j0 in range(0, th, per_strip):
        part = rows[j0 : j0 + per_strip]
        y0, y1 = int(part[0, 0]), int(part[-1, 1])
        strip = slide.read(0, slide.level0_row(level, y0), level, (lw, y1 - y0))
        if tw != lw:
            strip = np.asarray(Image.fromarray(strip).resize((tw, y1 - y0), Image.BOX))
        thumb[j0 : j0 + len(part)] = _box_down(strip, part - [y0, y0, 0])
    return thumb


def _box_down(strip: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """PIL's vertical BOX pass (ImagingResampleVertical_8bpc) over `strip`: thumbnail row j is
    the sum of its rows rows[j, 0]:rows[j, 1] times the 22-bit weight rows[j, 2], rounded."""
    out = np.empty((len(rows), *strip.shape[1:]), dtype=np.uint8)
    for j, (first, end, weight) in enumerate(rows.tolist()):
        total = strip[first:end].sum(axis=0, dtype=np.int64)
        out[j] = np.clip((total * weight + (1 << 21)) >> 22, 0, 255)
    return out


def _box_rows(n_src: int, n_out: int) -> np.ndarray:
    """(first, end, 22-bit weight) of the source rows PIL's BOX averages into each of `n_out`
    rows: Pillow's precompute_coeffs and normalize_coeffs_8bpc with the same doubles (a
    pixel whose centre sits on a box edge goes where its floating point puts it)."""
    scale = float(np.float32(n_src)) / n_out  # Pillow takes the box edges as float32
    filterscale = max(scale, 1.0)
    support, ss = 0.5 * filterscale, 1.0 / filterscale
    rows = np.zeros((n_out, 3), dtype=np.int64)
    for j in range(n_out):
        center = (j + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_src)
        inside = [x for x in range(lo, hi) if -0.5 < (x - center + 0.5) * ss <= 0.5]
        rows[j] = inside[0], inside[-1] + 1, int(0.5 + (1.0 / len(inside)) * (1 << 22))
    return rows
