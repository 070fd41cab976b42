"""Metrics against hand-built confusion matrices and degenerate splits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from her2exp import metrics
from her2exp.metrics.ranking import _bootstrap_aucs


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


# --------------------------------------------------------------------------------------------
# AUC confidence intervals
# --------------------------------------------------------------------------------------------


def _binormal(n: int, seed: int, shift: float = 1.0, prevalence: float = 0.3):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < prevalence).astype(int)
    scores = 1.0 / (1.0 + np.exp(-rng.normal(shift * labels - 0.5, 1.0)))
    return labels, scores


def _delong_slow(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """O(m n) DeLong straight from the 1988 paper: psi over every (HER2+, HER2-) pair."""
    x, y = scores[labels == 1], scores[labels == 0]
    psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    var = v10.var(ddof=1) / x.size + v01.var(ddof=1) / y.size
    return float(psi.mean()), float(var)


def test_delong_auc_equals_sklearn_and_variance_equals_pairwise_reference() -> None:
    from sklearn.metrics import roc_auc_score

    labels, scores = _binormal(300, seed=1)
    scores = np.round(scores, 2)  # force ties across and within classes
    ci = metrics.auc_ci_delong(labels, scores)
    area, var = _delong_slow(labels, scores)
    assert ci.auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert ci.auc == pytest.approx(area, abs=1e-12)
    assert ci.se == pytest.approx(math.sqrt(var), rel=1e-10)
    assert ci.low == pytest.approx(ci.auc - 1.959963984540054 * ci.se)
    assert ci.method == "delong"


def test_delong_variance_by_hand_on_a_tiny_example() -> None:
    # X (HER2+) = .8 .6 .4, Y (HER2-) = .5 .3. psi rows: .8->(1,1) .6->(1,1) .4->(0,1).
    # V10 = (1, 1, .5): var(ddof=1) = 1/12. V01 (per negative): .5 -> 2/3, .3 -> 1: var = 1/18.
    # Var = (1/12)/3 + (1/18)/2 = 1/36 + 1/36 = 1/18. AUC = 5/6.
    ci = metrics.auc_ci_delong(np.array([1, 1, 1, 0, 0]), np.array([0.8, 0.6, 0.4, 0.5, 0.3]))
    assert ci.auc == pytest.approx(5 / 6)
    assert ci.se == pytest.approx(math.sqrt(1 / 18))
    assert ci.high == 1.0  # clipped: 5/6 + 1.96 * 0.236 > 1


def test_delong_and_bootstrap_intervals_agree_on_2000_scores() -> None:
    labels, scores = _binormal(2000, seed=2)
    d = metrics.auc_ci_delong(labels, scores)
    b = metrics.auc_ci_bootstrap(labels, scores, n_boot=2000, seed=0)
    assert b.auc == pytest.approx(d.auc)
    assert abs(d.low - b.low) < 0.01 and abs(d.high - b.high) < 0.01
    assert b.se == pytest.approx(d.se, rel=0.15)


@pytest.mark.parametrize("prevalence", [0.3, 0.75])  # 0.75: HER2+ is the larger class
def test_vectorised_bootstrap_equals_a_looped_stratified_bootstrap_distribution(
    prevalence: float,
) -> None:
    from scipy.stats import rankdata

    labels, scores = _binormal(400, seed=3, prevalence=prevalence)
    scores = np.round(scores, 1)  # ties exercise the half-credit path
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    rng = np.random.default_rng(5)
    looped = []
    for _ in range(1500):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        # Each resample's AUC by the Mann-Whitney rank sum (mid-ranks: ties count 1/2), what
        # sklearn's roc_auc_score gives to 1e-15 in 1/25 of its time.
        ranks = rankdata(scores[idx])[: pos.size]
        looped.append((ranks.sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))
    b = metrics.auc_ci_bootstrap(labels, scores, n_boot=1500, seed=1)
    lo, hi = np.quantile(looped, [0.025, 0.975])
    assert abs(b.low - lo) < 0.01 and abs(b.high - hi) < 0.01
    assert b.se == pytest.approx(np.std(looped, ddof=1), rel=0.1)


def test_bootstrap_is_reproducible_by_seed() -> None:
    labels, scores = _binormal(500, seed=4)
    a = metrics.auc_ci_bootstrap(labels, scores, n_boot=200, seed=7)
    b = metrics.auc_ci_bootstrap(labels, scores, n_boot=200, seed=7)
    c = metrics.auc_ci_bootstrap(labels, scores, n_boot=200, seed=8)
    assert (a.low, a.high) == (b.low, b.high) and (a.low, a.high) != (c.low, c.high)


def test_bootstrap_does_not_depend_on_the_number_of_threads() -> None:
    labels, scores = _binormal(3000, seed=6)
    x, y = scores[labels == 1], scores[labels == 0]
    one = _bootstrap_aucs(x, y, n_boot=300, seed=3, workers=1)
    two = _bootstrap_aucs(x, y, n_boot=300, seed=3, workers=2)
    np.testing.assert_array_equal(one, two)
    assert one.std() > 0


def test_bootstrap_of_separated_classes_is_exactly_one() -> None:
    labels = np.array([0] * 30 + [1] * 10)
    scores = np.concatenate([np.linspace(0.0, 0.4, 30), np.linspace(0.6, 1.0, 10)])
    aucs = _bootstrap_aucs(scores[labels == 1], scores[labels == 0], 100, seed=0)
    np.testing.assert_array_equal(aucs, np.ones(100))
    tied = _bootstrap_aucs(np.full(10, 0.5), np.full(30, 0.5), 100, seed=0)
    np.testing.assert_array_equal(tied, np.full(100, 0.5))  # all ties: half credit each


# --------------------------------------------------------------------------------------------
# Operating points
# --------------------------------------------------------------------------------------------


def test_sensitivity_targeted_threshold_matches_brute_force() -> None:
    for seed in range(5):
        labels, scores = _binormal(250, seed=seed)
        scores = np.round(scores, 2)
        every = [metrics.at_threshold(labels, scores, c) for c in np.unique(scores)]  # once a seed
        for target in (0.8, 0.9, 0.95, 1.0):
            t = metrics.threshold_for_sensitivity(labels, scores, target)
            feasible = [r for r in every if r.sensitivity >= target]
            best = max(feasible, key=lambda r: (r.specificity, r.sensitivity))
            got = metrics.at_threshold(labels, scores, t)
            assert got.sensitivity >= target
            assert (got.specificity, got.sensitivity) == (best.specificity, best.sensitivity)
            assert t == best.threshold


def test_operating_points_names_and_values() -> None:
    labels, scores = _binormal(300, seed=6)
    ops = metrics.operating_points(labels, scores, target_sensitivity=0.95)
    assert list(ops) == ["youden", "sens95", "sens95_lcb", "p50"]
    assert ops["youden"] == metrics.youden_threshold(labels, scores)
    assert ops["sens95"] == metrics.threshold_for_sensitivity(labels, scores, 0.95)
    assert ops["p50"] == 0.5
    assert "sens90" in metrics.operating_points(labels, scores)


def test_choose_threshold_re_derives_each_named_operating_point() -> None:
    labels, scores = _binormal(300, seed=6)
    for target in (0.8, 0.9, 0.95):
        ops = metrics.operating_points(labels, scores, target_sensitivity=target)
        assert {name: metrics.choose_threshold(name, labels, scores) for name in ops} == ops
    assert metrics.choose_threshold("p30", labels, scores) == 0.3
    for bad in ("median", "sens", "sens0", "p101", "Youden"):
        with pytest.raises(ValueError, match="unknown operating point"):
            metrics.choose_threshold(bad, labels, scores)


# --------------------------------------------------------------------------------------------
# Wilson intervals
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    # Newcombe (1998), Statistics in Medicine 17:857-872, Table I, method 3 (Wilson score).
    [
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_matches_newcombe_and_scipy(k: int, n: int, low: float, high: float):
    from scipy.stats import binomtest

    lo, hi = metrics.wilson_interval(k, n)
    assert (lo, hi) == pytest.approx((low, high), abs=5e-5)
    ref = binomtest(k, n).proportion_ci(method="wilson")
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-12)


def test_report_carries_wilson_intervals_and_nan_for_empty_denominators() -> None:
    from scipy.stats import binomtest

    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.2, 0.1, 0.1, 0.0])
    r = metrics.at_threshold(labels, scores, 0.5)
    expected = [
        ("sensitivity", 3, 4),
        ("specificity", 5, 6),
        ("precision", 3, 4),
        ("npv", 5, 6),
        ("accuracy", 8, 10),
    ]
    for name, k, n in expected:
        ref = binomtest(k, n).proportion_ci(method="wilson")
        assert getattr(r, f"{name}_low") == pytest.approx(ref.low)
        assert getattr(r, f"{name}_high") == pytest.approx(ref.high)
    assert {"sensitivity", "tp", "auc", "sensitivity_low"} <= set(r.as_dict())
    r = metrics.at_threshold(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4]), 0.9)
    assert math.isnan(r.precision_low) and math.isnan(r.precision_high)


# --------------------------------------------------------------------------------------------
# Calibration and decision curves
# --------------------------------------------------------------------------------------------


def test_calibration_matches_sklearn_and_hand_ece() -> None:
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    labels, scores = _binormal(1000, seed=7)
    c = metrics.calibration(labels, scores, n_bins=10)
    assert c.brier == pytest.approx(brier_score_loss(labels, scores))
    pt, pp = calibration_curve(labels, scores, n_bins=10)
    np.testing.assert_allclose(c.prob_true, pt)
    np.testing.assert_allclose(c.prob_pred, pp)
    assert c.count.sum() == labels.size
    # ECE by an explicit loop over equal-width bins (b/10, (b+1)/10], first bin closed.
    ece = 0.0
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        inside = (scores > lo) & (scores <= hi) if b else (scores <= hi)
        if inside.any():
            ece += inside.mean() * abs(labels[inside].mean() - scores[inside].mean())
    assert c.ece == pytest.approx(ece)


def test_perfectly_calibrated_two_bin_example_has_zero_ece() -> None:
    # Bin (0, .5]: scores .25 x4, one HER2+ -> .25 observed; bin (.5, 1]: .75 x4, three HER2+.
    labels = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    scores = np.array([0.25] * 4 + [0.75] * 4)
    c = metrics.calibration(labels, scores, n_bins=2)
    assert c.ece == pytest.approx(0.0)
    assert c.brier == pytest.approx(np.mean((scores - labels) ** 2))


def test_decision_curve_by_hand() -> None:
    # 2 HER2+ (.9, .4), 3 HER2- (.6, .2, .1); N = 5, prevalence .4.
    labels = np.array([1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.4, 0.6, 0.2, 0.1])
    d = metrics.decision_curve(labels, scores, thresholds=np.array([0.3, 0.5, 0.95]))
    # p_t=.3: TP=2 (.9,.4), FP=1 (.6): 2/5 - 1/5 * 3/7. p_t=.5: TP=1, FP=1: 1/5 - 1/5 * 1.
    # p_t=.95: nobody called: 0.
    np.testing.assert_allclose(d.net_benefit, [2 / 5 - 1 / 5 * 3 / 7, 1 / 5 - 1 / 5, 0.0])
    np.testing.assert_allclose(d.treat_all, [0.4 - 0.6 * 3 / 7, 0.4 - 0.6, 0.4 - 0.6 * 19])
    np.testing.assert_array_equal(d.treat_none, 0.0)
    assert metrics.decision_curve(labels, scores).thresholds.size == 99


# --------------------------------------------------------------------------------------------
# Patient level
# --------------------------------------------------------------------------------------------


def test_aggregate_by_patient_mean_and_max() -> None:
    ids = np.array(["b", "a", "b", "c", "a", "b"])
    labels = np.array([1, 0, 1, 0, 0, 1])
    scores = np.array([0.9, 0.2, 0.3, 0.6, 0.4, 0.6])
    mean = metrics.aggregate_by_patient(ids, labels, scores, how="mean")
    assert list(mean.patient_ids) == ["a", "b", "c"]
    np.testing.assert_array_equal(mean.labels, [0, 1, 0])
    np.testing.assert_allclose(mean.scores, [0.3, 0.6, 0.6])
    np.testing.assert_array_equal(mean.n_patches, [2, 3, 1])
    mx = metrics.aggregate_by_patient(ids, labels, scores, how="max")
    np.testing.assert_allclose(mx.scores, [0.4, 0.9, 0.6])


def test_patient_with_mixed_labels_is_named() -> None:
    with pytest.raises(ValueError, match="HER2\\+ and HER2- patches: p7"):
        metrics.aggregate_by_patient(
            np.array(["p1", "p7", "p7"]), np.array([0, 1, 0]), np.array([0.1, 0.2, 0.3])
        )
    with pytest.raises(ValueError, match="how must be"):
        metrics.aggregate_by_patient(np.array([1]), np.array([0]), np.array([0.1]), how="median")


# --------------------------------------------------------------------------------------------
# evaluate_split and degenerate inputs
# --------------------------------------------------------------------------------------------


def test_evaluate_split_flat_metrics_are_consistent() -> None:
    val_labels, val_scores = _binormal(600, seed=8)
    labels, scores = _binormal(800, seed=9)
    patients = np.arange(labels.size) // 4 * 2 + labels  # 4-patch patients, one label each
    ops = metrics.operating_points(val_labels, val_scores)
    ev = metrics.evaluate_split(labels, scores, ops, patient_ids=patients, n_boot=200)
    flat = ev.as_flat_dict("test_")
    assert flat["test_auc"] == pytest.approx(metrics.auc(labels, scores))
    assert flat["test_auc_low"] < flat["test_auc"] < flat["test_auc_high"]
    assert flat["test_auc_boot_low"] < flat["test_auc"] < flat["test_auc_boot_high"]
    for name, t in ops.items():
        ref = metrics.at_threshold(labels, scores, t)
        assert flat[f"test_{name}_threshold"] == t
        assert flat[f"test_{name}_sensitivity"] == ref.sensitivity
        assert flat[f"test_{name}_sensitivity_low"] == ref.sensitivity_low
    assert flat["test_brier"] == metrics.calibration(labels, scores).brier
    agg = metrics.aggregate_by_patient(patients, labels, scores)
    assert flat["test_patient_auc"] == pytest.approx(metrics.auc(agg.labels, agg.scores))
    assert flat["test_patient_n"] == agg.labels.size
    assert "test_patient_youden_specificity_high" in flat
    assert all(isinstance(v, float) for v in flat.values())
    assert ev.to_dict()["reports"]["youden"]["tp"] == ev.reports["youden"].tp


def test_one_class_split_is_nan_with_a_warning_not_a_crash() -> None:
    labels = np.ones(20, dtype=int)
    scores = np.linspace(0.05, 0.95, 20)
    with pytest.warns(UserWarning, match="single class"):
        d = metrics.auc_ci_delong(labels, scores)
    assert math.isnan(d.auc) and math.isnan(d.low)
    with pytest.warns(UserWarning, match="single class"):
        assert math.isnan(metrics.auc_ci_bootstrap(labels, scores, n_boot=10).high)
    with pytest.warns(UserWarning, match="single class"):
        ev = metrics.evaluate_split(labels, scores, {"p50": 0.5}, n_boot=10)
    assert math.isnan(ev.auc.auc) and ev.roc is None and ev.pr is None
    assert ev.reports["p50"].sensitivity == 0.5 and math.isnan(ev.reports["p50"].specificity)
    assert math.isfinite(ev.calibration.brier)
    with pytest.warns(UserWarning):
        assert metrics.threshold_for_sensitivity(labels, scores) == 0.5


def test_constant_scores_give_auc_one_half() -> None:
    labels = np.array([0, 1] * 10)
    scores = np.full(20, 0.3)
    d = metrics.auc_ci_delong(labels, scores)
    assert (d.auc, d.low, d.high) == (0.5, 0.5, 0.5)
    b = metrics.auc_ci_bootstrap(labels, scores, n_boot=50)
    assert (b.low, b.high) == (0.5, 0.5)
    ev = metrics.evaluate_split(labels, scores, {"p50": 0.5})
    assert ev.auc.auc == 0.5 and ev.reports["p50"].tp == 0


def test_degenerate_inputs_raise_named_errors() -> None:
    labels = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.evaluate_split(labels, np.array([0.1, np.nan, 0.2, 0.3]), {"p50": 0.5})
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.auc_ci_delong(labels, np.array([0.1, np.inf, 0.2, 0.3]))
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
        metrics.evaluate_split(labels, np.array([-2.0, 1.0, 3.0, 0.5]), {"p50": 0.5})
    with pytest.raises(ValueError, match="empty split"):
        metrics.evaluate_split(np.array([], int), np.array([]), {"p50": 0.5})
    with pytest.raises(ValueError, match="thresholds is empty"):
        metrics.evaluate_split(labels, np.array([0.1, 0.9, 0.2, 0.3]), {})
    with pytest.raises(ValueError, match="target sensitivity"):
        metrics.threshold_for_sensitivity(labels, np.array([0.1, 0.9, 0.2, 0.3]), 1.5)
    with pytest.raises(ValueError, match="n_boot"):
        metrics.auc_ci_bootstrap(labels, np.array([0.1, 0.9, 0.2, 0.3]), n_boot=0)
    with pytest.warns(UserWarning, match=">= 2 cases per class"):
        one_pos = metrics.auc_ci_delong(np.array([0, 0, 1]), np.array([0.1, 0.2, 0.3]))
    assert one_pos.auc == 1.0 and math.isnan(one_pos.se)
