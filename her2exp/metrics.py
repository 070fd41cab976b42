"""Binary HER2 metrics a reviewer can trust: AUC with confidence intervals, operating points
chosen on validation, rates with Wilson intervals at frozen thresholds, calibration, decision
curves and patient-level aggregation.

Pure functions over numpy arrays, dataclasses out. Label 1 is HER2+ (the positive class).
Every rate is defined as 0/0 -> NaN rather than raising, so a split with one class or a model
that never predicts a class still yields a complete (if partly NaN) table. Inputs that cannot
be scored at all (NaN scores, mismatched lengths, labels other than 0/1, an empty split) raise a
ValueError naming the problem. :func:`evaluate_split` is the single entry point the trainer,
``her2exp-eval`` and the benchmark call.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)


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


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")


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

    Reference: Youden (1950), Cancer 3(1):32-35.
    """
    labels, scores = _check(labels, scores)
    if np.unique(labels).size < 2:
        warnings.warn("Youden threshold undefined with one class; using 0.5", stacklevel=2)
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, scores)
    j = tpr - fpr
    best = int(np.argmax(j[1:])) + 1
    return float(min(thresholds[best], 1.0))


def wilson_interval(
    k: float | np.ndarray, n: float | np.ndarray, alpha: float = 0.05
) -> tuple[Any, Any]:
    """Wilson score interval for a binomial proportion k/n; NaN where n == 0.

    With z = z_{1-alpha/2} and p = k/n:
    (k + z^2/2) / (n + z^2) +- z sqrt(n) / (n + z^2) * sqrt(p (1 - p) + z^2 / (4 n)).
    Unlike the Wald interval it stays inside [0, 1] and keeps its coverage at p near 0 or 1,
    where sensitivities of good models live. Same as
    ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``, vectorised.

    Reference: Wilson (1927), JASA 22:209-212; Newcombe (1998), Statistics in Medicine
    17:857-872 (method 3).
    """
    _check_alpha(alpha)
    k_arr = np.asarray(k, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    z = float(norm.ppf(1 - alpha / 2))
    z2 = z * z
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k_arr / n_arr
        center = (k_arr + z2 / 2) / (n_arr + z2)
        half = z * np.sqrt(n_arr) / (n_arr + z2) * np.sqrt(p * (1 - p) + z2 / (4 * n_arr))
        low = np.where(n_arr > 0, np.clip(center - half, 0.0, 1.0), np.nan)
        high = np.where(n_arr > 0, np.clip(center + half, 0.0, 1.0), np.nan)
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


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
    gets a Wilson interval over its own denominator.
    """
    labels, scores = _check(labels, scores)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        area = auc(labels, scores) if labels.size else math.nan
    return _report(labels, scores, threshold, area, alpha)


def _report(
    labels: np.ndarray, scores: np.ndarray, threshold: float, area: float, alpha: float
) -> BinaryReport:
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
        **{name: _ratio(k, n) for name, (k, n) in counts.items()},
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        **cis,
    )


# --------------------------------------------------------------------------------------------
# Confidence intervals for AUC
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AucCI:
    """An AUC with its two-sided (1 - alpha) confidence interval and standard error."""

    auc: float
    low: float
    high: float
    se: float
    method: str
    alpha: float = 0.05

    def as_dict(self, prefix: str = "") -> dict[str, float | str]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def _nan_ci(method: str, alpha: float, area: float = math.nan) -> AucCI:
    return AucCI(area, math.nan, math.nan, math.nan, method, alpha)


def _two_classes(labels: np.ndarray, what: str) -> bool:
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        present = "HER2+" if n_pos else "HER2-"
        warnings.warn(
            f"{what} is undefined with a single class present (only {present}, n={labels.size}); "
            "reporting NaN",
            stacklevel=3,
        )
        return False
    return True


def _midrank(x: np.ndarray) -> np.ndarray:
    # Average ranks (1-based) with ties sharing the mean of their ranks: O(n log n).
    return rankdata(x, method="average")


def auc_ci_delong(labels: np.ndarray, scores: np.ndarray, alpha: float = 0.05) -> AucCI:
    """AUC with DeLong's asymptotic confidence interval, by Sun & Xu's fast midrank algorithm.

    With m HER2+ scores X and n HER2- scores Y, psi(x, y) = 1[x > y] + 1/2 1[x = y] and
    AUC = sum psi / (m n). The structural components are V10_i = (Tz_i - Tx_i) / n (the share
    of HER2- cases that positive i out-ranks) and V01_j = 1 - (Tz_j - Ty_j) / m, where Tz, Tx and
    Ty are midranks in the pooled sample, among positives and among negatives. Then
    Var(AUC) = S10 / m + S01 / n, with S10, S01 the sample variances (ddof=1) of V10 and V01,
    and the Wald interval AUC +- z_{1-alpha/2} SE is clipped to [0, 1].

    The interval collapses to a point when the classes are perfectly separated or all scores
    are equal (every component equal); that is a known property of DeLong's estimator, use
    :func:`auc_ci_bootstrap` for a second opinion on small or separable splits.

    References: DeLong, DeLong & Clarke-Pearson (1988), Biometrics 44:837-845; Sun & Xu (2014),
    IEEE Signal Processing Letters 21(11):1389-1393.
    """
    labels, scores = _check(labels, scores)
    _check_alpha(alpha)
    if not _two_classes(labels, "AUC"):
        return _nan_ci("delong", alpha)
    x, y = scores[labels == 1], scores[labels == 0]
    m, n = x.size, y.size
    tz = _midrank(np.concatenate([x, y]))
    tx, ty = _midrank(x), _midrank(y)
    area = float((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
    if m < 2 or n < 2:
        warnings.warn(
            f"DeLong variance needs >= 2 cases per class (HER2+ {m}, HER2- {n}); CI is NaN",
            stacklevel=2,
        )
        return _nan_ci("delong", alpha, area)
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    se = math.sqrt(max(float(v10.var(ddof=1) / m + v01.var(ddof=1) / n), 0.0))
    z = float(norm.ppf(1 - alpha / 2))
    return AucCI(area, max(area - z * se, 0.0), min(area + z * se, 1.0), se, "delong", alpha)


def auc_ci_bootstrap(
    labels: np.ndarray,
    scores: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> AucCI:
    """AUC with a stratified percentile-bootstrap interval (classes resampled separately).

    Resampling positives and negatives separately keeps the prevalence of every resample equal
    to the split's, as in pROC's stratified bootstrap. The interval is the (alpha/2, 1 - alpha/2)
    quantile pair of the resampled AUCs; ``se`` is their standard deviation.

    Each resample costs O(m + n) with no sort: AUC is a sum over pairs, so only the multiplicity
    of each case matters. With the smaller class (say HER2+, sorted) drawn as counts w, every
    HER2- score y_j credits S(a_j) = sum of w over the HER2+ cases above it, where the index a_j
    comes from one ``searchsorted`` up front; a resample's AUC is then the sum of S(a_j) over the
    drawn HER2- indices / (m n) - one bincount and one cumsum over the smaller class, one gather
    over the larger, all in cache. Ties count 1/2 (two gathers). Resamples are split into a fixed
    number of random streams (``SeedSequence.spawn``) run on up to two threads (numpy releases
    the GIL in the generator and the gathers), so the result depends on ``seed`` only.

    Reference: Efron & Tibshirani (1993), An Introduction to the Bootstrap, ch. 13; Robin et al.
    (2011), pROC, BMC Bioinformatics 12:77.
    """
    labels, scores = _check(labels, scores)
    _check_alpha(alpha)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    if not _two_classes(labels, "AUC"):
        return _nan_ci("bootstrap", alpha)
    aucs = _bootstrap_aucs(scores[labels == 1], scores[labels == 0], n_boot, seed)
    area = float(roc_auc_score(labels, scores))
    low, high = np.quantile(aucs, [alpha / 2, 1 - alpha / 2])
    return AucCI(area, float(low), float(high), float(aucs.std(ddof=1)), "bootstrap", alpha)


#: Independent random streams of a bootstrap: a constant, so a seed gives the same resamples
#: whatever the number of threads that share them.
_BOOT_STREAMS = 8


def _bootstrap_aucs(
    x: np.ndarray, y: np.ndarray, n_boot: int, seed: int, workers: int | None = None
) -> np.ndarray:
    """n_boot stratified-bootstrap AUCs of HER2+ scores x against HER2- scores y."""
    if x.size > y.size:  # count the smaller class: P(x > y) = P(-y > -x)
        x, y = -y, -x
    m, n = x.size, y.size
    x = np.sort(x)
    above = np.searchsorted(x, y, side="right")  # first HER2+ strictly above y_j
    at_or_above = np.searchsorted(x, y, side="left")
    ties = bool((above != at_or_above).any())
    blocks = [b for b in np.array_split(np.arange(n_boot), _BOOT_STREAMS) if b.size]
    seeds = np.random.SeedSequence(seed).spawn(len(blocks))
    out = np.empty(n_boot)

    def run(i: int) -> None:
        rng = np.random.Generator(np.random.SFC64(seeds[i]))
        credit = np.zeros(m + 1, dtype=np.int64)  # credit[k] = drawn HER2+ among x[k:]
        for b in blocks[i]:
            w = np.bincount(rng.integers(0, m, m), minlength=m)
            np.cumsum(w[::-1], out=credit[-2::-1])
            drawn = rng.integers(0, n, n)
            total = credit.take(above.take(drawn)).sum(dtype=np.float64)
            if ties:
                total = 0.5 * (total + credit.take(at_or_above.take(drawn)).sum(dtype=np.float64))
            out[b] = total / (m * n)

    workers = min(len(blocks), workers or min(os.cpu_count() or 1, 2))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, range(len(blocks))))
    else:
        for i in range(len(blocks)):
            run(i)
    return out


def bench_ci(n: int = 100_000, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Wall time of DeLong and of an n_boot stratified bootstrap on n synthetic scores.

    Scores are binormal (HER2+ shifted by 1 SD, prevalence 25%), AUC about 0.76.
    """
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.25).astype(np.int64)
    scores = 1.0 / (1.0 + np.exp(-rng.normal(labels.astype(np.float64) - 0.5, 1.0)))
    t0 = time.perf_counter()
    d = auc_ci_delong(labels, scores)
    t1 = time.perf_counter()
    b = auc_ci_bootstrap(labels, scores, n_boot=n_boot, seed=seed)
    t2 = time.perf_counter()
    return {
        "n": float(n),
        "n_boot": float(n_boot),
        "delong_seconds": t1 - t0,
        "bootstrap_seconds": t2 - t1,
        "total_seconds": t2 - t0,
        "auc": d.auc,
        "delong_low": d.low,
        "delong_high": d.high,
        "bootstrap_low": b.low,
        "bootstrap_high": b.high,
    }


