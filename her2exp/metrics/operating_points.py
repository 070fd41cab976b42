"""Operating points: thresholds chosen on validation (Youden, a target sensitivity) and the
confusion-matrix rates, with Wilson intervals, of any split at a frozen threshold.

A case is called HER2+ when its score >= the threshold. Thresholds are chosen on validation
only; test and external cohorts are scored at those same values (:func:`at_threshold`), never
re-tuned.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import confusion_matrix, roc_curve

from her2exp.metrics._validation import check_scores, has_two_classes
from her2exp.metrics.proportions import ratio, wilson_interval
from her2exp.metrics.ranking import auc

__all__ = [
    "BinaryReport",
    "at_threshold",
    "choose_threshold",
    "operating_points",
    "threshold_for_sensitivity",
    "youden_threshold",
]


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """Threshold maximising J = sensitivity + specificity - 1 (predict HER2+ when score >= t).

    scikit-learn's first ROC threshold is +inf (predict nothing positive); it is never chosen
    because J = 0 there. Falls back to 0.5 with a warning when the ROC is undefined (one class).

    Reference: Youden (1950), Cancer 3(1):32-35.
    """
    labels, scores = check_scores(labels, scores)
    if np.unique(labels).size < 2:
        warnings.warn("Youden threshold undefined with one class; using 0.5", stacklevel=2)
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, scores)
    j = tpr - fpr
    best = int(np.argmax(j[1:])) + 1
    return float(min(thresholds[best], 1.0))


def threshold_for_sensitivity(
    labels: np.ndarray, scores: np.ndarray, target: float = 0.90
) -> float:
    """Highest-specificity threshold t (HER2+ when score >= t) whose sensitivity >= target.

    Candidates are the distinct scores (every distinct prediction on this split). Among those
    reaching the target, the one with the highest specificity wins; of equal specificity, the
    one with the higher sensitivity (the lowest such t), so no free sensitivity is given away.
    Falls back to 0.5 with a warning when the split has one class.
    """
    labels, scores = check_scores(labels, scores)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1]; got {target}")
    if not has_two_classes(labels, "a sensitivity-targeted threshold"):
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    feasible = np.flatnonzero(tpr >= target - 1e-12)  # tpr rises along the array
    first = int(feasible[0])
    best = int(np.flatnonzero(fpr == fpr[first])[-1])  # same specificity, most sensitivity
    return float(thresholds[best])


def operating_points(
    val_labels: np.ndarray, val_scores: np.ndarray, target_sensitivity: float = 0.90
) -> dict[str, float]:
    """The thresholds to freeze, all chosen on validation: Youden, sensitivity >= target, 0.5.

    Keys: "youden", f"sens{round(100 * target)}" (e.g. "sens90") and "p50".
    """
    name = f"sens{int(round(target_sensitivity * 100))}"
    return {
        "youden": youden_threshold(val_labels, val_scores),
        name: threshold_for_sensitivity(val_labels, val_scores, target_sensitivity),
        "p50": 0.5,
    }


_NAMED = re.compile(r"(?P<kind>sens|p)(?P<percent>\d{1,3})")


def choose_threshold(name: str, labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold the operating point called ``name`` picks on this split.

    The inverse of :func:`operating_points`' naming: "youden" -> :func:`youden_threshold`,
    "sensNN" -> :func:`threshold_for_sensitivity` with target NN/100, "pNN" -> NN/100. Used to
    check that thresholds applied to a test split are those its validation split chooses. A
    target that is not a whole percent (0.925 is named "sens92") re-derives at the named one.
    """
    if name == "youden":
        return youden_threshold(labels, scores)
    match = _NAMED.fullmatch(name)
    if match is None or not 0 < int(match["percent"]) <= 100:
        raise ValueError(f"unknown operating point {name!r}: expected youden, sensNN or pNN")
    percent = int(match["percent"]) / 100
    if match["kind"] == "p":
        return percent
    return threshold_for_sensitivity(labels, scores, percent)


@dataclass(frozen=True)
class BinaryReport:
    """Everything a reviewer reads off one split at one threshold.

    ``*_low``/``*_high`` are Wilson (1 - alpha) intervals (NaN when the denominator is 0).
    """

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
    sensitivity_low: float = math.nan
    sensitivity_high: float = math.nan
    specificity_low: float = math.nan
    specificity_high: float = math.nan
    precision_low: float = math.nan
    precision_high: float = math.nan
    npv_low: float = math.nan
    npv_high: float = math.nan
    accuracy_low: float = math.nan
    accuracy_high: float = math.nan

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def at_threshold(
    labels: np.ndarray, scores: np.ndarray, threshold: float, alpha: float = 0.05
) -> BinaryReport:
    """Confusion matrix with explicit labels [0, 1] and the rates derived from it.

    sensitivity = recall(HER2+) = TP/(TP+FN); specificity = TN/(TN+FP); precision = PPV =
    TP/(TP+FP); NPV = TN/(TN+FN); F1 = 2TP/(2TP+FP+FN); accuracy = (TP+TN)/n. Each rate but F1
    gets a Wilson interval over its own denominator; a rate over 0 cases is NaN.
    """
    labels, scores = check_scores(labels, scores)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        area = auc(labels, scores) if labels.size else math.nan
    return binary_report(labels, scores, threshold, area, alpha)


def binary_report(
    labels: np.ndarray, scores: np.ndarray, threshold: float, area: float, alpha: float
) -> BinaryReport:
    """:func:`at_threshold` on already checked arrays with the AUC already known (no checks:
    :func:`her2exp.metrics.evaluation.evaluate_split` calls it once per threshold)."""
    pred = (scores >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(labels, pred, labels=[0, 1]).ravel())
    counts = {
        "sensitivity": (tp, tp + fn),
        "specificity": (tn, tn + fp),
        "precision": (tp, tp + fp),
        "npv": (tn, tn + fn),
        "accuracy": (tp + tn, labels.size),
    }
    cis: dict[str, float] = {}
    for name, (k, n) in counts.items():
        cis[f"{name}_low"], cis[f"{name}_high"] = wilson_interval(k, n, alpha)
    return BinaryReport(
        n=int(labels.size),
        n_pos=int(labels.sum()),
        auc=area,
        threshold=float(threshold),
        tn=tn,
        fp=fp,
        fn=fn,
        tp=tp,
        **{name: ratio(k, n) for name, (k, n) in counts.items()},
        f1=ratio(2 * tp, 2 * tp + fp + fn),
        **cis,
    )
