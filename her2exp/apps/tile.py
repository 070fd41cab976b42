"""`her2exp-tile`: a table of slides -> a tile manifest (coordinates, never pixels), QC, summary.

The run, in the order a user can trust: read the slide table (labels, patients, splits checked
as a manifest's are), open every slide of this shard and find its tissue (every unusable slide
listed before anything is written: `on_bad_file=error`; or left out, listed, `skip`), then tile
each slide into `slides/<id>.parquet` and `qc/<id>.png` (atomic; a slide already tiled with the
same settings is skipped, so a killed or sharded run is resumed by running it again), and when
every slide of the table is done, `tiles.parquet` and `summary.csv`.
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from her2exp.apps import tile_out
from her2exp.core import progress
from her2exp.core.fileio import atomic_write, safe_name
from her2exp.data.slide_table import SlideJob, read_slide_table
from her2exp.data.sources import DataValidationError
from her2exp.slides.annotations import AnnotationError, read_regions
from her2exp.slides.reader import Slide, SlideError
from her2exp.slides.tiling import choose_level, tile_grid, tissue_mask

log = logging.getLogger("her2exp")

QC_SIDE = 1024  # longer side of a QC thumbnail, in pixels
MANIFEST_COLUMNS = [
    "slide_id", "slide_path", "patient_id", "label", "her2_score", "site", "split",
    "x", "y", "level", "read_size", "size", "mpp", "tissue_fraction", "reader", "slide_signature",
]  # fmt: skip
__all__ = ["MANIFEST_COLUMNS", "SlideJob", "read_slide_table", "run", "tile_one"]


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
    tile_out.write_slide(out, job, frame)
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
    frame["slide_signature"] = job.signature  # data=slides refuses a file changed since
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
            " (on_bad_file=skip leaves these slides out, listed in summary.csv)",
        )
    rows = [
        {"slide_id": j.slide_id, "status": "skipped", "reason": why, "tiles": 0} for j, why in bad
    ]
    return good, rows


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


def run(
    jobs: list[SlideJob], out: Path, tiles: DictConfig, on_bad_file: str, overwrite: bool = False
) -> dict[str, Any]:
    """Check this shard's slides, claim `out` (tile_out), tile them (in `tiles.processes`
    processes), then the manifest when the whole table is tiled. Returns counts for the
    command's last line."""
    mine = shard_of(jobs, tiles.shard)
    clearing = tile_out.will_clear(out, tiles, overwrite)
    states = {j.slide_id: "new" if clearing else tile_out.state(j, out) for j in mine}
    good, skipped = _check_slides([j for j in mine if states[j.slide_id] != "done"], tiles,
                                  on_bad_file)  # fmt: skip
    checked = {j.slide_id for j in good} | {r["slide_id"] for r in skipped}
    held = tile_out.claim(out, tiles, overwrite)
    try:
        # Another tiler may have cleared the folder between the look above and the claim.
        late = [j for j in mine if j.slide_id not in checked and tile_out.state(j, out) != "done"]
        more, more_skipped = _check_slides(late, tiles, on_bad_file)
        good, skipped = good + more, skipped + more_skipped
        changed = sorted(j.slide_id for j in good if states[j.slide_id] == "changed")
        if changed:
            log.warning(
                "her2exp-tile: %d slide(s) changed since tiled (another file at the same path, "
                "an edited annotation, or tiled before signatures were recorded), tiled again: %s",
                len(changed), ", ".join(changed),
            )  # fmt: skip
        rows, failed = _tile_all(good, tiles, out)
        skipped += _failed_rows(failed, on_bad_file)
        if skipped:
            log.warning("left out %d slide(s) (on_bad_file=skip), listed in %s",
                        len(skipped), out / "summary.csv")  # fmt: skip
        with tile_out.claim_lock(out):
            settled = tile_out.merge_summary(out, rows + skipped)
            done = [j for j in jobs if tile_out.state(j, out) == "done"]
            finished = {j.slide_id for j in done} | settled  # tiled, or left out by skip
            complete = all(j.slide_id in finished for j in jobs)
            if complete:
                tile_out.write_manifest(done, out, MANIFEST_COLUMNS)
    finally:
        held.release()
    reused = len(mine) - len(checked) - len(late)
    return {"tiled": len(rows), "changed": len(changed), "skipped": len(skipped),
            "reused": reused, "complete": complete}  # fmt: skip


def _tile_all(
    good: list[SlideJob], tiles: DictConfig, out: Path
) -> tuple[list[dict[str, Any]], list[tuple[SlideJob, str]]]:
    """Each slide tiled (in `tiles.processes` processes): the summary rows, and the slides that
    failed while their tiles were read."""
    n = len(good)
    results = []
    with progress.bar(total=n, desc="tiling", unit="slide") as bar:
        if tiles.processes > 1 and n > 1:
            with ProcessPoolExecutor(max_workers=tiles.processes) as pool:
                for result in pool.map(_tile_or_problem, good, [tiles] * n, [out] * n):
                    results.append(result)  # in order: the bar counts the first slides done
                    bar.update()
        else:
            for job in good:
                results.append(_tile_or_problem(job, tiles, out))
                bar.update()
    rows = [row for row, _ in results if row is not None]
    return rows, [problem for _, problem in results if problem is not None]


def _failed_rows(failed: list[tuple[SlideJob, str]], on_bad_file: str) -> list[dict[str, Any]]:
    """Slides that failed while tiled: refused together (`error`; the others' files are kept),
    or summary rows (`skip`)."""
    if failed and on_bad_file == "error":
        raise DataValidationError(
            "slides that failed while tiled (the others are kept: run again to resume)",
            [(j.path, why) for j, why in failed],
        )
    return [
        {"slide_id": j.slide_id, "status": "skipped", "reason": why, "tiles": 0}
        for j, why in failed
    ]