# --------------------------------------------------------------------------------------------
# Operating points, chosen on validation only
# --------------------------------------------------------------------------------------------


def threshold_for_sensitivity(
    labels: np.ndarray, scores: np.ndarray, target: float = 0.90
) -> float:
    """Highest-specificity threshold t (HER2+ when score >= t) whose sensitivity >= target.

    Candidates are the distinct scores (every distinct prediction on this split). Among those
    reaching the target, the one with the highest specificity wins; of equal specificity, the
    one with the higher sensitivity (the lowest such t), so no free sensitivity is given away.
    Falls back to 0.5 with a warning when the split has one class.
    """
    labels, scores = _check(labels, scores)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1]; got {target}")
    if not _two_classes(labels, "a sensitivity-targeted threshold"):
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


# --------------------------------------------------------------------------------------------
# Calibration and decision curves
# --------------------------------------------------------------------------------------------


def _check_probabilities(scores: np.ndarray, what: str) -> None:
    if scores.size and (scores.min() < 0.0 or scores.max() > 1.0):
        raise ValueError(
            f"{what} needs probabilities in [0, 1]; scores span "
            f"[{scores.min():.4g}, {scores.max():.4g}] (pass softmax/sigmoid outputs, not logits)"
        )


@dataclass(frozen=True)
class Calibration:
    """How far predicted HER2+ probabilities are from observed HER2+ frequencies.

    ``prob_true``/``prob_pred``/``count`` describe the non-empty bins only (as scikit-learn's
    ``calibration_curve`` returns them); ``bin_edges`` are all ``n_bins + 1`` edges.
    """

    brier: float
    ece: float
    n_bins: int
    bin_edges: np.ndarray
    prob_true: np.ndarray
    prob_pred: np.ndarray
    count: np.ndarray


