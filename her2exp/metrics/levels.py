"""The three levels a HER2 call can be made at: tile (patch), slide and patient.

Tiles belong to slides and slides to patients (the manifest's ``slide_id`` and ``patient_id``).
A slide's and a patient's score both aggregate their *tile* scores directly
(:func:`aggregate_by_group`: mean, max or the mean of the k highest), so the patient level does
not depend on how tiles happen to be spread over a patient's slides. Operating points belong to
a level: :func:`operating_points_by_level` chooses them on validation at every level, and
:func:`as_level_thresholds` reads what a checkpoint froze (the flat dict of checkpoints written
before levels existed is the tile level).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from her2exp.metrics._validation import check_scores
from her2exp.metrics.operating_points import operating_points

__all__ = [
    "AGGREGATIONS",
    "LEVELS",
    "GroupScores",
    "aggregate_by_group",
    "aggregate_by_patient",
    "as_level_thresholds",
    "level_groups",
    "level_scores",
    "operating_points_by_level",
]

LEVELS = ("tile", "slide", "patient")
AGGREGATIONS = ("mean", "max", "topk_mean")


@dataclass(frozen=True)
class GroupScores:
    """One row per group (slide or patient): its label and the aggregate of its tile scores."""

    ids: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    n_tiles: np.ndarray
    how: str

    @property
    def patient_ids(self) -> np.ndarray:  # the name of the patient-only version
        return self.ids

    @property
    def n_patches(self) -> np.ndarray:
        return self.n_tiles


PatientScores = GroupScores


def aggregate_by_group(
    ids: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    how: str = "mean",
    topk: int = 8,
    what: str = "group",
) -> GroupScores:
    """Tile scores -> one score per group: the mean, the max, or ``topk_mean`` (the mean of the
    ``topk`` highest scores; of all of them when a group has fewer tiles).

    HER2 status belongs to the patient (tumour), so a group whose tiles carry both labels is a
    data error, not something to average away: it raises, naming the groups (``what``: "slide",
    "patient"). Groups come out in sorted id order. Vectorised: one sort for the whole cohort,
    no Python loop per group.
    """
    labels, scores = check_scores(labels, scores)
    ids = np.asarray(ids).ravel()
    if ids.shape != labels.shape:
        raise ValueError(f"{ids.size} {what} ids but {labels.size} labels")
    if how not in AGGREGATIONS:
        raise ValueError(f"how must be one of {', '.join(AGGREGATIONS)}; got {how!r}")
    if int(topk) < 1:
        raise ValueError(f"topk must be an integer >= 1; got {topk}")
    uniq, inv = np.unique(ids, return_inverse=True)
    inv = inv.ravel()
    k = uniq.size
    count = np.bincount(inv, minlength=k)
    n_pos = np.bincount(inv, weights=labels, minlength=k)
    mixed = (n_pos > 0) & (n_pos < count)
    if mixed.any():
        names = ", ".join(str(p) for p in uniq[mixed][:10])
        raise ValueError(f"{int(mixed.sum())} {what}(s) have both HER2+ and HER2- patches: {names}")
    if how == "mean":
        agg = np.bincount(inv, weights=scores, minlength=k) / np.maximum(count, 1)
    else:
        kept = 1 if how == "max" else int(topk)
        order = np.lexsort((-scores, inv))  # by group, highest score first within each
        start = np.concatenate(([0], np.cumsum(count)[:-1]))
        rank = np.arange(order.size) - start[inv[order]]
        top = order[rank < kept]
        agg = np.bincount(inv[top], weights=scores[top], minlength=k) / np.minimum(count, kept)
    return GroupScores(uniq, (n_pos > 0).astype(np.int64), agg, count, how)


def aggregate_by_patient(
    patient_ids: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    how: str = "mean",
    topk: int = 8,
) -> GroupScores:
    """:func:`aggregate_by_group` over patients (the name evaluations used before slides)."""
    return aggregate_by_group(patient_ids, labels, scores, how, topk, "patient")


def check_slides_in_patients(slide_ids: np.ndarray, patient_ids: np.ndarray) -> None:
    """Each slide belongs to one patient; a slide id shared by two patients would merge them."""
    slides, inv = np.unique(np.asarray(slide_ids).ravel(), return_inverse=True)
    _, pinv = np.unique(np.asarray(patient_ids).ravel(), return_inverse=True)
    pairs = np.unique(np.stack([inv.ravel(), pinv.ravel()]), axis=1)
    shared = np.flatnonzero(np.bincount(pairs[0], minlength=slides.size) > 1)
    if shared.size:
        names = ", ".join(str(s) for s in slides[shared][:10])
        raise ValueError(f"{shared.size} slide id(s) belong to more than one patient: {names}")


def level_scores(
    labels: np.ndarray,
    scores: np.ndarray,
    slide_ids: np.ndarray | None,
    patient_ids: np.ndarray | None,
    slide_how: str = "mean",
    patient_how: str = "mean",
    topk: int = 8,
) -> dict[str, GroupScores]:
    """The slide and patient aggregates of one split (a level without ids is left out)."""
    out: dict[str, GroupScores] = {}
    if slide_ids is not None and patient_ids is not None:
        check_slides_in_patients(slide_ids, patient_ids)
    if slide_ids is not None:
        out["slide"] = aggregate_by_group(slide_ids, labels, scores, slide_how, topk, "slide")
    if patient_ids is not None:
        out["patient"] = aggregate_by_group(
            patient_ids, labels, scores, patient_how, topk, "patient"
        )
    return out


def operating_points_by_level(
    labels: np.ndarray,
    scores: np.ndarray,
    slide_ids: np.ndarray | None,
    patient_ids: np.ndarray | None,
    target_sensitivity: float = 0.90,
    slide_how: str = "mean",
    patient_how: str = "mean",
    topk: int = 8,
    confidence: float = 0.95,
) -> dict[str, dict[str, float]]:
    """:func:`operating_points` on validation at every level: tile scores, slide aggregates,
    patient aggregates. One class at a level warns (naming it) and falls back to 0.5, as at the
    tile level; since a slide or patient has one label, a level has one class exactly when the
    tiles have. The promised point's bound counts patients (:func:`level_groups`)."""
    levels = {"tile": check_scores(labels, scores)}
    for level, agg in level_scores(
        labels, scores, slide_ids, patient_ids, slide_how, patient_how, topk
    ).items():
        levels[level] = (agg.labels, agg.scores)
    out: dict[str, dict[str, float]] = {}
    for level, (lab, sc) in levels.items():
        groups = level_groups(level, slide_ids, patient_ids)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out[level] = operating_points(lab, sc, target_sensitivity, confidence, groups)
        for w in dict.fromkeys(str(c.message) for c in caught):
            warnings.warn(f"{level} level of validation: {w}", stacklevel=2)
    return out


