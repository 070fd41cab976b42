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
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, roc_curve

from her2exp.metrics._validation import check_scores, has_two_classes
from her2exp.metrics.decision import called
from her2exp.metrics.proportions import ratio, wilson_interval
from her2exp.metrics.ranking import auc

__all__ = [
    "BinaryReport",
    "Promise",
    "at_threshold",
    "choose_threshold",
    "effective_n",
    "lcb_name",
    "operating_points",
    "positives_needed",
    "promise",
    "sensitivity_lcb",
    "threshold_for_sensitivity",
    "threshold_for_sensitivity_lcb",
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


# -- a sensitivity one can promise: a one-sided lower confidence bound on validation --------------


def sensitivity_lcb(tp: np.ndarray | float, n: np.ndarray | float, confidence: float) -> Any:
    """One-sided Clopper-Pearson lower bound on a sensitivity: ``tp`` caught of ``n`` positives.

    The exact binomial bound, ``Beta(1 - confidence; tp, n - tp + 1)`` (0 when nothing is caught);
    the value scipy's ``binomtest(tp, n).proportion_ci(2 * confidence - 1, "exact").low`` gives.
    ``tp`` and ``n`` may be real (an effective sample size) and arrays.
    """
    from scipy.stats import beta

    tp, n = np.asarray(tp, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        low = beta.ppf(1.0 - confidence, np.maximum(tp, 1e-300), n - tp + 1.0)
    low = np.where(tp > 0, low, 0.0)
    return float(low) if low.ndim == 0 else low


def positives_needed(target: float, confidence: float) -> int:
    """The fewest positives whose bound can reach ``target``: all caught, ``target**n <= 1 -
    confidence``, i.e. ``ceil(log(1 - confidence) / log(target))`` (29 for 0.90 at 95%)."""
    return int(math.ceil(math.log(1.0 - confidence) / math.log(target) - 1e-12))


def effective_n(groups: np.ndarray | None, labels: np.ndarray) -> float:
    """How many independent positives the positive tiles are worth: ``(sum n_i)^2 / sum n_i^2``
    over the positive patients' tile counts ``n_i`` (Kish's design effect with an intra-patient
    correlation of 1). Without groups every positive counts once."""
    pos = np.asarray(labels).ravel() == 1
    if groups is None:
        return float(pos.sum())
    _, counts = np.unique(np.asarray(groups).ravel()[pos], return_counts=True)
    return (
        float(counts.sum() ** 2 / np.square(counts.astype(np.float64)).sum())
        if counts.size
        else 0.0
    )


def lcb_name(target: float) -> str:
    """The name of the promised operating point: "sens90_lcb" for a target of 0.90."""
    return f"sens{int(round(target * 100))}_lcb"


@dataclass(frozen=True)
class Promise:
    """Can this validation split promise ``target`` at ``confidence``? ``n_pos`` positives,
    worth ``n_eff`` independent ones; ``needed`` with no miss; ``best_bound`` when every
    positive is caught."""

    n_pos: int
    n_eff: float
    needed: int
    best_bound: float
    target: float
    confidence: float

    @property
    def feasible(self) -> bool:
        return self.best_bound >= self.target - 1e-12


def promise(
    labels: np.ndarray,
    target: float,
    confidence: float,
    groups: np.ndarray | None = None,
) -> Promise:
    """What a validation split can promise (see :func:`threshold_for_sensitivity_lcb`)."""
    labels = np.asarray(labels).ravel()
    n_eff = effective_n(groups, labels)
    return Promise(
        n_pos=int((labels == 1).sum()),
        n_eff=n_eff,
        needed=positives_needed(target, confidence),
        best_bound=sensitivity_lcb(n_eff, n_eff, confidence) if n_eff > 0 else 0.0,
        target=float(target),
        confidence=float(confidence),
    )


def threshold_for_sensitivity_lcb(
    labels: np.ndarray,
    scores: np.ndarray,
    target: float = 0.90,
    confidence: float = 0.95,
    groups: np.ndarray | None = None,
) -> float:
    """Highest threshold t (HER2+ when score >= t) whose one-sided ``confidence`` lower bound on
    sensitivity reaches ``target``: a sensitivity promised for new cases, not only met on val.

    Clopper-Pearson on the caught positives. With ``groups`` (the patient of each tile) the
    tiles of a patient are not independent, so the bound uses the effective sample size
    :func:`effective_n` (the sensitivity times ``n_eff`` caught out of ``n_eff``): with one tile
    per patient it is the plain bound. When even catching every positive cannot reach the
    target (too few positives: :func:`positives_needed`), it warns with the numbers and falls
    back to the threshold that catches every validation positive (the lowest positive score,
    the largest bound the split can give). One class: 0.5 with a warning, as elsewhere.
    """
    labels, scores = check_scores(labels, scores)
    if not 0.0 < target < 1.0 or not 0.0 < confidence < 1.0:
        raise ValueError(f"target and confidence must be in (0, 1); got {target}, {confidence}")
    if not has_two_classes(labels, "a sensitivity-bound threshold"):
        return 0.5
    pos = np.sort(scores[labels == 1])[::-1]  # highest first
    candidates = np.unique(pos)[::-1]
    caught = np.searchsorted(-pos, -candidates, side="right")  # positives with score >= t
    check = promise(labels, target, confidence, groups)
    bounds = sensitivity_lcb(caught / pos.size * check.n_eff, check.n_eff, confidence)
    ok = np.flatnonzero(bounds >= target - 1e-12)
    if ok.size == 0:
        warnings.warn(
            f"{lcb_name(target)} cannot be promised: {check.n_pos} HER2+ (effective "
            f"{check.n_eff:.1f}) give a {confidence:.0%} lower bound of at most "
            f"{check.best_bound:.3f} < {target}; it needs >= {check.needed} positives with no "
            f"miss. Falling back to the lowest positive score {float(pos[-1]):.4g} (every "
            "validation positive caught)",
            stacklevel=2,
        )
        return float(pos[-1])
    return float(candidates[ok[0]])


def operating_points(
    val_labels: np.ndarray,
    val_scores: np.ndarray,
    target_sensitivity: float = 0.90,
    confidence: float = 0.95,
    groups: np.ndarray | None = None,
) -> dict[str, float]:
    """The thresholds to freeze, all chosen on validation: Youden, sensitivity >= target, its
    promised version (lower ``confidence`` bound >= target; ``groups``: the patient of each
    tile at the tile level) and 0.5.

    Keys: "youden", f"sens{round(100 * target)}" (e.g. "sens90"), "sens90_lcb" and "p50".
    """
    name = f"sens{int(round(target_sensitivity * 100))}"
    return {
        "youden": youden_threshold(val_labels, val_scores),
        name: threshold_for_sensitivity(val_labels, val_scores, target_sensitivity),
        lcb_name(target_sensitivity): threshold_for_sensitivity_lcb(
            val_labels, val_scores, target_sensitivity, confidence, groups
        ),
        "p50": 0.5,
    }


_NAMED = re.compile(r"(?P<kind>sens|p)(?P<percent>\d{1,3})(?P<lcb>_lcb)?")


def choose_threshold(
    name: str,
    labels: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray | None = None,
    confidence: float = 0.95,
) -> float:
    """The threshold the operating point called ``name`` picks on this split.

    The inverse of :func:`operating_points`' naming: "youden" -> :func:`youden_threshold`,
    "sensNN" -> :func:`threshold_for_sensitivity` with target NN/100, "sensNN_lcb" ->
    :func:`threshold_for_sensitivity_lcb` (``groups``, ``confidence`` as chosen), "pNN" ->
    NN/100. Used to check that thresholds applied to a test split are those its validation
    split chooses. A target that is not a whole percent (0.925 is named "sens92") re-derives at
    the named one.
    """
    if name == "youden":
        return youden_threshold(labels, scores)
    match = _NAMED.fullmatch(name)
    bad_lcb = (
        match is not None
        and match["lcb"]
        and (match["kind"] != "sens" or match["percent"] == "100")
    )
    if match is None or bad_lcb or not 0 < int(match["percent"]) <= 100:
        raise ValueError(
            f"unknown operating point {name!r}: expected youden, sensNN, sensNN_lcb or pNN"
        )
    percent = int(match["percent"]) / 100
    if match["kind"] == "p":
        return percent
    if match["lcb"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the choice on val warned already
            return threshold_for_sensitivity_lcb(labels, scores, percent, confidence, groups)
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
    :func:`her2exp.metrics.split_report.evaluate_split` calls it once per threshold)."""
    pred = called(scores, threshold)
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
