"""`her2exp-tile`: a table of slides -> a tile manifest (coordinates, never pixels), QC, summary.

The run, in the order a user can trust: read the slide table (labels, patients, splits checked
as a manifest's are), open every slide of this shard and find its tissue (every unusable slide
listed before anything is written: `on_bad_file=error`; or left out, listed, `skip`), then tile
each slide into `slides/<id>.parquet` and `qc/<id>.png` (atomic; a slide already tiled with the
same settings is skipped, so a killed or sharded run is resumed by running it again), and when
every slide of the table is done, `tiles.parquet` and `summary.csv`.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from her2exp.config.tile import SETTINGS_FILE, settings  # checked before a slide is opened
from her2exp.core.fileio import atomic_write, atomic_write_text, safe_name
from her2exp.data.sources import DataValidationError, label_of, read_manifest
from her2exp.slides.annotations import AnnotationError, read_regions
from her2exp.slides.reader import Slide, SlideError
from her2exp.slides.tiling import choose_level, tile_grid, tissue_mask

log = logging.getLogger("her2exp")

QC_SIDE = 1024  # longer side of a QC thumbnail, in pixels
MANIFEST_COLUMNS = [
    "slide_id", "slide_path", "patient_id", "label", "her2_score", "site", "split",
    "x", "y", "level", "read_size", "size", "mpp", "tissue_fraction", "reader",
]  # fmt: skip


@dataclass(frozen=True)
class SlideJob:
    """One row of the slide table, resolved: what tiling a slide needs, picklable for workers."""

    slide_id: str
    path: str
    label: int
    her2_score: str
    patient_id: str
    site: str
    split: str
    annotation: str | None


def read_slide_table(table: Path, data: DictConfig) -> list[SlideJob]:
    """The slide table (CSV or Parquet; paths relative to it) -> jobs; every problem of the
    table listed at once: missing columns or files, unknown labels, duplicate slides, a
    patient in two splits."""
    frame = read_manifest(table)
    if "path" not in frame.columns or not ({"label", "score"} & set(frame.columns)):
        raise DataValidationError(
            str(table), [(str(table), "needs a path column and a label or score column")]
        )
    column = "label" if "label" in frame.columns else "score"
    problems, jobs = [], []
    for i, row in frame.iterrows():
        path = Path(str(row["path"]))
        # Absolute in the manifest: training reads it from any working directory.
        path = path if path.is_absolute() else table.resolve().parent / path
        slide_id = _cell(row, "slide_id") or path.stem
        try:
            label, score = label_of(row[column], data, column)
        except KeyError:
            problems.append((str(path), f"row {i + 2}: unknown {column} {row[column]!r}"))
            continue
        if label is None:  # an equivocal score excluded by data.equivocal
            continue
        annotation = _cell(row, "annotation")
        if annotation and not Path(annotation).is_absolute():
            annotation = str(table.parent / annotation)
        patient = _cell(row, "patient_id") or slide_id
        jobs.append(
            SlideJob(
                slide_id,
                str(path),
                label,
                score or _cell(row, "her2_score"),
                patient,
                _cell(row, "site") or "site",
                _cell(row, "split"),
                annotation,
            )  # fmt: skip
        )
    problems += _table_problems(jobs)
    if problems:
        raise DataValidationError(str(table), problems)
    return jobs


def _cell(row: pd.Series, key: str) -> str:
    value = row.get(key)
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _table_problems(jobs: list[SlideJob]) -> list[tuple[str, str]]:
    problems = [(j.path, "no such file") for j in jobs if not Path(j.path).is_file()]
    problems += [
        (j.annotation, "annotation: no such file")
        for j in jobs
        if j.annotation and not Path(j.annotation).is_file()
    ]
    ids = pd.Series([j.slide_id for j in jobs])
    problems += [(s, "slide_id appears more than once") for s in sorted(set(ids[ids.duplicated()]))]
    splits: dict[str, set[str]] = {}
    for j in jobs:
        if j.split:
            splits.setdefault(j.patient_id, set()).add(j.split)
    problems += [
        (p, f"patient in more than one split: {', '.join(sorted(s))}")
        for p, s in sorted(splits.items())
        if len(s) > 1
    ]
    return problems


def _open_and_mask(job: SlideJob, tiles: DictConfig) -> tuple[np.ndarray, float, dict[str, Any]]:
    """(tissue mask on the thumbnail, its downsample, the slide's record); SlideError if the
    slide cannot be used (unreadable, no resolution, no tissue)."""
    with Slide(job.path, tiles.assume_mpp, reader=tiles.reader) as slide:
        thumb, down = slide.thumbnail_at(tiles.mask_mpp)
        info = asdict(slide.info())
    mask = tissue_mask(thumb)
    if not mask.any():
        raise SlideError(f"slide {job.path}: no tissue found on its thumbnail")
    return mask, down, info


def tile_one(job: SlideJob, tiles: DictConfig, out: Path) -> dict[str, Any]:
    """Tile one slide into out/slides/<id>.parquet and out/qc/<id>.png; its summary row."""
    mask, down, info = _open_and_mask(job, tiles)
    with Slide(job.path, tiles.assume_mpp, reader=tiles.reader) as slide:
        choice = choose_level(slide, tiles.mpp, tiles.size)
        grid = tile_grid(slide, mask, down, choice, tiles.min_tissue)
        qc, qc_down = slide.thumbnail(QC_SIDE)
    if job.annotation:  # checked by _check_slides
        regions = read_regions(job.annotation, tiles.exclude_classes)
        grid = grid[regions.keep(grid["x"], grid["y"], choice.step)]
    frame = _manifest_rows(job, grid, tiles, info["reader"])
    name = safe_name(job.slide_id)
    atomic_write(out / "qc" / f"{name}.png", _qc_png(qc, qc_down, mask, grid, choice.step))
    atomic_write(out / "slides" / f"{name}.parquet", frame.to_parquet(index=False))
    area_mm2 = float(mask.mean()) * info["width"] * info["height"] * info["mpp"] ** 2 / 1e6
    return {"slide_id": job.slide_id, "status": "tiled", "reason": "", "tiles": len(frame),
            "tissue_mm2": round(area_mm2, 3), **_record(info)}  # fmt: skip


def _record(info: dict[str, Any]) -> dict[str, Any]:
    return {"vendor": info["vendor"], "width": info["width"], "height": info["height"],
            "levels": info["level_count"], "mpp": info["mpp"], "mpp_assumed": info["mpp_assumed"],
            "reader": info["reader"]}  # fmt: skip


def _manifest_rows(
    job: SlideJob, grid: pd.DataFrame, tiles: DictConfig, reader: str
) -> pd.DataFrame:
    """The slide's tiles with its table row, and the backend that read it (`reader`: what a
    dataset reading these tiles opens the slide with, so it sees the pixels tiling saw)."""
    frame = grid.reset_index(drop=True).copy()
    for key in ("slide_id", "patient_id", "label", "her2_score", "site", "split"):
        frame[key] = getattr(job, key)
    frame["slide_path"] = job.path
    frame["size"] = int(tiles.size)
    frame["mpp"] = float(tiles.mpp)
    frame["reader"] = reader
    return frame[MANIFEST_COLUMNS]


def _qc_png(
    image: np.ndarray, down: float, mask: np.ndarray, grid: pd.DataFrame, step: int
) -> bytes:
    """The slide (longer side QC_SIDE) with its tissue mask tinted and each kept tile outlined."""
    import io

    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    scaled = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    tinted = image.astype(np.float32)
    tinted[scaled] = 0.75 * tinted[scaled] + 0.25 * np.array([0, 200, 0], np.float32)
    canvas = Image.fromarray(tinted.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for x, y in zip(grid["x"], grid["y"], strict=True):
        box = [x / down, y / down, (x + step) / down - 1, (y + step) / down - 1]
        draw.rectangle(box, outline=(0, 0, 255))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def shard_of(jobs: list[SlideJob], shard: str | None) -> list[SlideJob]:
    """`tiles.shard=i/n`: every n-th slide (by slide_id) from the i-th; null: all of them."""
    if not shard:
        return jobs
    i, n = (int(v) for v in shard.split("/"))
    ordered = sorted(jobs, key=lambda j: j.slide_id)
    return [j for k, j in enumerate(ordered) if k % n == i]


def _check_slides(
    jobs: list[SlideJob], tiles: DictConfig, on_bad_file: str
) -> tuple[list[SlideJob], list[dict[str, Any]]]:
    """Open every slide and find its tissue, and read its annotation, before anything is
    written: the usable ones, and a summary row for each left out (`skip`); `error` raises with
    every one listed."""
    good, bad = [], []
    for job in jobs:
        try:
            _open_and_mask(job, tiles)
            if job.annotation:
                note = read_regions(job.annotation, tiles.exclude_classes).note()
                if note:
                    log.warning("%s", note)
            good.append(job)
        except SlideError as exc:
            bad.append((job, str(exc).split(": ", 1)[-1]))
        except AnnotationError as exc:  # names its file, not the slide's
            bad.append((job, str(exc)))
    if bad and on_bad_file == "error":
        raise DataValidationError(
            "the slide table",
            [(j.path, why) for j, why in bad],
            "on_bad_file=skip leaves these slides out (listed in summary.csv)",
        )
    rows = [
        {"slide_id": j.slide_id, "status": "skipped", "reason": why, "tiles": 0} for j, why in bad
    ]
    return good, rows


def _done(job: SlideJob, out: Path) -> bool:
    """Tiled already, from this very file (a table that now points the id at another file
    tiles it again); labels, patients and sites are taken from the current table anyway."""
    path = out / "slides" / f"{safe_name(job.slide_id)}.parquet"
    if not path.is_file():
        return False
    recorded = pd.read_parquet(path, columns=["slide_path"])["slide_path"]
    return len(recorded) == 0 or str(recorded.iloc[0]) == job.path


def _tile_or_problem(
    job: SlideJob, tiles: DictConfig, out: Path
) -> tuple[dict[str, Any] | None, tuple[SlideJob, str] | None]:
    """tile_one, with a slide that fails while its tiles are read (a damaged tile past the
    checks) returned as a problem instead of ending the other slides' work."""
    try:
        return tile_one(job, tiles, out), None
    except SlideError as exc:
        return None, (job, str(exc).split(": ", 1)[-1])
    except AnnotationError as exc:  # changed since it was checked
        return None, (job, str(exc))


