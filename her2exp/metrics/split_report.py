"""One evaluation of one split at frozen thresholds: :func:`evaluate_split` is the single entry
point the trainer, ``her2exp-eval`` and the reports use, at the tile level and (given ids) the
slide and patient levels, each at its own frozen thresholds. Also the error lists the report's
galleries show and the JSON conversion of the results (aggregation: :mod:`.levels`).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from her2exp.core.fileio import safe_name
from her2exp.metrics._validation import check_probabilities, check_scores, has_two_classes
from her2exp.metrics.decision import called
from her2exp.metrics.levels import (
    GroupScores,
    PatientScores,
    aggregate_by_patient,
    as_level_thresholds,
    level_scores,
)
from her2exp.metrics.operating_points import BinaryReport, binary_report
from her2exp.metrics.probabilities import Calibration, DecisionCurve, calibration, decision_curve
from her2exp.metrics.ranking import (
    AucCI,
    PrCurve,
    RocCurve,
    auc_ci_bootstrap,
    auc_ci_delong,
    pr_curve,
    roc_with_band,
)

__all__ = [
    "LevelEvaluation",
    "SiteEvaluation",
    "PatientEvaluation",
    "PatientScores",
    "SplitEvaluation",
    "aggregate_by_patient",
    "evaluate_split",
    "misclassified",
    "to_jsonable",
]


def misclassified(
    labels: np.ndarray, scores: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of false negatives (lowest score first) and false positives (highest first).

    The worst misses lead each list: a HER2+ patch the model scored near 0 is the first thing a
    pathologist should look at. Ties keep their input order.
    """
    labels, scores = check_scores(labels, scores)
    calls = called(scores, threshold)
    fn = np.flatnonzero((labels == 1) & (calls == 0))
    fp = np.flatnonzero((labels == 0) & (calls == 1))
    fn = fn[np.argsort(scores[fn], kind="stable")]
    fp = fp[np.argsort(-scores[fp], kind="stable")]
    return fn, fp


