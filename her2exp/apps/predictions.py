"""What `her2exp-predict` returns and how its tiles are called at the decision level: shared by
patch folders and slides (apps/predict.py) and by MIL runs' bags (apps/predict_bags.py), which
both sit above this module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from her2exp import metrics
from her2exp.evaluation.scored import level_table
from her2exp.evaluation.trained_run import TrainedRun, resolve_evaluation


@dataclass
class Predictions:
    """What her2exp-predict writes: the tiles, the decision level's groups, unreadable files."""

    tiles: pd.DataFrame
    errors: list[tuple[str, str]]
    level: str = "tile"
    groups: pd.DataFrame | None = None  # one row per slide or patient (level slide|patient)


def call(
    run: TrainedRun,
    level: str,
    thresholds: dict[str, float],
    tiles: pd.DataFrame,
    groups: pd.DataFrame | None,
    errors: list[tuple[str, str]],
) -> Predictions:
    """Called columns at the decision level: a tile's own score, or its group's aggregate."""
    if groups is not None:
        found = groups.loc[[str(Path(p).resolve()) for p in tiles["path"]]]
        tiles.insert(1, "slide_id", found["slide_id"].to_numpy())
        tiles.insert(2, "patient_id", found["patient_id"].to_numpy())
    if level == "tile" or tiles.empty:
        for column, calls in metrics.called_columns(tiles["prob_her2_pos"], thresholds).items():
            tiles[column] = calls
        return Predictions(tiles, errors, level)
    e = resolve_evaluation(run.cfg.get("evaluation"), OmegaConf.create({}))
    ids = tiles[f"{level}_id"].to_numpy()
    # Labels are unknown here: all 0, so no group is refused for mixed labels.
    agg = metrics.aggregate_by_group(
        ids,
        np.zeros(len(tiles), dtype=int),
        tiles["prob_her2_pos"].to_numpy(),
        e[f"{level}_aggregation"],
        e.topk,
        level,
    )
    table = level_table(level, agg, thresholds, tiles).drop(columns="label")
    pos = pd.Index(agg.ids).get_indexer(ids)
    for column, calls in metrics.called_columns(agg.scores[pos], thresholds).items():
        tiles[column] = calls
    return Predictions(tiles, errors, level, table)
