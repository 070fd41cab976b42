"""Image decoding: a PNG, JPEG or TIFF file's bytes -> one 8-bit RGB patch, as training sees it.

One home for the decode, so a file read by the loader, by `data.cache=false` workers, by
`her2exp-predict` and by the server becomes exactly the same pixels. RGBA is composited on
white (transparent tile padding is background), grayscale, palette and CMYK images are converted
to RGB, and a patch is resized (bilinear) only when its size differs from `data.image_size`;
each conversion is returned as a note, which the loader counts. `whole_slide` tells a
whole-slide image (a pyramidal TIFF) from a patch by its headers, so it is not decoded as one.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

_CONVERTED = {
    "RGBA": "RGBA converted to RGB (alpha composited on white)",
    "LA": "grayscale+alpha converted to RGB (alpha composited on white)",
    "PA": "palette+alpha converted to RGB (alpha composited on white)",
    "L": "grayscale converted to RGB",
    "1": "1-bit converted to RGB",
    "P": "palette image converted to RGB",
    "CMYK": "CMYK converted to RGB",
    "YCbCr": "YCbCr converted to RGB",
    "LAB": "LAB converted to RGB",
    "HSV": "HSV converted to RGB",
}


class ImageProblem(ValueError):
    """A file that cannot be used as an 8-bit RGB patch."""


class PatchReadError(RuntimeError):
    """A file that passed validation but cannot be read or decoded now (data.cache=false)."""


@contextlib.contextmanager
def _image_problems() -> Iterator[None]:
    """PIL's errors while opening or decoding -> ImageProblem naming what is wrong."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # set by some other library: would hide truncation
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on; truncated files would pass")
    try:
        yield
    except ImageProblem:
        raise
    except UnidentifiedImageError:
        raise ImageProblem("unreadable: not a PNG, JPEG or TIFF image") from None
    except (
        OSError,
        SyntaxError,
        ValueError,
        TypeError,
        EOFError,
        Image.DecompressionBombError,
    ) as exc:
        # TypeError: PIL's word for a TIFF page without ImageWidth/ImageLength ("Missing
        # dimensions"), met on a later page of a multi-page TIFF when its pages are counted.
        text = str(exc) or type(exc).__name__
        kind = "truncated" if "truncated" in text or isinstance(exc, EOFError) else "unreadable"
        raise ImageProblem(f"{kind} image: {text}") from None


def _mode_notes(im: Image.Image) -> list[str]:
    """The conversion an opened image's mode needs (from its header); not 8-bit: ImageProblem."""
    if im.mode == "RGB":
        return []
    if im.mode in _CONVERTED:
        return [_CONVERTED[im.mode]]
    raise ImageProblem(f"not an 8-bit image (PIL mode {im.mode}): export 8-bit RGB")


def _size_notes(width: int, height: int, size: int) -> list[str]:
    return (
        []
        if (width, height) == (size, size)
        else [f"resized from {width}x{height} to {size}x{size}"]
    )


def decode(data: bytes, size: int) -> tuple[np.ndarray, list[str]]:
    """Bytes of a PNG/JPEG/TIFF -> (size, size, 3) uint8 RGB and the conversions applied.

    Raises ImageProblem naming what is wrong (not an image, truncated, not 8-bit).
    """
    with _image_problems(), Image.open(io.BytesIO(data)) as im:
        notes = ["multi-page image: first page used"] if getattr(im, "n_frames", 1) > 1 else []
        im.load()
        notes += _mode_notes(im)
        mode = im.mode
        if mode == "RGB":
            rgb = im.copy()
        elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            rgb = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb.alpha_composite(rgba)
            rgb = rgb.convert("RGB")
        else:
            rgb = im.convert("RGB")
    notes += _size_notes(rgb.width, rgb.height, size)
    return resize_patch(np.array(rgb, dtype=np.uint8), size), notes