def level_groups(
    level: str, slide_ids: np.ndarray | None, patient_ids: np.ndarray | None
) -> np.ndarray | None:
    """The patient of each unit of ``level`` (tiles: the tile's; slides, in sorted slide id
    order: the slide's), so that a bound on sensitivity counts correlated units as the patients
    they come from; None at the patient level or without patient ids (each unit is its own)."""
    if patient_ids is None or level == "patient":
        return None
    patients = np.asarray(patient_ids).astype(str).ravel()
    if level == "tile":
        return patients
    if slide_ids is None:
        return None
    slides = np.asarray(slide_ids).astype(str).ravel()
    _, first = np.unique(slides, return_index=True)
    return patients[first]


def as_level_thresholds(frozen: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Thresholds keyed by level from what a checkpoint (or a caller) holds: ``{"tile": {...},
    "slide": {...}, "patient": {...}}``, or the flat ``{name: value}`` of checkpoints written
    before levels, which is the tile level."""
    if not frozen:
        return {}
    if all(isinstance(v, Mapping) for v in frozen.values()):
        unknown = [k for k in frozen if k not in LEVELS]
        if unknown:
            raise ValueError(f"thresholds for unknown level(s) {unknown}: expected {LEVELS}")
        return {
            lvl: {k: float(v) for k, v in frozen[lvl].items()} for lvl in LEVELS if lvl in frozen
        }
    return {"tile": {k: float(v) for k, v in frozen.items()}}
