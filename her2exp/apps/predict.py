"""A trained run applied to a folder of patches (the library part of `her2exp-predict`,
her2exp/cli/predict.py).

Each row: path, HER2+ probability, and the decision at every threshold frozen on the training
run's validation split at the decision level. At the slide or patient level the tiles are
grouped by `groups=` (path, slide_id, patient_id), their scores aggregated as the run
aggregated them, the group called at that level's thresholds, and each tile row carries its
group's call; the per-slide or per-patient table comes back beside the tiles (a file the groups
table puts in two slides or patients is refused). Files that cannot be decoded are listed
(stderr and the `.errors.csv` beside the output) and skipped; the rest are still scored. A
whole-slide image among the patches is refused before anything is scored (tile it first).
`sweep_run_id=`: a sweep's members as one ensemble (her2exp/evaluation/ensemble.py), each
scored through its own `evaluation.Scorer`, their mean called and their sd in column
`member_sd`. The files read are the ones a training folder reads (`data.sources.image_files`).

`Predictions` and `call` (apps/predictions.py) and `prepare_patches` (evaluation/scorer.py) stay
importable from here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from her2exp.apps.predict_bags import check_bag_run, predict_bags
from her2exp.apps.predictions import Predictions, call
from her2exp.config import ConfigError
from her2exp.core import progress
from her2exp.core.errors import UserError  # the user's files, not a configuration value
from her2exp.core.fileio import safe_name
from her2exp.data import slide_tiles as dataset
from her2exp.data.bags import mil_name
from her2exp.data.datasets import PatchDataset
from her2exp.data.sources import (  # the files and the decoding training uses
    IMAGE_SUFFIXES,
    ImageProblem,
    image_files,
    read_patch,
    whole_slide,
)
from her2exp.evaluation.ensemble import load_ensemble, member_stats
from her2exp.evaluation.scorer import Scorer, build_scorer, prepare_patches
from her2exp.evaluation.trained_run import TrainedRun, by_model_uri, level_thresholds, load_run
from her2exp.reports.heatmap import write_heatmap
from her2exp.reports.mil import attention_heatmaps
from her2exp.slides.reader import Slide

log = logging.getLogger("her2exp")


def read_groups(path: str | Path, root: Path, files: list[Path]) -> pd.DataFrame:
    """The groups table, indexed by resolved file path; every scored file must have a row."""
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"groups={path}: not a readable CSV ({exc})") from exc
    missing = [c for c in ("path", "slide_id", "patient_id") if c not in table]
    if missing:
        raise ConfigError(f"groups={path}: no column(s) {', '.join(missing)}")
    if table[["slide_id", "patient_id"]].isna().any().any():
        raise ConfigError(f"groups={path}: empty slide_id or patient_id")
    table.index = [str((root / p).resolve()) for p in table["path"]]
    _check_duplicates(path, table)
    absent = [str(f) for f in files if str(f.resolve()) not in table.index]
    if absent:
        raise ConfigError(
            f"groups={path}: no slide_id/patient_id for {len(absent)} file(s): {_few(absent)}"
        )
    return table[~table.index.duplicated()]


def _check_duplicates(path: str | Path, table: pd.DataFrame) -> None:
    """A file (any spelling: `a.png`, `./a.png`, its absolute path) in rows naming different
    slides or patients is refused, as training refuses a duplicate path with a different label:
    taking the first row would call a patient the tile may not belong to. Rows that agree are
    kept (one row used): each file is scored once, whatever the table repeats, so a repeat
    changes no call, and tables joined from several sources often repeat a row."""
    repeated = table[table.index.duplicated(keep=False)]
    ids = repeated.groupby(level=0, sort=False)[["slide_id", "patient_id"]].nunique()
    clashes = ids.index[(ids > 1).any(axis=1)].tolist()
    if not clashes:
        return
    numbered = table.assign(row=range(1, len(table) + 1))  # 1-based data rows
    shown = []
    for file in clashes[:3]:
        named = [
            f"row {r.row} {r.path!r} (slide_id {r.slide_id}, patient_id {r.patient_id})"
            for r in numbered.loc[[file]].itertuples()
        ]
        shown.append(f"{file}: {', '.join(named)}")
    more = f"; and {len(clashes) - 3} more file(s)" if len(clashes) > 3 else ""
    raise UserError(
        f"groups={path}: duplicate path with a different slide_id or patient_id (a tile belongs "
        f"to one slide of one patient): {'; '.join(shown)}{more}"
    )


def _few(items: list[str], n: int = 5) -> str:
    """The first `n` of `items` and how many more (one line, however many)."""
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def check_patches(root: Path, files: list[Path]) -> None:
    """Refuse whole-slide images among the patches, before any run is loaded or patch scored:
    decoded as a patch, a slide becomes its first page shrunk to one tile and gets a call of
    its own (a damaged file, by contrast, is listed and skipped while the rest are scored)."""
    slides = [(f, what) for f in files if (what := whole_slide(f))]
    if not slides:
        return
    advice = (
        "tile {} with her2exp-tile and predict on the tile manifest "
        "(input=<her2exp-tile out>/tiles.parquet)"
    )
    if len(slides) == 1:
        ((file, what),) = slides
        raise UserError(
            f"input={root}: {file} is a whole-slide image ({what}), not a patch: "
            + advice.format("it")
        )
    named = [f"{f} ({what})" for f, what in slides]
    raise UserError(
        f"input={root}: {len(slides)} files are whole-slide images, not patches: "
        f"{_few(named, 3)}: " + advice.format("them")
    )


def _read_problem(exc: Exception) -> str:
    """A patch that could not be read, in the words training's data check uses."""
    if isinstance(exc, ImageProblem):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "missing file"
    if isinstance(exc, OSError):
        return f"unreadable file: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def predict_folder(opts: Any) -> Predictions:
    """Score every image under `opts.input` with the run `opts` names (run_id or checkpoint) and
    call them at the run's decision level (or `opts.decision_level`). The input's own checks
    (whole slides among the patches, the groups table) come before the run is loaded."""
    if not opts.input:
        raise ConfigError("input=<folder of patches> is required")
    root = Path(opts.input)
    if not root.is_dir():
        raise ConfigError(f"input={root} is not a folder")
    files = image_files(root)  # the files (and suffixes) a training folder takes
    if not files:
        raise ConfigError(f"input={root} holds no {', '.join(sorted(IMAGE_SUFFIXES))} files")
    check_patches(root, files)
    groups = read_groups(opts.groups, root, files) if opts.get("groups") else None
    run, members = load_runs(opts)  # refused without frozen thresholds: no fallback of ours
    level = opts.get("decision_level") or run.decision_level
    thresholds = level_thresholds(run, level)  # refused when the run never froze this level
    if groups is None and level != "tile":
        raise ConfigError(
            f"decision level {level}: give groups=<CSV with path, slide_id, patient_id> so "
            "tiles can be grouped into slides and patients"
        )
    cfg = run.cfg
    bags = mil_name(cfg) != "none"  # a MIL run: tiles embedded, then scored as bags
    if bags:
        check_bag_run(run, members, opts.get("tta"))
    scorers = scorers_of(members, opts)

    rows, errors, embedded = [], [], []
    starts = range(0, len(files), opts.batch_size)
    for start in progress.bar(starts, desc="predict", unit="batch"):
        batch, paths = [], []
        for path in files[start : start + opts.batch_size]:
            try:
                batch.append(read_patch(path, cfg.data.image_size))
                paths.append(path)
            except Exception as exc:  # noqa: BLE001 - any decoder error is reported per file
                errors.append((str(path), _read_problem(exc)))
        if not batch:
            continue
        x = prepare_patches(batch, cfg.data.image_size)
        if bags:
            embedded.append(scorers[0].embed(x))
            rows += [{"path": str(path)} for path in paths]
            continue
        mean, sd = _member_probs(scorers, x)
        for path, p, d in zip(paths, mean, sd, strict=True):
            rows.append({"path": str(path), "prob_her2_pos": p, "member_sd": d})
    if bags:
        tiles = pd.DataFrame(rows, columns=["path"])
        found = groups.loc[[str(Path(p).resolve()) for p in tiles["path"]]]
        tiles["slide_id"] = found["slide_id"].to_numpy()
        tiles["patient_id"] = found["patient_id"].to_numpy()
        features = torch.cat(embedded) if embedded else torch.zeros(0, 0)
        return predict_bags(run, scorers[0], level, thresholds, tiles, features, errors)
    columns = ["path", "prob_her2_pos", *(["member_sd"] if opts.get("sweep_run_id") else [])]
    tiles = pd.DataFrame(rows, columns=["path", "prob_her2_pos", "member_sd"])[columns]
    return call(run, level, thresholds, tiles, groups, errors)