def calibration(labels: np.ndarray, scores: np.ndarray, n_bins: int = 10) -> Calibration:
    """Brier score, expected calibration error and the reliability curve (equal-width bins).

    Brier = mean((p_i - y_i)^2). With bins B_b = (b/B, (b+1)/B] (the first one closed at 0,
    the same binning as ``sklearn.calibration.calibration_curve(strategy="uniform")``),
    ECE = sum_b |B_b|/N * |mean(y in B_b) - mean(p in B_b)|.

    Reference: Naeini, Cooper & Hauskrecht (2015), AAAI, "Obtaining well calibrated
    probabilities using Bayesian binning"; Guo et al. (2017), ICML, "On calibration of modern
    neural networks".
    """
    labels, scores = _check(labels, scores)
    _check_probabilities(scores, "calibration")
    if labels.size == 0:
        raise ValueError("calibration of an empty split is undefined")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    prob_true, prob_pred = calibration_curve(
        labels, scores, n_bins=n_bins, strategy="uniform", pos_label=1
    )
    count = np.bincount(np.searchsorted(edges[1:-1], scores), minlength=n_bins)
    count = count[count > 0]
    ece = float(np.sum(count / labels.size * np.abs(prob_true - prob_pred)))
    brier = float(brier_score_loss(labels, scores, pos_label=1))
    return Calibration(brier, ece, n_bins, edges, prob_true, prob_pred, count)