def run(jobs: list[SlideJob], out: Path, tiles: DictConfig, on_bad_file: str) -> dict[str, Any]:
    """Check, tile this shard's slides (in `tiles.workers` processes), then the manifest when
    the whole table is tiled. Returns counts for the command's last line."""
    from tqdm import tqdm

    mine = shard_of(jobs, tiles.shard)
    todo = [j for j in mine if not _done(j, out)]
    good, skipped = _check_slides(todo, tiles, on_bad_file)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SETTINGS_FILE, json.dumps(settings(tiles), indent=1) + "\n")
    rows, failed = [], []
    bar = tqdm(total=len(good), desc="slides", unit="slide", disable=None)
    n = len(good)
    if tiles.workers > 1 and n > 1:
        with ProcessPoolExecutor(max_workers=tiles.workers) as pool:
            results = list(pool.map(_tile_or_problem, good, [tiles] * n, [out] * n))
            bar.update(n)
    else:
        results = []
        for job in good:
            results.append(_tile_or_problem(job, tiles, out))
            bar.update()
    bar.close()
    for row, problem in results:
        if row is not None:
            rows.append(row)
        else:
            failed.append(problem)
    if failed and on_bad_file == "error":
        raise DataValidationError(
            "slides that failed while tiled (the others are kept: run again to resume)",
            [(j.path, why) for j, why in failed],
        )
    skipped += [
        {"slide_id": j.slide_id, "status": "skipped", "reason": why, "tiles": 0}
        for j, why in failed
    ]
    if skipped:
        log.warning(
            "left out %d slide(s) (on_bad_file=skip), listed in %s",
            len(skipped),
            out / "summary.csv",
        )
    settled = _merge_summary(out, rows + skipped)
    complete = all(_done(j, out) or j.slide_id in settled for j in jobs)
    if complete:
        _write_manifest(jobs, out)
    return {"tiled": len(rows), "reused": len(mine) - len(todo), "skipped": len(skipped),
            "complete": complete}  # fmt: skip