def load_runs(opts: Any) -> tuple[TrainedRun, list[TrainedRun]]:
    """(the run whose thresholds call the tiles, the runs that score them): one run (`model_uri`:
    the run its alias or version names), or with `sweep_run_id` the ensemble
    (her2exp/evaluation/ensemble.py) and its members."""
    if opts.get("model_uri"):
        run = load_run(by_model_uri(opts))
        run.source = f"model_uri={opts.model_uri!r} (run {run.source_run})"
        return run, [run]
    if not opts.get("sweep_run_id"):
        run = load_run(opts)
        return run, [run]
    ens = load_ensemble(opts.sweep_run_id, opts.tracking.uri)
    return ens.run, ens.members


def scorers_of(members: list[TrainedRun], opts: Any) -> list[Scorer]:
    """Each member's Scorer, as her2exp-eval builds it: the run's own precision (`trainer.amp`,
    `channels_last`), stain placement, `tta=` (null: the run's own) and calibration."""
    return [build_scorer(m, None, 0, opts.get("tta")) for m in members]


def _member_probs(scorers: list[Scorer], x: torch.Tensor) -> tuple[Any, Any]:
    """(mean, sd) over the members' probabilities of one batch (one member: its own, sd 0)."""
    mean, sd = member_stats([s.probabilities(x) for s in scorers])
    return mean.tolist(), sd.tolist()