@dataclass(frozen=True)
class DecisionCurve:
    """Net benefit of acting on the model vs treating every or no patient, per threshold p_t."""

    thresholds: np.ndarray
    net_benefit: np.ndarray
    treat_all: np.ndarray
    treat_none: np.ndarray
    prevalence: float


def decision_curve(
    labels: np.ndarray,
    scores: np.ndarray,
    thresholds: np.ndarray | None = None,
) -> DecisionCurve:
    """Decision curve analysis: is acting on the model better than the default strategies?

    At threshold probability p_t (HER2+ called when score >= p_t), with N cases,
    NB_model = TP/N - FP/N * p_t / (1 - p_t); treating everyone gives
    NB_all = prevalence - (1 - prevalence) * p_t / (1 - p_t); treating no one gives 0.
    The odds p_t / (1 - p_t) is the exchange rate of false positives for true positives a
    clinician accepts at that threshold.

    Reference: Vickers & Elkin (2006), Medical Decision Making 26(6):565-574.
    """
    labels, scores = _check(labels, scores)
    _check_probabilities(scores, "decision curve analysis")
    if labels.size == 0:
        raise ValueError("decision curve of an empty split is undefined")
    pt = np.arange(0.01, 1.0, 0.01) if thresholds is None else np.asarray(thresholds, float)
    if pt.ndim != 1 or pt.size == 0 or (pt <= 0).any() or (pt >= 1).any():
        raise ValueError("decision-curve thresholds must be a 1-d array inside (0, 1)")
    n = labels.size
    pos = np.sort(scores[labels == 1])
    neg = np.sort(scores[labels == 0])
    tp = pos.size - np.searchsorted(pos, pt, side="left")
    fp = neg.size - np.searchsorted(neg, pt, side="left")
    odds = pt / (1.0 - pt)
    prevalence = pos.size / n
    return DecisionCurve(
        thresholds=pt,
        net_benefit=tp / n - fp / n * odds,
        treat_all=prevalence - (1.0 - prevalence) * odds,
        treat_none=np.zeros_like(pt),
        prevalence=prevalence,
    )


# --------------------------------------------------------------------------------------------
# Curves and error lists the report plots (computed here so reports.py does no metric math)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RocCurve:
    """Empirical ROC plus a pointwise band: for each FPR on ``band_fpr``, the best sensitivity
    reachable at that FPR and its Wilson (1 - alpha) interval over the HER2+ cases.

    The band treats the FPR as known (vertical, pointwise, not simultaneous); it shows the
    sampling error of sensitivity that the HER2+ count alone implies.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    band_fpr: np.ndarray
    band_tpr: np.ndarray
    band_low: np.ndarray
    band_high: np.ndarray


def roc_with_band(
    labels: np.ndarray, scores: np.ndarray, alpha: float = 0.05, n_grid: int = 101
) -> RocCurve | None:
    """ROC curve and its pointwise Wilson band; None when the split has one class."""
    labels, scores = _check(labels, scores)
    if not _two_classes(labels, "the ROC curve"):
        return None
    fpr, tpr, thr = roc_curve(labels, scores)
    grid = np.linspace(0.0, 1.0, n_grid)
    # Best sensitivity at FPR <= g: tpr is non-decreasing along the curve.
    idx = np.searchsorted(fpr, grid, side="right") - 1
    band_tpr = tpr[idx]
    m = int(labels.sum())
    low, high = wilson_interval(np.round(band_tpr * m), m, alpha)
    return RocCurve(fpr, tpr, thr, grid, band_tpr, np.asarray(low), np.asarray(high))


@dataclass(frozen=True)
class PrCurve:
    """Precision-recall curve of the HER2+ class and its average precision."""

    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray
    average_precision: float
    prevalence: float


def pr_curve(labels: np.ndarray, scores: np.ndarray) -> PrCurve | None:
    """Precision-recall curve; None when the split has one class (recall or AP undefined)."""
    labels, scores = _check(labels, scores)
    if not _two_classes(labels, "the precision-recall curve"):
        return None
    precision, recall, thr = precision_recall_curve(labels, scores, pos_label=1)
    ap = float(average_precision_score(labels, scores, pos_label=1))
    return PrCurve(precision, recall, thr, ap, float(labels.mean()))


def misclassified(
    labels: np.ndarray, scores: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of false negatives (lowest score first) and false positives (highest first).

    The worst misses lead each list: a HER2+ patch the model scored near 0 is the first thing a
    pathologist should look at.
    """
    labels, scores = _check(labels, scores)
    fn = np.flatnonzero((labels == 1) & (scores < threshold))
    fp = np.flatnonzero((labels == 0) & (scores >= threshold))
    fn = fn[np.argsort(scores[fn], kind="stable")]
    fp = fp[np.argsort(-scores[fp], kind="stable")]
    return fn, fp


