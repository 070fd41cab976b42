"""Binary HER2 metrics: AUC, the Youden threshold chosen on validation, and the confusion-derived
rates at any frozen threshold.

Pure functions over numpy arrays. Label 1 is HER2+ (the positive class). Every rate is defined
as 0/0 -> NaN rather than raising, so a split with one class or a model that never predicts a
class still yields a complete (if partly NaN) table.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (HER2-) or 1 (HER2+); got {np.unique(labels)}")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    return labels, scores


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else math.nan


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN with a warning when only one class is present (AUC is undefined then)."""
    labels, scores = _check(labels, scores)
    if np.unique(labels).size < 2:
        warnings.warn("AUC is undefined with a single class present; reporting NaN", stacklevel=2)
        return math.nan
    return float(roc_auc_score(labels, scores))


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """Threshold maximising J = sensitivity + specificity - 1 (predict HER2+ when score >= t).

    scikit-learn's first ROC threshold is +inf (predict nothing positive); it is never chosen
    because J = 0 there. Falls back to 0.5 when the ROC is undefined (one class).
    """
    labels, scores = _check(labels, scores)
    if np.unique(labels).size < 2:
        warnings.warn("Youden threshold undefined with one class; using 0.5", stacklevel=2)
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, scores)
    j = tpr - fpr
    best = int(np.argmax(j[1:])) + 1
    return float(min(thresholds[best], 1.0))


@dataclass(frozen=True)
class BinaryReport:
    """Everything a reviewer reads off one split at one threshold."""

    n: int
    n_pos: int
    auc: float
    threshold: float
    tn: int
    fp: int
    fn: int
    tp: int
    sensitivity: float
    specificity: float
    precision: float
    npv: float
    f1: float
    accuracy: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> BinaryReport:
    """Confusion matrix with explicit labels [0, 1] and the rates derived from it.

    sensitivity = recall(HER2+) = TP/(TP+FN); specificity = TN/(TN+FP); precision = PPV =
    TP/(TP+FP); NPV = TN/(TN+FN); F1 = 2TP/(2TP+FP+FN).
    """
    labels, scores = _check(labels, scores)
    pred = (scores >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(labels, pred, labels=[0, 1]).ravel())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        area = auc(labels, scores) if labels.size else math.nan
    return BinaryReport(
        n=int(labels.size),
        n_pos=int(labels.sum()),
        auc=area,
        threshold=float(threshold),
        tn=tn,
        fp=fp,
        fn=fn,
        tp=tp,
        sensitivity=_ratio(tp, tp + fn),
        specificity=_ratio(tn, tn + fp),
        precision=_ratio(tp, tp + fp),
        npv=_ratio(tn, tn + fn),
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        accuracy=_ratio(tp + tn, labels.size),
    )
