"""Metrics of the HER2+ probabilities themselves, not only of their ranking: calibration (Brier
score, expected calibration error, reliability curve), temperature scaling (fitted on validation
by NLL, applied downstream) and decision-curve analysis.

Unlike AUC these change under a monotone transform of the scores, so both need probabilities in
[0, 1] (softmax or sigmoid outputs, not logits) and a non-empty split; anything else raises
ValueError naming the problem. (The module is not called ``calibration`` so that it is not
shadowed by the :func:`calibration` function the package re-exports.)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from her2exp.metrics._validation import check_probabilities, check_scores

__all__ = [
    "Calibration",
    "DecisionCurve",
    "apply_calibration",
    "apply_temperature",
    "calibration",
    "decision_curve",
    "fit_temperature",
    "temperature_nll",
]

log = logging.getLogger("her2exp")


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
    labels, scores = check_scores(labels, scores)
    check_probabilities(scores, "calibration")
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


#: The temperatures fit_temperature searches (log-uniformly between them): far beyond any a
#: trained network needs, and bounded so that a degenerate validation split cannot run away.
TEMPERATURE_BOUNDS = (0.05, 20.0)
#: |logit| of the fit's scores is capped here: a float32 softmax says nothing beyond ~16.6
#: (1 - p rounds to 0), and an infinite logit on the wrong side would make every T's NLL infinite.
_LOGIT_CAP = 16.6


def temperature_nll(labels: np.ndarray, scores: np.ndarray, temperature: float) -> float:
    """Mean binary NLL of sigmoid(logit(p) / T): log(1 + exp(-(2y - 1) z / T)), stable."""
    labels, scores = check_scores(labels, scores)
    check_probabilities(scores, "temperature scaling")
    z = np.clip(logit(scores), -_LOGIT_CAP, _LOGIT_CAP)
    sign = 2.0 * labels - 1.0
    return float(np.mean(np.logaddexp(0.0, -sign * z / temperature)))


def fit_temperature(labels: np.ndarray, scores: np.ndarray) -> float:
    """The temperature T minimising the validation NLL of p_T = sigmoid(logit(p) / T).

    For a 2-class softmax, logit(P(HER2+)) is the difference of the two logits, so this is
    exactly temperature scaling of the logits (Guo et al. 2017, ICML, "On calibration of modern
    neural networks"). One parameter, monotone: AUC and the ranking are unchanged. Searched on
    log T (bounded Brent, scipy's minimize_scalar); T = 1 is kept when nothing beats it. A
    split with one class cannot inform a calibration: T = 1 with a warning.
    """
    labels, scores = check_scores(labels, scores)
    check_probabilities(scores, "temperature scaling")
    if labels.size == 0:
        raise ValueError("temperature scaling of an empty split is undefined")
    if np.unique(labels).size < 2:
        log.warning("validation holds one class only: no temperature fitted (T = 1)")
        return 1.0
    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    found = minimize_scalar(
        lambda s: temperature_nll(labels, scores, math.exp(s)),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-6},
    )
    t = float(math.exp(found.x))
    return t if temperature_nll(labels, scores, t) < temperature_nll(labels, scores, 1.0) else 1.0


def apply_temperature(scores: np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T), strictly monotone (0 and 1 stay 0 and 1: nothing is clipped, so
    no two scores become tied and the patch AUC is exactly unchanged)."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number; got {temperature}")
    scores = np.asarray(scores, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return expit(logit(scores) / temperature)


def apply_calibration(scores: np.ndarray, frozen: dict[str, Any] | None) -> np.ndarray:
    """A run's frozen calibration (best.pt `state["calibration"]`) applied to its scores;
    None or {"method": "none"} (and a checkpoint from before the key) leaves them as they are."""
    method = (frozen or {}).get("method", "none")
    if method == "none":
        return np.asarray(scores, dtype=np.float64)
    if method == "temperature":
        return apply_temperature(scores, float(frozen["temperature"]))
    raise ValueError(f"calibration method {method!r}: none or temperature")


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
    clinician accepts at that threshold. Default p_t: 0.01, 0.02, ..., 0.99.

    Reference: Vickers & Elkin (2006), Medical Decision Making 26(6):565-574.
    """
    labels, scores = check_scores(labels, scores)
    check_probabilities(scores, "decision curve analysis")
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