# --------------------------------------------------------------------------------------------
# Patient level
# --------------------------------------------------------------------------------------------


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
    """Patch scores -> one score per patient (mean or max over the patient's patches).

    HER2 status is a patient (tumour) property, so a patient whose patches carry both labels
    is a data error, not something to average away: it raises, naming the patients.
    Patients come out in sorted id order.
    """
    labels, scores = _check(labels, scores)
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


# --------------------------------------------------------------------------------------------
# One evaluation of one split at frozen thresholds
# --------------------------------------------------------------------------------------------

_RATE_KEYS = ("sensitivity", "specificity", "precision", "npv", "accuracy")


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
    """Everything reported for one split (val, test, an external cohort) at frozen thresholds."""

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
        return {
            "n": self.n,
            "n_pos": self.n_pos,
            "auc": _dataclass_dict(self.auc),
            "auc_bootstrap": _dataclass_dict(self.auc_bootstrap),
            "thresholds": to_jsonable(self.thresholds),
            "reports": {k: _dataclass_dict(v) for k, v in self.reports.items()},
            "calibration": _dataclass_dict(self.calibration),
            "decision_curve": _dataclass_dict(self.decision_curve),
            "average_precision": None
            if self.pr is None
            else to_jsonable(self.pr.average_precision),
            "patient": None
            if self.patient is None
            else {
                "how": self.patient.how,
                "n": self.patient.n,
                "n_pos": self.patient.n_pos,
                "auc": _dataclass_dict(self.patient.auc),
                "reports": {k: _dataclass_dict(v) for k, v in self.patient.reports.items()},
            },
        }


def _flat_reports(reports: dict[str, BinaryReport], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, rep in reports.items():
        for key, value in rep.as_dict().items():
            if key not in ("n", "n_pos", "auc"):
                out[f"{prefix}{name}_{key}"] = float(value)
    return out


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

    ``thresholds`` must have been chosen on validation (:func:`operating_points`); this
    function never tunes anything, so the test and external tables use exactly those values.
    ``scores`` are HER2+ probabilities. With ``patient_ids``, patch scores are also
    aggregated per patient (``patient_how``) and scored at the same thresholds.
    """
    labels, scores = _check(labels, scores)
    if labels.size == 0:
        raise ValueError("cannot evaluate an empty split")
    if not thresholds:
        raise ValueError("thresholds is empty: pass at least one frozen operating point")
    _check_probabilities(scores, "evaluate_split")
    with warnings.catch_warnings():
        # One class present: warn once here, not once per metric below.
        warnings.simplefilter("ignore")
        delong = auc_ci_delong(labels, scores, alpha)
        boot = auc_ci_bootstrap(labels, scores, n_boot, seed, alpha) if n_boot > 0 else None
        roc = roc_with_band(labels, scores, alpha)
        pr = pr_curve(labels, scores)
    if math.isnan(delong.auc):
        _two_classes(labels, "AUC")
    reports = {
        name: _report(labels, scores, float(t), delong.auc, alpha) for name, t in thresholds.items()
    }
    patient = None
    if patient_ids is not None:
        agg = aggregate_by_patient(patient_ids, labels, scores, patient_how)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p_auc = auc_ci_delong(agg.labels, agg.scores, alpha)
        patient = PatientEvaluation(
            how=patient_how,
            n=int(agg.labels.size),
            n_pos=int(agg.labels.sum()),
            auc=p_auc,
            reports={
                name: _report(agg.labels, agg.scores, float(t), p_auc.auc, alpha)
                for name, t in thresholds.items()
            },
            scores=agg,
        )
    return SplitEvaluation(
        n=int(labels.size),
        n_pos=int(labels.sum()),
        auc=delong,
        auc_bootstrap=boot,
        thresholds={k: float(v) for k, v in thresholds.items()},
        reports=reports,
        calibration=calibration(labels, scores, calibration_bins),
        decision_curve=decision_curve(labels, scores),
        roc=roc,
        pr=pr,
        patient=patient,
    )
