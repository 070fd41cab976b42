"""Image decoding: a PNG, JPEG or TIFF file's bytes -> one 8-bit RGB patch, as training sees it.

One home for the decode, so a file read by the loader, by `data.cache=false` workers, by
`her2exp-predict` and by the server becomes exactly the same pixels. RGBA is composited on
white (transparent tile padding is background), grayscale, palette and CMYK images are converted
to RGB, and a patch is resized (bilinear) only when its size differs from `data.image_size`;
each conversion is returned as a note, which the loader counts.
"""

from __future__ import annotations

import contextlib
import io
import os
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
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
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


def read_patch(path: str | Path, size: int) -> np.ndarray:
    """One patch from disk exactly as training decodes it (what prediction should use too)."""
    return decode(Path(path).read_bytes(), size)[0]