def resize_patch(rgb: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3), PIL bilinear, as training decodes a patch (unchanged
    when already that size): the one resize of files, served patches and predict."""
    if rgb.shape[:2] == (size, size):
        return rgb
    out = Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR)
    return np.array(out, dtype=np.uint8)  # a writable copy: torch.from_numpy takes it


def check_header(data: bytes, size: int) -> list[str]:
    """What `decode` would note, from the header alone (format, mode, size; no pixels decoded):
    `data.verify=header`. Catches a file that is not an image or not 8-bit; a truncated one
    passes (its pixels are never read) and fails when a worker decodes it."""
    with _image_problems(), Image.open(io.BytesIO(data)) as im:
        notes = ["multi-page image: first page used"] if getattr(im, "n_frames", 1) > 1 else []
        notes += _mode_notes(im)
        notes += _size_notes(*im.size, size)
    return notes


class FilePatches:
    """Patches decoded from their files when asked (`data.cache=false`), in the DataLoader
    workers: nothing decoded is held, so memory does not grow with the data set. The paths are
    one numpy bytes array (no Python object per row), cheap to pickle into workers and shared
    copy-on-write after a fork. Decoding is `decode`, exactly as the in-memory store's."""

    def __init__(self, paths: Any, image_size: int) -> None:
        self.paths = np.array([os.fsencode(str(p)) for p in paths], dtype=np.bytes_)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, row: int) -> np.ndarray:
        path = os.fsdecode(self.paths[row])
        try:
            data = Path(path).read_bytes()
            return decode(data, self.image_size)[0]
        except FileNotFoundError:
            problem = "missing file"
        except OSError as exc:
            problem = f"unreadable file: {exc.strerror or exc}"
        except ImageProblem as exc:
            problem = str(exc)
        raise PatchReadError(
            f"her2exp: {path}: {problem} (it passed the data check at the start of the run; "
            "data.cache=false reads patches while training: the file changed since)"
        )

    def read(self, row: int) -> torch.Tensor:
        # CHW laid out by numpy, once: a permuted view made contiguous by torch costs more.
        return torch.from_numpy(np.ascontiguousarray(self._decode(row).transpose(2, 0, 1)))

    def read_many(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.image_size, self.image_size, 3), dtype=np.uint8)
        for i, row in enumerate(rows):
            out[i] = self._decode(int(row))
        return out


#: The first four bytes of a TIFF (little/big-endian) and of a BigTIFF.
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: tifffile's vendor flags -> the format named in messages.
_SLIDE_FORMATS = {"svs": "Aperio SVS", "ndpi": "Hamamatsu NDPI", "scn": "Leica SCN",
                  "philips": "Philips TIFF", "bif": "Ventana BIF"}  # fmt: skip


def whole_slide(path: str | Path) -> str | None:
    """What a whole-slide image is ("pyramidal TIFF, 3 levels, 1024x768 px"), None for any
    other file. Why: a slide among patches decodes as one patch (its first page, resized) and
    would be scored as one; predict refuses it by this, before any patch is scored. Only the
    headers are read (tifffile, the slide reader's library); a TIFF tifffile cannot parse is
    None here and is left to the decoder to name."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
            if head not in _TIFF_MAGIC or _one_page(head, fh):
                return None
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            levels = len(series.levels)
            page = series.levels[0].keyframe
            width, height = int(page.imagewidth), int(page.imagelength)
            vendor = next((n for n in _SLIDE_FORMATS if getattr(tif, f"is_{n}", False)), None)
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads: the decoder will say
        return None
    if levels < 2 and vendor is None:
        return None
    kind = _SLIDE_FORMATS[vendor] if vendor else "pyramidal TIFF"
    return f"{kind}, {levels} level{'s' if levels != 1 else ''}, {width}x{height} px"


def _one_page(head: bytes, fh: Any) -> bool:
    """A classic TIFF of one page without SubIFDs: no pyramid can hide in it. Read from its
    first IFD alone, so a folder of TIFF patches costs a few bytes a file, not a tifffile
    parse (a BigTIFF, or anything short, is left to tifffile)."""
    if head[2:] not in (b"*\x00", b"\x00*"):
        return False
    end = "<" if head[:2] == b"II" else ">"
    (offset,) = struct.unpack(end + "I", fh.read(4))
    fh.seek(offset)
    count = fh.read(2)
    if len(count) < 2:
        return False
    (n,) = struct.unpack(end + "H", count)
    entries, following = fh.read(12 * n), fh.read(4)
    if len(entries) < 12 * n or len(following) < 4:
        return False
    tags = {struct.unpack_from(end + "H", entries, 12 * i)[0] for i in range(n)}
    return 330 not in tags and struct.unpack(end + "I", following)[0] == 0  # 330: SubIFDs


def read_patch(path: str | Path, size: int) -> np.ndarray:
    """One patch from disk exactly as training decodes it (what prediction should use too)."""
    return decode(Path(path).read_bytes(), size)[0]
