"""A scored cohort and what is read off it: `ScoredSplit` (probabilities with their manifest
rows), operating points chosen on scored rows, metrics at frozen thresholds, and the one-row-
per-slide/patient table. Shared by training's final evaluation, her2exp-eval, ensembles,
bags and predict (`level_table`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from her2exp import metrics

if TYPE_CHECKING:
    from her2exp.data import RowView


@dataclass
class ScoredSplit:
    """One cohort's HER2+ probabilities with the manifest rows they belong to, in order."""

    name: str
    rows: pd.DataFrame  # manifest rows (label, patient_id, ...) in scoring order
    probs: np.ndarray
    # uint8 (N, H, W, 3) for the error galleries: a RowView reads only the patches shown
    images: np.ndarray | RowView | None = None
    # The model's own probabilities where `probs` are temperature-scaled (the before/after
    # calibration report); None: `probs` are the model's own.
    uncalibrated: np.ndarray | None = None
    member_sd: np.ndarray | None = None  # an ensemble's per-patch sd across its members

    @property
    def labels(self) -> np.ndarray:
        return self.rows["label"].to_numpy()


def row_ids(rows: pd.DataFrame, column: str) -> np.ndarray | None:
    return rows[column].astype(str).to_numpy() if column in rows else None


def thresholds_on_rows(
    ecfg: DictConfig, rows: pd.DataFrame, labels: np.ndarray, probs: np.ndarray
) -> dict[str, dict[str, float]]:
    """Operating points chosen at the tile, slide and patient level on scored `rows` (their
    slide and patient ids group the tiles, aggregated as `ecfg` says): a run's validation split
    (final.choose_thresholds) or an ensemble's pooled tables (ensemble.ensemble_thresholds)."""
    return metrics.operating_points_by_level(
        labels,
        probs,
        row_ids(rows, "slide_id"),
        row_ids(rows, "patient_id"),
        ecfg.target_sensitivity,
        ecfg.slide_aggregation,
        ecfg.patient_aggregation,
        ecfg.topk,
        ecfg.get("lcb_confidence", 0.95),
    )


def evaluate_scored(
    s: ScoredSplit, levels: dict[str, dict[str, float]], ecfg: DictConfig, seed: int
) -> metrics.SplitEvaluation:
    """metrics.evaluate_split of one scored split, each level at its own frozen thresholds."""
    return metrics.evaluate_split(
        s.labels,
        s.probs,
        levels["tile"],
        patient_ids=row_ids(s.rows, "patient_id"),
        n_boot=ecfg.n_boot,
        seed=seed,
        patient_how=ecfg.patient_aggregation,
        slide_ids=row_ids(s.rows, "slide_id"),
        slide_how=ecfg.slide_aggregation,
        topk=ecfg.topk,
        level_thresholds=levels,
        site_ids=row_ids(s.rows, "site"),
    )


def level_table(
    level: str,
    agg: metrics.GroupScores,
    thresholds: dict[str, float],
    rows: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per slide or patient: its aggregate score and calls at that level's thresholds
    (a slide row also names its patient, from the tile `rows`)."""
    key = f"{level}_id"
    table = pd.DataFrame(
        {key: agg.ids, "label": agg.labels, "n_tiles": agg.n_tiles, "prob_her2_pos": agg.scores}
    )
    if level == "slide" and rows is not None and "patient_id" in rows:
        owner = rows.assign(slide_id=rows["slide_id"].astype(str))
        owner = owner.drop_duplicates("slide_id").set_index("slide_id")["patient_id"]
        table.insert(1, "patient_id", table[key].map(owner).to_numpy())
    for column, calls in metrics.called_columns(agg.scores, thresholds).items():
        table[column] = calls
    return table
