"""`data=slides`: the tile manifest `her2exp-tile` wrote, read tile by tile from the slides.

The manifest holds coordinates, never pixels, so a cohort of 10^6 tiles costs a table in memory.
`SlideTiles` is the `PatchStore` over it: each process that reads (a DataLoader worker, the
main process for galleries) opens its own slide handles, at most `data.max_open_slides` at once
(least recently used closed first): an OpenSlide handle is not shared across a fork, and a
cohort has more slides than a process may keep open.

`load` checks the manifest and every slide it names before any training (missing or damaged
slides, tiles outside their slide, unknown labels, a patient in two splits) and lists every
problem at once, as the patch sources do; tiles inherit their slide's label and splits stay
patient-grouped. Each slide file is known by its content signature (`slides.signature`: size,
both ends, level 0's shape and a sample of its stored tiles; hashing whole slides would take
longer than training on them): a file changed since her2exp-tile recorded its signature is
refused (its tiles were chosen on another scan), one file under two slide ids is refused (its
tissue would sit in two slides, perhaps two splits), and the fingerprint a resume compares covers
the manifest and the signatures.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from her2exp.data import splits
from her2exp.data.sources.checks import structural_problems
from her2exp.data.sources.manifest import cv_ignores_column
from her2exp.data.sources.scan import SKIPPED_COLUMNS, DataValidationError
from her2exp.slides.reader import Slide, SlideError
from her2exp.slides.signature import slide_signature
from her2exp.slides.tiling import read_tile

REQUIRED = ("slide_id", "slide_path", "patient_id", "label", "x", "y", "level", "read_size")
#: The manifest columns a bundle keeps (coordinates travel to the prediction tables, heatmaps).
KEPT = (
    "slide_id", "slide_path", "patient_id", "label", "her2_score", "site", "split",
    "x", "y", "level", "read_size", "mpp", "tissue_fraction", "reader",
)  # fmt: skip
SETTINGS_FILE = "tiling.json"


class SlideTiles:
    """Tiles by manifest row, read and resized in the process that asks (a PatchStore)."""

    def __init__(
        self,
        frame: pd.DataFrame,
        size: int,
        max_open: int = 16,
        assume_mpp: float | None = None,
    ) -> None:
        codes, paths = pd.factorize(frame["slide_path"], sort=True)
        self.paths = np.asarray(paths, dtype=str)
        # The backend that tiled each slide reads it again (auto for an older manifest).
        readers = frame.groupby("slide_path")["reader"].first() if "reader" in frame else {}
        self.readers = np.asarray([readers.get(p, "auto") or "auto" for p in paths], dtype=str)
        self.slide_of = codes.astype(np.int32)
        self.xy = frame[["x", "y"]].to_numpy(np.int64)
        self.level = frame["level"].to_numpy(np.int16)
        self.read_size = frame["read_size"].to_numpy(np.int32)
        self.size = int(size)
        self.max_open = int(max_open)
        self.assume_mpp = assume_mpp
        self._open: OrderedDict[int, Slide] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.slide_of)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # handles stay in the process that opened them
        return state

    def _slide(self, index: int) -> Slide:
        if self._pid != os.getpid():  # a forked worker: the parent's handles are not ours
            self._open, self._pid = OrderedDict(), os.getpid()
        slide = self._open.get(index)
        if slide is not None:
            self._open.move_to_end(index)
            return slide
        while len(self._open) >= self.max_open:
            self._open.popitem(last=False)[1].close()
        # 1.0 stands in for an unknown resolution: reading needs none (levels, coordinates).
        slide = Slide(
            self.paths[index], assume_mpp=self.assume_mpp or 1.0, reader=str(self.readers[index])
        )
        self._open[index] = slide
        return slide

    def tile(self, row: int) -> np.ndarray:
        """One tile as uint8 (size, size, 3)."""
        x, y = self.xy[row]
        slide = self._slide(int(self.slide_of[row]))
        return read_tile(
            slide, int(x), int(y), int(self.level[row]), int(self.read_size[row]), self.size
        )

    def read(self, row: int) -> torch.Tensor:
        tile = self.tile(row)
        if not tile.flags.writeable:  # a PIL resize: a read-only view
            tile = tile.copy()
        return torch.from_numpy(tile).permute(2, 0, 1)

    def read_many(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.size, self.size, 3), dtype=np.uint8)
        # Slide by slide: each handle is opened once, whatever the cache size.
        for i in np.argsort(self.slide_of[rows], kind="stable"):
            out[i] = self.tile(int(rows[i]))
        return out

    def close(self) -> None:
        for slide in self._open.values():
            slide.close()
        self._open.clear()


@dataclass
class LoadedSlides:
    manifest: pd.DataFrame
    store: SlideTiles
    skipped: pd.DataFrame
    fingerprint: str


def tiling_settings(path: Path) -> dict[str, Any]:
    """The settings her2exp-tile recorded beside its manifest (empty when it was moved alone)."""
    file = path.parent / SETTINGS_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return {}


def read_tiles(path: Path, labelled: bool = True) -> pd.DataFrame:
    """The tile manifest, its required columns checked (a label only when `labelled`: a new
    cohort is predicted without one); slide paths resolved against it."""
    where = f"data.path={path}"
    if not path.is_file():
        raise DataValidationError(where, [(str(path), "no such file: run her2exp-tile first")])
    try:
        frame = pd.read_parquet(path) if path.suffix != ".csv" else pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - any reader error: one line naming the file
        raise DataValidationError(
            where, [(str(path), f"unreadable tile manifest: {exc}")]
        ) from None
    missing = [c for c in REQUIRED if c not in frame.columns and (labelled or c != "label")]
    if missing:
        raise DataValidationError(
            where,
            [(str(path), f"not a tile manifest of her2exp-tile: no {', '.join(missing)} column")],
        )
    frame = frame.copy()
    for key, empty in (
        ("site", ""), ("split", ""), ("her2_score", ""), ("reader", "auto"),
        ("slide_signature", ""),  # a manifest of an older her2exp-tile: nothing to compare
    ):  # fmt: skip
        if key not in frame.columns:
            frame[key] = empty
        frame[key] = frame[key].fillna(empty).astype(str)
    base = path.resolve().parent
    frame["slide_path"] = [
        str(p if Path(p).is_absolute() else base / p) for p in frame["slide_path"].astype(str)
    ]
    return frame


def signatures(frame: pd.DataFrame) -> dict[str, str]:
    """slide_path -> its file's content signature now ("" where it cannot be read: the slide's
    own check says why)."""
    found = {}
    for path in sorted(frame["slide_path"].unique()):
        try:
            found[path] = slide_signature(path)
        except OSError:
            found[path] = ""
    return found


def slide_problems(
    frame: pd.DataFrame, assume_mpp: float | None, signed: Mapping[str, str] | None = None
) -> dict[str, str]:
    """slide_id -> why its tiles cannot be read: opened once each, geometry checked, and its
    file the one her2exp-tile signed (`signed`: signatures(frame), taken here when not given)."""
    problems: dict[str, str] = {}
    if "reader" not in frame:
        frame = frame.assign(reader="auto")
    signed = signatures(frame) if signed is None else signed
    groups = frame.groupby(["slide_id", "slide_path", "reader"], sort=True)
    for (slide_id, path, reader), rows in groups:
        try:
            with Slide(path, assume_mpp=assume_mpp or 1.0, reader=reader or "auto") as slide:
                width, height = slide.dimensions
                downsamples = slide.level_downsamples
        except SlideError as exc:
            problems[str(slide_id)] = str(exc)
            continue
        level = rows["level"].to_numpy()
        if (level < 0).any() or (level >= len(downsamples)).any():
            problems[str(slide_id)] = f"level outside the slide's {len(downsamples)} levels"
            continue
        extent = rows["read_size"].to_numpy() * np.asarray(downsamples)[level]
        inside = (
            (rows["x"] >= 0) & (rows["y"] >= 0)
            & (rows["x"] + extent <= width + 1) & (rows["y"] + extent <= height + 1)
        )  # fmt: skip
        if not inside.all():
            problems[str(slide_id)] = (
                f"{int((~inside).sum())} tiles outside its {width}x{height} px: the manifest "
                "was made from another file; tile it again"
            )
            continue
        tiled_from = set(rows["slide_signature"]) - {""} if "slide_signature" in rows else set()
        if tiled_from and signed.get(path) and signed[path] not in tiled_from:
            problems[str(slide_id)] = (
                f"{path} changed since it was tiled (another file or scan at this path): its "
                "tiles were chosen on the old one; run her2exp-tile again (it re-tiles changed "
                "slides)"
            )
    for slide_id, rows in frame.groupby("slide_id"):
        if rows["slide_path"].nunique() > 1:
            problems[str(slide_id)] = "one slide id names more than one file"
        if "label" in rows:
            # 1.0 from a CSV with gaps is 1; empty, text and other numbers are not labels.
            value = pd.to_numeric(rows["label"], errors="coerce")
            wrong = ~value.isin([0, 1])
            if wrong.any():
                shown = rows["label"][wrong].iloc[0]
                what = "an empty label" if pd.isna(shown) else f"label {shown}"
                problems[str(slide_id)] = f"{what}: 0 (HER2-) or 1 (HER2+) allowed"
    return problems


def duplicate_slides(frame: pd.DataFrame, signed: Mapping[str, str]) -> list[tuple[str, str]]:
    """One problem per slide file (by content) under more than one slide id: its tissue would
    be in two slides - two patients, perhaps two splits - of one training."""
    by_file: dict[str, set[str]] = {}
    pairs = frame[["slide_path", "slide_id"]].drop_duplicates()
    for path, slide_id in zip(pairs["slide_path"], pairs["slide_id"].astype(str), strict=True):
        if signed.get(path):
            by_file.setdefault(signed[path], set()).add(slide_id)
    return [
        (f"slide {ids_[0]}", f"the same slide file (same content) as slide(s) "
         f"{', '.join(ids_[1:])}: one scan under {len(ids_)} slide ids; keep one "
         "(her2exp-tile refuses such a table)")
        for ids_ in (sorted(v) for v in by_file.values())
        if len(ids_) > 1
    ]  # fmt: skip


def _fingerprint(
    cfg: DictConfig, seed: int | None, frame: pd.DataFrame, signed: Mapping[str, str]
) -> str:
    container = OmegaConf.to_container(cfg, resolve=True)
    settings = {k: container.get(k) for k in ("source", "image_size")} | {"seed": seed}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    columns = ["slide_id", "patient_id", "label", "site", "split", "x", "y", "level", "read_size"]
    digest.update(pd.util.hash_pandas_object(frame[columns].astype(str), index=False).to_numpy())
    for path in sorted(frame["slide_path"].unique()):
        digest.update(f"{Path(path).name}:{signed[path]}".encode())
    return digest.hexdigest()[:16]


def load(cfg: DictConfig, seed: int, cohort: bool = False) -> LoadedSlides:
    """Check, split and open (lazily) a tile manifest; every problem in one exception."""
    if not cfg.path:
        raise DataValidationError(
            "data=slides", [("data.path", "not set: data.path=DIR/tiles.parquet (her2exp-tile)")]
        )
    path = Path(cfg.path)
    where = f"data.path={path}"
    frame = read_tiles(path)
    if not cohort and (frame["split"] != "").any() and cv_ignores_column(cfg, where):
        frame["split"] = ""  # refused before any slide is opened, or replaced by the folds
    assume_mpp = tiling_settings(path).get("assume_mpp")
    signed = signatures(frame)
    bad = slide_problems(frame, assume_mpp, signed)
    file_problems = [(f"slide {sid}", why) for sid, why in sorted(bad.items())]
    good = frame[~frame["slide_id"].astype(str).isin(bad)].reset_index(drop=True)
    good["label"] = pd.to_numeric(good["label"]).astype(np.int64)
    good["slide_id"] = good["slide_id"].astype(str)
    good["patient_id"] = good["patient_id"].astype(str)
    filled = good["split"] != ""
    explicit = bool(len(good)) and bool(filled.all())
    structural: list[tuple[str, str]] = []
    if filled.any() and not filled.all() and not cohort:
        empty = sorted(good.loc[~filled, "slide_id"].unique())
        structural.append(
            (f"slide {empty[0]}", f"no split while others have one ({len(empty)} slides)")
        )
    if cohort:
        good["split"] = "cohort"
    elif not explicit and len(good):
        good["split"] = splits.split_column(good, cfg.split, seed).to_numpy()
    if not structural:
        structural = structural_problems(good.assign(display=good["slide_id"]), explicit, cohort)
    structural += duplicate_slides(good, signed)
    if cfg.on_bad_file == "skip":
        if structural:
            raise DataValidationError(where, structural)
    elif file_problems or structural:
        advice = " (fix them, or data.on_bad_file=skip leaves those slides out)" if bad else ""
        raise DataValidationError(where, file_problems + structural, advice)
    manifest = good[[c for c in KEPT if c in good.columns]].copy()
    store = SlideTiles(manifest, int(cfg.image_size), int(cfg.max_open_slides), assume_mpp)
    skipped = pd.DataFrame(file_problems, columns=list(SKIPPED_COLUMNS))
    fingerprint = _fingerprint(cfg, None if (cohort or explicit) else seed, manifest, signed)
    return LoadedSlides(manifest, store, skipped, fingerprint)
