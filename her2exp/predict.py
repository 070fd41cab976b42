"""A trained run applied to a folder of patches or to the tiles of slides (the library part of
`her2exp-predict`, her2exp/cli/predict.py).

Each row: path (or slide and tile coordinates), HER2+ probability, and the decision at every
threshold frozen on the training run's validation split. Files (slides) that cannot be read are
listed (stderr and the `.errors.csv` beside the output) and skipped; the rest are still scored.
On slides, each slide also gets a heatmap PNG of its tile scores over its thumbnail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from her2exp.config import ConfigError
from her2exp.data.sources import read_patch  # decoded exactly as in training
from her2exp.engine import Preprocess
from her2exp.evaluation import load_model, load_run, run_stain
from her2exp.fileio import safe_name

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def _scorer(run: Any) -> tuple[Any, Any, Preprocess, torch.device]:
    stain = run_stain(run, 0)  # refused when a Macenko run lost its fitted reference
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(run, device)
    model.eval()
    # The one input path of training and evaluation: stain (here on the CPU), then mean/std.
    return (
        model,
        stain,
        Preprocess(device, tuple(run.cfg.data.mean), tuple(run.cfg.data.std)),
        device,
    )


def _probs(model: Any, stain: Any, preprocess: Preprocess, x: torch.Tensor) -> list[float]:
    if stain is not None:
        x = stain(x, False)
    with torch.no_grad():
        return torch.softmax(model(preprocess(x)).float(), 1)[:, 1].cpu().tolist()


def predict_folder(opts: Any) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Score every image under `opts.input` with the run `opts` names (run_id or checkpoint);
    returns (one row per scored file, (path, error) per file that could not be decoded)."""
    if not opts.input:
        raise ConfigError("input=<folder of patches> is required")
    root = Path(opts.input)
    if not root.is_dir():
        raise ConfigError(f"input={root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"input={root} holds no {', '.join(sorted(IMAGE_SUFFIXES))} files")
    run = load_run(opts)  # refused without the thresholds frozen on val: no fallback of ours
    cfg, thresholds = run.cfg, run.thresholds
    model, stain, preprocess, _ = _scorer(run)

    rows, errors = [], []
    for start in range(0, len(files), opts.batch_size):
        batch, paths = [], []
        for path in files[start : start + opts.batch_size]:
            try:
                batch.append(read_patch(path, cfg.data.image_size))
                paths.append(path)
            except Exception as exc:  # noqa: BLE001 - any decoder error is reported per file
                errors.append((str(path), f"{type(exc).__name__}: {exc}"))
        if not batch:
            continue
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()
        for path, p in zip(paths, _probs(model, stain, preprocess, x), strict=True):
            row = {"path": str(path), "prob_her2_pos": p}
            row.update({f"called_her2_pos_{k}": int(p >= t) for k, t in thresholds.items()})
            rows.append(row)
    return pd.DataFrame(rows), errors


def predict_slides(opts: Any, heatmap_dir: Path) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Score every tile of a tile manifest (`input=DIR/tiles.parquet`), read lazily from its
    slides in `opts.num_workers` workers; one heatmap per slide into `heatmap_dir`. Slides that
    cannot be opened are listed and skipped; labels, when the manifest has them, are kept."""
    from torch.utils.data import DataLoader

    from her2exp.data.datasets import PatchDataset
    from her2exp.slides import dataset
    from her2exp.slides.heatmap import write_heatmap
    from her2exp.slides.reader import Slide

    path = Path(opts.input)
    run = load_run(opts)
    tiles = dataset.read_tiles(path, labelled=False)
    settings = dataset.tiling_settings(path)
    bad = dataset.slide_problems(tiles, settings.get("assume_mpp"))
    errors = [(f"slide {sid}", why) for sid, why in sorted(bad.items())]
    tiles = tiles[~tiles["slide_id"].astype(str).isin(bad)].reset_index(drop=True)
    if tiles.empty:
        return pd.DataFrame(), errors
    store = dataset.SlideTiles(
        tiles, run.cfg.data.image_size, assume_mpp=settings.get("assume_mpp")
    )
    loader = DataLoader(
        PatchDataset(store, np.zeros(len(tiles), dtype=np.int64)),
        batch_size=opts.batch_size,
        num_workers=opts.num_workers,
    )
    model, stain, preprocess, _ = _scorer(run)
    probs: list[float] = []
    for x, _, _ in loader:
        probs += _probs(model, stain, preprocess, x)
    keep = [c for c in ("slide_id", "patient_id", "label", "site", "split") if c in tiles.columns]
    table = tiles[[*keep, "slide_path", "x", "y", "level", "read_size"]].copy()
    readers = tiles["reader"]
    table["prob_her2_pos"] = probs
    for name, t in run.thresholds.items():
        table[f"called_her2_pos_{name}"] = (table["prob_her2_pos"] >= t).astype(int)
    threshold = run.thresholds.get(run.cfg.evaluation.get("operating_point", "youden"))
    for (slide_id, slide_path, reader), rows in table.assign(reader=readers).groupby(
        ["slide_id", "slide_path", "reader"], sort=True
    ):
        mpp = settings.get("assume_mpp") or 1.0  # reading needs no resolution
        with Slide(slide_path, assume_mpp=mpp, reader=reader) as slide:
            write_heatmap(
                slide,
                rows,
                heatmap_dir / f"{safe_name(str(slide_id))}.png",
                str(slide_id),
                threshold,
            )
    return table, errors
