"""Bags through the one evaluation path: their scored rows, attention files, eval on a cohort.

`final.final_evaluation` and `her2exp-eval` score bags like patches (engine.score over a bag
loader), hand `report_cohorts` one row per bag, and write what only bags have here: the
per-tile attention of every bag (`reports/attention_<split>.csv`) and what is drawn from it
(her2exp.reports.mil: galleries, slide heatmaps).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from her2exp import data, metrics
from her2exp.config import ConfigError
from her2exp.core.fileio import safe_name
from her2exp.data.bags import (
    BagDataset,
    Bags,
    attention,
    attention_table,
    bag_by,
    bag_rows,
    collate_bags,
    group_bags,
)
from her2exp.data.datasets import RowView
from her2exp.engine import features
from her2exp.evaluation.scored import ScoredSplit
from her2exp.reports import atomic_write_text
from her2exp.reports import mil as outputs
from her2exp.runtime import distributed

log = logging.getLogger(__name__)

#: Tiles shown per side (highest, lowest attention) for each bag in the attention galleries.
GALLERY_TILES = 8


def bag_loader(
    features: torch.Tensor, bags: Bags, batch_size: int, device: torch.device, dctx: Any = None
) -> torch.utils.data.DataLoader:
    """The exact-once eval shards over bags (this rank's contiguous share, in bag order)."""
    cfg = OmegaConf.create({"eval_batch_size": batch_size, "num_workers": 0, "pin_memory": False})
    rank, world = (dctx.rank, dctx.world_size) if dctx is not None else (0, 1)
    return data.eval_loader(BagDataset(features, bags), cfg, device, rank, world, collate_bags)


def gathered_attention(head: Any, loader: Any, dctx: Any) -> np.ndarray:
    """Every bag's attention, each scored once on its rank, gathered in bag order."""
    local = attention(head, loader, dctx.device)
    return distributed.gather_in_order(local) if dctx.is_distributed else local


def write_attention(
    report_dir: Path,
    name: str,
    rows: pd.DataFrame,
    bags: Bags,
    weights: np.ndarray,
    scored: pd.DataFrame,
    view: Any,
    tile_manifest: pd.DataFrame | None,
    figures: bool = True,
) -> list[Path]:
    """attention_<name>.csv, the attention galleries of the missed and false bags and, for
    tiles of slides, the attention heatmaps. `scored`: bag_id, label, prob_her2_pos, called.
    `figures=False` (evaluation.figures): the table only."""
    table = attention_table(rows, bags, weights)
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / f"attention_{safe_name(name)}.csv"
    written = [atomic_write_text(path, table.to_csv(index=False))]
    if not figures:
        return written
    written += list(outputs.attention_gallery(table, scored, view, report_dir, GALLERY_TILES))
    if tile_manifest is not None and {"slide_id", "x", "y"} <= set(table.columns):
        written += list(outputs.attention_heatmaps(table, tile_manifest, report_dir))
    return written


def scored_bags(rows: pd.DataFrame, probs: np.ndarray, threshold: float) -> pd.DataFrame:
    """The bags as the attention gallery takes them: bag_id, label, prob_her2_pos, called."""
    return pd.DataFrame(
        {
            "bag_id": rows["bag_id"].to_numpy(),
            "label": rows["label"].to_numpy(),
            "prob_her2_pos": probs,
            "called": metrics.called(probs, threshold),
        }
    )


def score_cohort_bags(
    scorer: Any, cohort: Any, run: Any, operating_point: str, figures: bool = True
) -> tuple[Any, Any]:
    """her2exp-eval of a MIL run: the cohort's tiles embedded by the run's frozen backbone, bags
    formed by the run's `data.bag_by`, scored by its head at its frozen calibration. Returns the
    ScoredSplit of bags and the `extra_reports` callback that writes the attention files."""
    if scorer.tta != "none":
        raise ConfigError(
            f"evaluation.tta={scorer.tta}: none for a mil run (a bag holds one embedding per tile)"
        )
    bundle = cohort.bundle
    if cohort.split is None:
        idx = np.arange(len(bundle.manifest))
    else:
        idx = bundle.indices(cohort.split)
    rows = bundle.manifest.iloc[idx].reset_index(drop=True)
    rows.insert(0, "row", idx)
    try:
        bags = group_bags(rows, bag_by(run.cfg))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    view = bundle.view()  # [i]: manifest row i, as the attention table's `row`
    embedded = features.embed(
        scorer.model,
        RowView(bundle.patches, idx),
        scorer.preprocess,
        scorer.stain,
        int(cohort.data_cfg.eval_batch_size),
        scorer.autocast_dtype,
        f"embedding {cohort.name}",
    )
    head = scorer.model.head
    loader = bag_loader(embedded, bags, int(run.cfg.mil.batch_size), scorer.device)
    scores = scorer.for_features(head).score(loader, desc=f"scoring {cohort.name} bags")
    weights = attention(head, loader, scorer.device)
    brows = bag_rows(rows, bags)
    split = ScoredSplit(cohort.name, brows, scores.probs, None, scores.uncalibrated)
    called = scored_bags(brows, scores.probs, run.levels["tile"][operating_point])
    slides = bundle.manifest if cohort.data_cfg.get("source") == "slides" else None

    def extra(report_dir: Path) -> list[Path]:
        return write_attention(
            report_dir, cohort.name, rows, bags, weights, called, view, slides, figures
        )

    return split, extra
