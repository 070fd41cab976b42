"""Ranking metrics of HER2+ scores: ROC AUC with DeLong and bootstrap confidence intervals, and
the ROC and precision-recall curves the report plots.

Label 1 is HER2+. A split with one class has no ROC: :func:`auc` and the intervals return NaN
and the curves None, each with a warning; scores that cannot be ranked raise ValueError.
"""

from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from her2exp.metrics._validation import check_alpha, check_scores, has_two_classes
from her2exp.metrics.proportions import wilson_interval

__all__ = [
    "AucCI",
    "PrCurve",
    "RocCurve",
    "auc",
    "auc_ci_bootstrap",
    "auc_ci_delong",
    "pr_curve",
    "roc_with_band",
]


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC = P(score of a HER2+ case > score of a HER2- case), ties counting 1/2.

    NaN with a warning when only one class is present (AUC is undefined then).
    """
    labels, scores = check_scores(labels, scores)
    if np.unique(labels).size < 2:
        warnings.warn("AUC is undefined with a single class present; reporting NaN", stacklevel=2)
        return math.nan
    return float(roc_auc_score(labels, scores))


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


def auc_ci_delong(labels: np.ndarray, scores: np.ndarray, alpha: float = 0.05) -> AucCI:
    """AUC with DeLong's asymptotic confidence interval, by Sun & Xu's fast midrank algorithm.

    With m HER2+ scores X and n HER2- scores Y, psi(x, y) = 1[x > y] + 1/2 1[x = y] and
    AUC = sum psi / (m n). The structural components are V10_i = (Tz_i - Tx_i) / n (the share
    of HER2- cases that positive i out-ranks) and V01_j = 1 - (Tz_j - Ty_j) / m, where Tz, Tx and
    Ty are midranks in the pooled sample, among positives and among negatives. Then
    Var(AUC) = S10 / m + S01 / n, with S10, S01 the sample variances (ddof=1) of V10 and V01,
    and the Wald interval AUC +- z_{1-alpha/2} SE is clipped to [0, 1]. O(N log N).

    The interval collapses to a point when the classes are perfectly separated or all scores
    are equal (every component equal); that is a known property of DeLong's estimator, use
    :func:`auc_ci_bootstrap` for a second opinion on small or separable splits. With fewer than
    two cases in a class the variance is undefined: the AUC is returned with a NaN interval.

    References: DeLong, DeLong & Clarke-Pearson (1988), Biometrics 44:837-845; Sun & Xu (2014),
    IEEE Signal Processing Letters 21(11):1389-1393.
    """
    labels, scores = check_scores(labels, scores)
    check_alpha(alpha)
    if not has_two_classes(labels, "AUC"):
        return _nan_ci("delong", alpha)
    x, y = scores[labels == 1], scores[labels == 0]
    m, n = x.size, y.size
    # Midranks: 1-based ranks, ties sharing the mean of their ranks.
    tz = rankdata(np.concatenate([x, y]), method="average")
    tx, ty = rankdata(x, method="average"), rankdata(y, method="average")
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
    quantile pair of the n_boot resampled AUCs; ``se`` is their standard deviation (ddof=1).
    The result depends on ``seed`` only (not on the number of threads): see
    :func:`_bootstrap_aucs` for the O(m + n)-per-resample algorithm.

    Reference: Efron & Tibshirani (1993), An Introduction to the Bootstrap, ch. 13; Robin et al.
    (2011), pROC, BMC Bioinformatics 12:77.
    """
    labels, scores = check_scores(labels, scores)
    check_alpha(alpha)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    if not has_two_classes(labels, "AUC"):
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
    """n_boot stratified-bootstrap AUCs of HER2+ scores x against HER2- scores y.

    Each resample costs O(m + n) with no sort: AUC is a sum over pairs, so only the multiplicity
    of each case matters. With the smaller class (say HER2+, sorted) drawn as counts w, every
    HER2- score y_j credits S(a_j) = sum of w over the HER2+ cases above it, where the index a_j
    comes from one ``searchsorted`` up front; a resample's AUC is then the sum of S(a_j) over the
    drawn HER2- indices / (m n) - one bincount and one cumsum over the smaller class, one gather
    over the larger, all in cache. Ties count 1/2 (two gathers). Resamples are split into
    ``_BOOT_STREAMS`` random streams (``SeedSequence.spawn``) run on up to two threads (numpy
    releases the GIL in the generator and the gathers).
    """
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
    """ROC curve (scikit-learn's ``roc_curve``) and its pointwise Wilson band on ``n_grid``
    FPR values in [0, 1]; None with a warning when the split has one class."""
    labels, scores = check_scores(labels, scores)
    if not has_two_classes(labels, "the ROC curve"):
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
    """Precision-recall curve and AP = sum_k (R_k - R_{k-1}) P_k (scikit-learn's step-wise
    average precision, no interpolation); None with a warning when the split has one class."""
    labels, scores = check_scores(labels, scores)
    if not has_two_classes(labels, "the precision-recall curve"):
        return None
    precision, recall, thr = precision_recall_curve(labels, scores, pos_label=1)
    ap = float(average_precision_score(labels, scores, pos_label=1))
    return PrCurve(precision, recall, thr, ap, float(labels.mean()))