def predict_slides(opts: Any, heatmap_dir: Path) -> Predictions:
    """Score every tile of a tile manifest (`input=DIR/tiles.parquet`), read lazily from its
    slides in `opts.num_workers` workers, called at the decision level (the manifest's slide
    and patient ids group the tiles); one heatmap per slide into `heatmap_dir`. Slides that
    cannot be opened are listed and skipped; labels, when the manifest has them, are kept."""
    path = Path(opts.input)
    run, members = load_runs(opts)
    level = opts.get("decision_level") or run.decision_level
    thresholds = level_thresholds(run, level)  # refused when the run never froze this level
    tiles = dataset.read_tiles(path, labelled=False)
    mpp = dataset.tiling_settings(path).get("assume_mpp")
    bad = dataset.slide_problems(tiles, mpp)
    errors = [(f"slide {sid}", why) for sid, why in sorted(bad.items())]
    tiles = tiles[~tiles["slide_id"].astype(str).isin(bad)].reset_index(drop=True)
    if tiles.empty:
        return Predictions(pd.DataFrame(), errors, level)
    store = dataset.SlideTiles(tiles, run.cfg.data.image_size, assume_mpp=mpp)
    loader = DataLoader(
        PatchDataset(store, np.zeros(len(tiles), dtype=np.int64)),
        batch_size=opts.batch_size,
        num_workers=opts.num_workers,
    )
    bags = mil_name(run.cfg) != "none"  # a MIL run: tiles embedded, then scored as bags
    if bags:
        check_bag_run(run, members, opts.get("tta"))
    scorers = scorers_of(members, opts)
    probs: list[float] = []
    sds: list[float] = []
    embedded = []
    for x, _, _ in progress.bar(loader, desc="predict: tiles", unit="batch"):
        if bags:
            embedded.append(scorers[0].embed(x))
            continue
        mean, sd = _member_probs(scorers, x)
        probs += mean
        sds += sd
    keep = ["slide_id", "patient_id", "label", "site", "split", "slide_path", "x", "y"]
    table = tiles[[c for c in keep if c in tiles] + ["level", "read_size"]].copy()
    table["slide_id"] = table["slide_id"].astype(str)
    table["patient_id"] = table["patient_id"].astype(str)
    if bags:  # the tile heatmaps show tile scores; a bag's attention is in its own column
        features = torch.cat(embedded)
        result = predict_bags(run, scorers[0], level, thresholds, table, features, errors)
        heatmap_dir.mkdir(parents=True, exist_ok=True)
        attention_heatmaps(result.tiles, tiles, heatmap_dir)
        return result
    table["prob_her2_pos"] = probs
    if opts.get("sweep_run_id"):
        table["member_sd"] = sds
    result = call(run, level, thresholds, table, None, errors)
    _heatmaps(run, result.tiles.assign(reader=tiles["reader"]), heatmap_dir, mpp)
    return result


def _heatmaps(run: TrainedRun, table: pd.DataFrame, folder: Path, mpp: float | None) -> None:
    """One PNG per slide: its tile scores, the tile-level operating point on the colour bar."""
    tile_thresholds = level_thresholds(run, "tile")
    threshold = tile_thresholds.get(run.cfg.evaluation.get("operating_point", "youden"))
    groups = table.groupby(["slide_id", "slide_path", "reader"], sort=True)
    for (slide_id, slide_path, reader), rows in progress.bar(groups, desc="heatmaps", unit="slide"):
        # Reading needs no resolution: 1.0 stands in for a slide tiled with assume_mpp.
        with Slide(slide_path, assume_mpp=mpp or 1.0, reader=reader) as slide:
            out = folder / f"{safe_name(str(slide_id))}.png"
            write_heatmap(slide, rows, out, str(slide_id), threshold)