def to_jsonable(value: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None (null), numpy scalars/arrays -> Python, paths -> str."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _dataclass_dict(obj: Any) -> Any:
    return None if obj is None else to_jsonable(asdict(obj))


def _flat_reports(reports: dict[str, BinaryReport], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, rep in reports.items():
        for key, value in rep.as_dict().items():
            if key not in ("n", "n_pos", "auc"):
                out[f"{prefix}{name}_{key}"] = float(value)
    return out


@dataclass(frozen=True)
class LevelEvaluation:
    """Slide- or patient-level AUC, ROC and a report per threshold frozen at that level (tile
    scores aggregated by ``how``). ``reports`` is empty when no thresholds were frozen there (a
    checkpoint from before levels: its AUC is still reported)."""

    level: str
    how: str
    n: int
    n_pos: int
    auc: AucCI
    reports: dict[str, BinaryReport]
    scores: GroupScores
    thresholds: dict[str, float] = field(default_factory=dict)
    roc: RocCurve | None = field(default=None, repr=False)

    def as_flat_dict(self, prefix: str) -> dict[str, float]:
        out = {
            f"{prefix}n": float(self.n),
            f"{prefix}n_pos": float(self.n_pos),
            f"{prefix}auc": self.auc.auc,
            f"{prefix}auc_low": self.auc.low,
            f"{prefix}auc_high": self.auc.high,
        }
        out.update(_flat_reports(self.reports, prefix))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "how": self.how,
            "n": self.n,
            "n_pos": self.n_pos,
            "auc": _dataclass_dict(self.auc),
            "thresholds": to_jsonable(self.thresholds),
            "reports": {k: _dataclass_dict(v) for k, v in self.reports.items()},
        }


PatientEvaluation = LevelEvaluation  # the name from before slides


@dataclass(frozen=True)
class SplitEvaluation:
    """Everything reported for one split (val, test, an external cohort) at frozen thresholds.

    ``labels``/``scores`` are the checked inputs (kept so that the report can re-derive what
    the validation split chooses; not part of :meth:`to_dict` or :meth:`as_flat_dict`).
    """

    n: int
    n_pos: int
    auc: AucCI
    auc_bootstrap: AucCI | None
    thresholds: dict[str, float]
    reports: dict[str, BinaryReport]
    calibration: Calibration
    decision_curve: DecisionCurve
    roc: RocCurve | None
    pr: PrCurve | None
    patient: LevelEvaluation | None = None
    slide: LevelEvaluation | None = None
    labels: np.ndarray | None = field(default=None, repr=False, compare=False)
    scores: np.ndarray | None = field(default=None, repr=False, compare=False)
    # The patient and slide of each tile (the promised point's bound and re-derivation).
    patient_ids: np.ndarray | None = field(default=None, repr=False, compare=False)
    slide_ids: np.ndarray | None = field(default=None, repr=False, compare=False)
    sites: dict[str, SiteEvaluation] = field(default_factory=dict)

    def as_flat_dict(self, prefix: str = "") -> dict[str, float]:
        """Scalar metrics named ``{prefix}auc``, ``{prefix}youden_sensitivity_low``, ...

        Ready for ``mlflow.log_metrics``; NaN stays NaN (MLflow stores it).
        """
        out: dict[str, float] = {
            f"{prefix}n": float(self.n),
            f"{prefix}n_pos": float(self.n_pos),
            f"{prefix}auc": self.auc.auc,
            f"{prefix}auc_low": self.auc.low,
            f"{prefix}auc_high": self.auc.high,
            f"{prefix}auc_se": self.auc.se,
        }
        if self.auc_bootstrap is not None:
            out[f"{prefix}auc_boot_low"] = self.auc_bootstrap.low
            out[f"{prefix}auc_boot_high"] = self.auc_bootstrap.high
            out[f"{prefix}auc_boot_se"] = self.auc_bootstrap.se
        out.update(_flat_reports(self.reports, prefix))
        out[f"{prefix}brier"] = self.calibration.brier
        out[f"{prefix}ece"] = self.calibration.ece
        if self.pr is not None:
            out[f"{prefix}average_precision"] = self.pr.average_precision
        for level in self.levels().values():
            out.update(level.as_flat_dict(f"{prefix}{level.level}_"))
        for site in self.sites.values():
            out.update(site.as_flat_dict(prefix))
        return {k: float(v) for k, v in out.items()}

    def levels(self) -> dict[str, LevelEvaluation]:
        """The slide and patient levels present, in that order."""
        return {ev.level: ev for ev in (self.slide, self.patient) if ev is not None}

    def level_reports(self, level: str) -> dict[str, BinaryReport]:
        """The reports at one level's frozen thresholds ("tile": this split's own)."""
        if level == "tile":
            return self.reports
        ev = self.levels().get(level)
        return {} if ev is None else ev.reports

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict (arrays -> lists, NaN -> None) for best.json."""
        ap = None if self.pr is None else to_jsonable(self.pr.average_precision)
        return {
            "n": self.n,
            "n_pos": self.n_pos,
            "auc": _dataclass_dict(self.auc),
            "auc_bootstrap": _dataclass_dict(self.auc_bootstrap),
            "thresholds": to_jsonable(self.thresholds),
            "reports": {k: _dataclass_dict(v) for k, v in self.reports.items()},
            "calibration": _dataclass_dict(self.calibration),
            "decision_curve": _dataclass_dict(self.decision_curve),
            "average_precision": ap,
            "slide": None if self.slide is None else self.slide.to_dict(),
            "patient": None if self.patient is None else self.patient.to_dict(),
            "sites": {k: v.to_dict() for k, v in self.sites.items()},
        }


#: The per-site statistics of the flat dict (rows of reports/metrics.csv): the pooled split has
#: the full set.
SITE_METRICS = ("sensitivity", "specificity")


@dataclass(frozen=True)
class SiteEvaluation:
    """One site's part of a split, scored at the pooled split's frozen thresholds (never
    re-tuned per site). ``note`` says why a number is missing (one class at this site)."""

    site: str
    evaluation: SplitEvaluation
    note: str = ""

    @property
    def metric_name(self) -> str:
        """The site as an MLflow name part: [A-Za-z0-9._-] kept, the rest `_` plus a hash."""
        return safe_name(self.site)

    def as_flat_dict(self, prefix: str = "") -> dict[str, float]:
        """``{prefix}site_<name>_auc`` (``_low``, ``_high``, ``n``, ``n_pos``) and, per frozen
        operating point, ``..._<op>_sensitivity`` / ``_specificity`` with their Wilson bounds;
        the slide and patient levels as ``{prefix}site_<name>_patient_auc`` and so on."""
        ev, base = self.evaluation, f"{prefix}site_{self.metric_name}_"
        out: dict[str, float] = {}
        entries = [("", ev.n, ev.n_pos, ev.auc, ev.reports)]
        entries += [
            (f"{lv.level}_", lv.n, lv.n_pos, lv.auc, lv.reports) for lv in ev.levels().values()
        ]
        for infix, n, n_pos, area, reports in entries:
            p = f"{base}{infix}"
            out.update({f"{p}n": n, f"{p}n_pos": n_pos, f"{p}auc": area.auc})
            out.update({f"{p}auc_low": area.low, f"{p}auc_high": area.high})
            for op, rep in reports.items():
                for key in SITE_METRICS:
                    for suffix in ("", "_low", "_high"):
                        out[f"{p}{op}_{key}{suffix}"] = getattr(rep, f"{key}{suffix}")
        return {k: float(v) for k, v in out.items()}

    def to_dict(self) -> dict[str, Any]:
        ev = self.evaluation
        return {
            "site": self.site,
            "note": self.note,
            "n": ev.n,
            "n_pos": ev.n_pos,
            "auc": _dataclass_dict(ev.auc),
            "reports": {k: _dataclass_dict(v) for k, v in ev.reports.items()},
            "slide": None if ev.slide is None else ev.slide.to_dict(),
            "patient": None if ev.patient is None else ev.patient.to_dict(),
        }


def _evaluate_level(
    level: str, agg: GroupScores, thresholds: dict[str, float], alpha: float
) -> LevelEvaluation:
    """DeLong AUC, ROC and a report per threshold frozen at this level, on its aggregates."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one class: the tile level has warned already
        area = auc_ci_delong(agg.labels, agg.scores, alpha)
        roc = roc_with_band(agg.labels, agg.scores, alpha)
    return LevelEvaluation(
        level=level,
        how=agg.how,
        n=int(agg.labels.size),
        n_pos=int(agg.labels.sum()),
        auc=area,
        reports=_reports(agg.labels, agg.scores, thresholds, area.auc, alpha),
        scores=agg,
        thresholds={k: float(v) for k, v in thresholds.items()},
        roc=roc,
    )


def evaluate_split(
    labels: np.ndarray,
    scores: np.ndarray,
    thresholds: dict[str, float],
    patient_ids: np.ndarray | None = None,
    n_boot: int = 0,
    seed: int = 0,
    alpha: float = 0.05,
    patient_how: str = "mean",
    calibration_bins: int = 10,
    slide_ids: np.ndarray | None = None,
    slide_how: str = "mean",
    topk: int = 8,
    level_thresholds: dict[str, dict[str, float]] | None = None,
    site_ids: np.ndarray | None = None,
) -> SplitEvaluation:
    """The one evaluation path: AUC + CIs, reports at each frozen threshold, calibration, DCA.

    ``thresholds`` must have been chosen on validation
    (:func:`her2exp.metrics.operating_points.operating_points`); this function never tunes
    anything, so the test and external tables use exactly those values. ``scores`` are HER2+
    probabilities. With ``n_boot > 0`` a stratified bootstrap interval is added to DeLong's.
    With ``slide_ids`` / ``patient_ids``, tile scores are also aggregated per slide
    (``slide_how``) / patient (``patient_how``; ``topk`` for topk_mean) and each level is scored
    at ``level_thresholds[level]``, frozen at that level on validation (keyed as
    :func:`~her2exp.metrics.levels.operating_points_by_level` returns; its "tile" entry, when
    given, must equal ``thresholds``). Without ``level_thresholds`` the levels are scored at
    ``thresholds`` (what direct callers got before levels); a level missing from a given
    ``level_thresholds`` gets its AUC and no reports. A split with one class warns once and
    reports NaN AUCs. With ``site_ids`` of more than one site, each site is also evaluated at
    the same frozen thresholds (:class:`SiteEvaluation`, in ``sites``).
    """
    labels, scores = _checked_split(labels, scores, thresholds)
    delong, boot, roc, pr = _ranking(labels, scores, n_boot, seed, alpha)
    levels = _evaluate_levels(
        labels,
        scores,
        thresholds,
        level_thresholds,
        alpha,
        ids=(slide_ids, patient_ids),
        how=(slide_how, patient_how, topk),
    )
    return SplitEvaluation(
        n=int(labels.size),
        n_pos=int(labels.sum()),
        auc=delong,
        auc_bootstrap=boot,
        thresholds={k: float(v) for k, v in thresholds.items()},
        reports=_reports(labels, scores, thresholds, delong.auc, alpha),
        calibration=calibration(labels, scores, calibration_bins),
        decision_curve=decision_curve(labels, scores),
        roc=roc,
        pr=pr,
        patient=levels.get("patient"),
        slide=levels.get("slide"),
        labels=labels,
        scores=scores,
        patient_ids=None if patient_ids is None else np.asarray(patient_ids).ravel(),
        slide_ids=None if slide_ids is None else np.asarray(slide_ids).ravel(),
        sites=evaluate_sites(
            site_ids,
            labels,
            scores,
            thresholds,
            dict(
                patient_ids=patient_ids,
                alpha=alpha,
                patient_how=patient_how,
                calibration_bins=calibration_bins,
                slide_ids=slide_ids,
                slide_how=slide_how,
                topk=topk,
                level_thresholds=level_thresholds,
            ),
        ),
    )


def _checked_split(
    labels: np.ndarray, scores: np.ndarray, thresholds: dict[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores as validated arrays; an empty split, no frozen threshold or scores
    that are not probabilities raise a ValueError."""
    labels, scores = check_scores(labels, scores)
    if labels.size == 0:
        raise ValueError("cannot evaluate an empty split")
    if not thresholds:
        raise ValueError("thresholds is empty: pass at least one frozen operating point")
    check_probabilities(scores, "evaluate_split")
    return labels, scores


def _ranking(
    labels: np.ndarray, scores: np.ndarray, n_boot: int, seed: int, alpha: float
) -> tuple[AucCI, AucCI | None, RocCurve, PrCurve]:
    """DeLong AUC (and a bootstrap interval when n_boot > 0), ROC with its band, PR curve; a
    split with one class warns once here, not once per metric."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        delong = auc_ci_delong(labels, scores, alpha)
        boot = auc_ci_bootstrap(labels, scores, n_boot, seed, alpha) if n_boot > 0 else None
        roc = roc_with_band(labels, scores, alpha)
        pr = pr_curve(labels, scores)
    if math.isnan(delong.auc):
        has_two_classes(labels, "AUC")
    return delong, boot, roc, pr


def _reports(
    labels: np.ndarray, scores: np.ndarray, thresholds: dict[str, float], auc: float, alpha: float
) -> dict[str, BinaryReport]:
    """The rates at each frozen threshold, by its name."""
    return {
        name: binary_report(labels, scores, float(t), auc, alpha) for name, t in thresholds.items()
    }


def _evaluate_levels(
    labels: np.ndarray,
    scores: np.ndarray,
    thresholds: dict[str, float],
    level_thresholds: dict[str, dict[str, float]] | None,
    alpha: float,
    ids: tuple[np.ndarray | None, np.ndarray | None],
    how: tuple[str, str, int],
) -> dict[str, LevelEvaluation]:
    """The slide and patient levels that `ids` (slide_ids, patient_ids) give, each scored at its
    own frozen thresholds (`thresholds` when no `level_thresholds` were given); `how` is
    (slide_how, patient_how, topk)."""
    frozen = as_level_thresholds(level_thresholds) if level_thresholds is not None else None
    slide_ids, patient_ids = ids
    slide_how, patient_how, topk = how
    return {
        level: _evaluate_level(
            level, agg, thresholds if frozen is None else frozen.get(level, {}), alpha
        )
        for level, agg in level_scores(
            labels, scores, slide_ids, patient_ids, slide_how, patient_how, topk
        ).items()
    }


def evaluate_sites(
    site_ids: np.ndarray | None,
    labels: np.ndarray,
    scores: np.ndarray,
    thresholds: dict[str, float],
    options: dict[str, Any],
) -> dict[str, SiteEvaluation]:
    """:func:`evaluate_split` of each site's rows at the pooled frozen thresholds (no
    bootstrap); nothing with one site. A site with one class gets NaN AUCs and a note, not a
    warning per metric."""
    if site_ids is None:
        return {}
    sites = np.asarray(site_ids).astype(str).ravel()
    if sites.shape != labels.shape:
        raise ValueError(f"{sites.size} site ids but {labels.size} labels")
    names = np.unique(sites)
    if names.size < 2:
        return {}
    out: dict[str, SiteEvaluation] = {}
    for name in names:
        keep = sites == name
        part = {
            k: (np.asarray(v).ravel()[keep] if k.endswith("_ids") and v is not None else v)
            for k, v in options.items()
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ev = evaluate_split(labels[keep], scores[keep], thresholds, **part)
        n_pos = int(labels[keep].sum())
        note = ""
        if n_pos in (0, int(keep.sum())):
            note = f"one class ({'HER2+' if n_pos else 'HER2-'} only): AUC and one rate undefined"
        out[str(name)] = SiteEvaluation(str(name), ev, note)
    return out
