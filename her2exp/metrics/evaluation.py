"""One evaluation of one split at frozen thresholds: :func:`evaluate_split` is the single entry
point the trainer, ``her2exp-eval`` and the reports use. Also the patient-level aggregation, the
error lists the report's galleries show and the JSON conversion of the results.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from her2exp.metrics._validation import check_probabilities, check_scores, has_two_classes
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
    fn = np.flatnonzero((labels == 1) & (scores < threshold))
    fp = np.flatnonzero((labels == 0) & (scores >= threshold))
    fn = fn[np.argsort(scores[fn], kind="stable")]
    fp = fp[np.argsort(-scores[fp], kind="stable")]
    return fn, fp


@dataclass(frozen=True)
class PatientScores:
    """One row per patient: the patient's label and the aggregate of its patch scores."""

    patient_ids: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    n_patches: np.ndarray
    how: str


def aggregate_by_patient(
    patient_ids: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    how: str = "mean",
) -> PatientScores:
    """Patch scores -> one score per patient: s_p = mean or max of s_i over patient p's patches.

    HER2 status is a patient (tumour) property, so a patient whose patches carry both labels
    is a data error, not something to average away: it raises, naming the patients.
    Patients come out in sorted id order.
    """
    labels, scores = check_scores(labels, scores)
    ids = np.asarray(patient_ids).ravel()
    if ids.shape != labels.shape:
        raise ValueError(f"{ids.size} patient ids but {labels.size} labels")
    if how not in ("mean", "max"):
        raise ValueError(f"how must be 'mean' or 'max'; got {how!r}")
    uniq, inv = np.unique(ids, return_inverse=True)
    k = uniq.size
    count = np.bincount(inv, minlength=k)
    n_pos = np.bincount(inv, weights=labels, minlength=k)
    mixed = (n_pos > 0) & (n_pos < count)
    if mixed.any():
        names = ", ".join(str(p) for p in uniq[mixed][:10])
        raise ValueError(
            f"{int(mixed.sum())} patient(s) have both HER2+ and HER2- patches: {names}"
        )
    if how == "mean":
        agg = np.bincount(inv, weights=scores, minlength=k) / np.maximum(count, 1)
    else:
        agg = np.full(k, -np.inf)
        np.maximum.at(agg, inv, scores)
    return PatientScores(uniq, (n_pos > 0).astype(np.int64), agg, count, how)


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
class PatientEvaluation:
    """Patient-level AUC and operating points (patch scores aggregated by ``how``)."""

    how: str
    n: int
    n_pos: int
    auc: AucCI
    reports: dict[str, BinaryReport]
    scores: PatientScores


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
    patient: PatientEvaluation | None = None
    labels: np.ndarray | None = field(default=None, repr=False, compare=False)
    scores: np.ndarray | None = field(default=None, repr=False, compare=False)

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
        if self.patient is not None:
            p = self.patient
            out[f"{prefix}patient_n"] = float(p.n)
            out[f"{prefix}patient_n_pos"] = float(p.n_pos)
            out[f"{prefix}patient_auc"] = p.auc.auc
            out[f"{prefix}patient_auc_low"] = p.auc.low
            out[f"{prefix}patient_auc_high"] = p.auc.high
            out.update(_flat_reports(p.reports, f"{prefix}patient_"))
        return {k: float(v) for k, v in out.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict (arrays -> lists, NaN -> None) for best.json."""
        patient = None
        if self.patient is not None:
            patient = {
                "how": self.patient.how,
                "n": self.patient.n,
                "n_pos": self.patient.n_pos,
                "auc": _dataclass_dict(self.patient.auc),
                "reports": {k: _dataclass_dict(v) for k, v in self.patient.reports.items()},
            }
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
            "patient": patient,
        }


def _evaluate_patients(
    patient_ids: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    thresholds: dict[str, float],
    how: str,
    alpha: float,
) -> PatientEvaluation:
    """Patch scores aggregated per patient, then DeLong AUC and a report per threshold."""
    agg = aggregate_by_patient(patient_ids, labels, scores, how)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p_auc = auc_ci_delong(agg.labels, agg.scores, alpha)
    return PatientEvaluation(
        how=how,
        n=int(agg.labels.size),
        n_pos=int(agg.labels.sum()),
        auc=p_auc,
        reports={
            name: binary_report(agg.labels, agg.scores, float(t), p_auc.auc, alpha)
            for name, t in thresholds.items()
        },
        scores=agg,
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
) -> SplitEvaluation:
    """The one evaluation path: AUC + CIs, reports at each frozen threshold, calibration, DCA.

    ``thresholds`` must have been chosen on validation
    (:func:`her2exp.metrics.operating_points.operating_points`); this function never tunes
    anything, so the test and external tables use exactly those values. ``scores`` are HER2+
    probabilities. With ``n_boot > 0`` a stratified bootstrap interval is added to DeLong's.
    With ``patient_ids``, patch scores are also aggregated per patient (``patient_how``) and
    scored at the same thresholds. A split with one class warns once and reports NaN AUCs.
    """
    labels, scores = check_scores(labels, scores)
    if labels.size == 0:
        raise ValueError("cannot evaluate an empty split")
    if not thresholds:
        raise ValueError("thresholds is empty: pass at least one frozen operating point")
    check_probabilities(scores, "evaluate_split")
    with warnings.catch_warnings():
        # One class present: warn once here, not once per metric below.
        warnings.simplefilter("ignore")
        delong = auc_ci_delong(labels, scores, alpha)
        boot = auc_ci_bootstrap(labels, scores, n_boot, seed, alpha) if n_boot > 0 else None
        roc = roc_with_band(labels, scores, alpha)
        pr = pr_curve(labels, scores)
    if math.isnan(delong.auc):
        has_two_classes(labels, "AUC")
    patient = None
    if patient_ids is not None:
        patient = _evaluate_patients(patient_ids, labels, scores, thresholds, patient_how, alpha)
    return SplitEvaluation(
        n=int(labels.size),
        n_pos=int(labels.sum()),
        auc=delong,
        auc_bootstrap=boot,
        thresholds={k: float(v) for k, v in thresholds.items()},
        reports={
            name: binary_report(labels, scores, float(t), delong.auc, alpha)
            for name, t in thresholds.items()
        },
        calibration=calibration(labels, scores, calibration_bins),
        decision_curve=decision_curve(labels, scores),
        roc=roc,
        pr=pr,
        patient=patient,
        labels=labels,
        scores=scores,
    )