def _merge_summary(out: Path, rows: list[dict[str, Any]]) -> set[str]:
    """summary.csv holds one row per slide met so far (a rerun's rows replace earlier ones);
    returns the slides it lists as skipped (settled: on_bad_file=skip left them out)."""
    path = out / "summary.csv"
    table = pd.DataFrame(rows)
    if path.is_file():
        old = pd.read_csv(path, dtype={"slide_id": str}, keep_default_na=False)
        if len(table):
            old = old[~old["slide_id"].isin(table["slide_id"])]
        table = pd.concat([old, table], ignore_index=True)
    if len(table) and len(rows):
        atomic_write_text(path, table.sort_values("slide_id").to_csv(index=False))
    if not len(table):
        return set()
    return set(table.loc[table["status"] == "skipped", "slide_id"])


def clear(out: Path) -> None:
    """overwrite=true: the earlier tiling's own files go (check_out made sure they are ours)."""
    import shutil

    for sub in ("slides", "qc"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for name in ("tiles.parquet", "summary.csv", SETTINGS_FILE):
        (out / name).unlink(missing_ok=True)


def _write_manifest(jobs: list[SlideJob], out: Path) -> None:
    """All slides' tiles, with the table's current labels, patients, sites and splits (a label
    corrected in the table needs no retiling)."""
    parts = []
    for job in sorted(jobs, key=lambda j: j.slide_id):
        if _done(job, out):
            part = pd.read_parquet(out / "slides" / f"{safe_name(job.slide_id)}.parquet")
            for key in ("patient_id", "label", "her2_score", "site", "split"):
                part[key] = getattr(job, key)
            parts.append(part)
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=MANIFEST_COLUMNS)
    atomic_write(out / "tiles.parquet", frame.to_parquet(index=False))
