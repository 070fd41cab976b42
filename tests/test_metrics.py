"""Metrics against hand-built confusion matrices and degenerate splits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from her2exp import metrics


def test_rates_from_hand_built_confusion_matrix() -> None:
    # 4 HER2+ (scores .9 .8 .7 .2) and 6 HER2- (.6 .3 .2 .1 .1 .0) at threshold .5:
    # TP=3 FN=1 FP=1 TN=5.
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.2, 0.1, 0.1, 0.0])
    r = metrics.at_threshold(labels, scores, 0.5)
    assert (r.tp, r.fn, r.fp, r.tn) == (3, 1, 1, 5)
    assert r.sensitivity == pytest.approx(3 / 4)
    assert r.specificity == pytest.approx(5 / 6)
    assert r.precision == pytest.approx(3 / 4)
    assert r.npv == pytest.approx(5 / 6)
    assert r.f1 == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert r.accuracy == pytest.approx(8 / 10)
    # AUC by pair counting: of 24 (pos, neg) pairs, .2 vs (.3 .6) lose, .2 vs .2 ties.
    assert r.auc == pytest.approx((24 - 2 - 0.5) / 24)


def test_threshold_is_inclusive() -> None:
    r = metrics.at_threshold(np.array([1, 0]), np.array([0.5, 0.49]), 0.5)
    assert (r.tp, r.fp) == (1, 0)


def test_youden_threshold_separates_perfectly_separable_scores() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.35, 0.4, 0.9])
    t = metrics.youden_threshold(labels, scores)
    assert t == pytest.approx(0.4)
    r = metrics.at_threshold(labels, scores, t)
    assert (r.sensitivity, r.specificity) == (1.0, 1.0)


def test_youden_threshold_maximises_j_by_brute_force() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1)
    t = metrics.youden_threshold(labels, scores)
    best = max(
        (metrics.at_threshold(labels, scores, c) for c in np.unique(scores)),
        key=lambda r: r.sensitivity + r.specificity,
    )
    r = metrics.at_threshold(labels, scores, t)
    assert r.sensitivity + r.specificity == pytest.approx(best.sensitivity + best.specificity)


def test_one_class_split_gives_nan_auc_not_a_crash() -> None:
    labels = np.zeros(5, dtype=int)
    scores = np.linspace(0, 1, 5)
    with pytest.warns(UserWarning, match="single class"):
        assert math.isnan(metrics.auc(labels, scores))
    r = metrics.at_threshold(labels, scores, 0.5)
    # scores >= .5 are .5, .75, 1: three false positives, two true negatives, no HER2+ at all.
    assert (r.tn, r.fp, r.fn, r.tp) == (2, 3, 0, 0)
    assert math.isnan(r.auc) and math.isnan(r.sensitivity)  # 0/0: no HER2+ to find
    assert r.specificity == pytest.approx(2 / 5) and r.precision == 0.0
    with pytest.warns(UserWarning):
        assert metrics.youden_threshold(labels, scores) == 0.5


def test_no_positive_predictions_gives_nan_precision() -> None:
    r = metrics.at_threshold(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4]), 0.9)
    assert (r.tp, r.fp, r.fn, r.tn) == (0, 0, 2, 2)
    assert r.sensitivity == 0.0 and r.specificity == 1.0
    assert math.isnan(r.precision)
    assert r.f1 == 0.0


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.auc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="2 labels but 3 scores"):
        metrics.auc(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="must be 0"):
        metrics.auc(np.array([0, 2]), np.array([0.1, 0.2]))
