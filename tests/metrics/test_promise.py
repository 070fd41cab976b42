"""Issue 18, items 6 and 7: the operating point `sens{N}_lcb` (a sensitivity promised with a
one-sided lower confidence bound on validation) and the per-site results beside the pooled ones
(her2exp/metrics/operating_points.py, levels.py, evaluation.py, reports.py, bench/promise.py)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit
from scipy.stats import binomtest, norm

from conftest import SmokeRun
from her2exp import metrics
from her2exp.bench import promise as bench
from her2exp.config import ConfigError
from her2exp.config import commands as schemas


def _clustered(
    rng: np.random.Generator, n_patients: int, tiles: int, shift: float = 1.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half HER2+ patients; a patient's tiles share its latent score (correlated calls)."""
    labels = np.repeat(np.arange(n_patients) % 2, tiles)
    latent = np.repeat(rng.normal(np.where(np.arange(n_patients) % 2, shift, -shift), 1.0), tiles)
    scores = expit(latent + rng.normal(0.0, 0.5, latent.size))
    return labels, scores, np.repeat(np.arange(n_patients).astype(str), tiles)


def _scipy_lcb(k: int, n: int, confidence: float) -> float:
    return binomtest(k, n).proportion_ci(2 * confidence - 1, method="exact").low


def test_lower_bound_is_scipys_clopper_pearson_and_29_is_the_number_needed() -> None:
    for k, n in ((29, 29), (27, 30), (1, 3), (10, 12), (95, 100), (0, 7)):
        for confidence in (0.9, 0.95, 0.99):
            assert metrics.sensitivity_lcb(k, n, confidence) == pytest.approx(
                _scipy_lcb(k, n, confidence), abs=1e-9
            )
    assert metrics.positives_needed(0.90, 0.95) == 29
    assert metrics.sensitivity_lcb(28, 28, 0.95) < 0.90 <= metrics.sensitivity_lcb(29, 29, 0.95)
    assert metrics.positives_needed(0.80, 0.99) == math.ceil(math.log(0.01) / math.log(0.8))


def test_threshold_is_the_highest_whose_bound_reaches_the_target() -> None:
    """Patient level (and tiles, one per patient): the bound is scipy's at the chosen threshold,
    and no higher candidate reaches it."""
    rng = np.random.default_rng(3)
    labels, scores, _ = _clustered(rng, 160, 1)
    t = metrics.threshold_for_sensitivity_lcb(labels, scores, 0.9, 0.95)
    own = metrics.threshold_for_sensitivity_lcb(labels, scores, 0.9, 0.95, np.arange(labels.size))
    assert own == t  # one tile per patient: the plain bound

    def bound(c: float) -> float:
        return _scipy_lcb(int((scores[labels == 1] >= c).sum()), int(labels.sum()), 0.95)

    assert bound(t) >= 0.9
    higher = np.unique(scores[(scores > t) & (labels == 1)])  # where the bound can change
    assert higher.size and all(bound(c) < 0.9 for c in higher)
    assert t <= metrics.threshold_for_sensitivity(labels, scores, 0.9)  # it costs specificity


def test_tile_bound_counts_patients_not_tiles() -> None:
    """Four tiles per patient are worth one patient each (effective n = patients); the tile
    threshold is the one the bound on the patients' effective sample reaches."""
    rng = np.random.default_rng(4)
    labels, scores, groups = _clustered(rng, 120, 4)
    assert metrics.effective_n(groups, labels) == pytest.approx(60.0)
    uneven = np.array(["a"] * 6 + ["b"] * 2)
    assert metrics.effective_n(uneven, np.ones(8)) == pytest.approx(64 / 40)
    t = metrics.threshold_for_sensitivity_lcb(labels, scores, 0.9, 0.95, groups)
    rep = metrics.at_threshold(labels, scores, t)
    assert metrics.sensitivity_lcb(rep.sensitivity * 60, 60, 0.95) >= 0.9
    naive = metrics.threshold_for_sensitivity_lcb(labels, scores, 0.9, 0.95)  # 240 "independent"
    assert t < naive


def test_too_few_positives_warn_naming_the_level_and_fall_back_to_catching_all() -> None:
    rng = np.random.default_rng(5)
    labels, scores, groups = _clustered(rng, 40, 3)  # 20 HER2+ patients
    with pytest.warns(UserWarning) as caught:
        levels = metrics.operating_points_by_level(labels, scores, None, groups, 0.9)
    text = [str(w.message) for w in caught]
    patient = next(m for m in text if m.startswith("patient level of validation"))
    assert "sens90_lcb cannot be promised: 20 HER2+" in patient and ">= 29 positives" in patient
    assert any(m.startswith("tile level of validation") and "60 HER2+" in m for m in text)
    agg = metrics.aggregate_by_patient(groups, labels, scores)
    assert levels["patient"]["sens90_lcb"] == agg.scores[agg.labels == 1].min()
    assert levels["tile"]["sens90_lcb"] == scores[labels == 1].min()
    p = metrics.promise(agg.labels, 0.9, 0.95)
    assert (p.n_pos, p.needed, p.feasible) == (20, 29, False)


def test_choose_threshold_re_derives_the_promised_point() -> None:
    rng = np.random.default_rng(6)
    labels, scores, groups = _clustered(rng, 200, 3)
    ops = metrics.operating_points(labels, scores, 0.85, 0.9, groups)
    assert list(ops) == ["youden", "sens85", "sens85_lcb", "p50"]
    again = {n: metrics.choose_threshold(n, labels, scores, groups, 0.9) for n in ops}
    assert again == ops
    assert metrics.choose_threshold("sens85_lcb", labels, scores) != ops["sens85_lcb"]
    for bad in ("p90_lcb", "sens90_lcbx", "youden_lcb"):
        with pytest.raises(ValueError, match="unknown operating point"):
            metrics.choose_threshold(bad, labels, scores)


def test_config_allows_the_promised_point_of_its_own_target() -> None:
    cfg = schemas.validate_only("train", ["evaluation.operating_point=sens90_lcb"])
    assert cfg.evaluation.lcb_confidence == 0.95
    with pytest.raises(ConfigError, match="sens80_lcb"):
        schemas.validate_only("train", ["evaluation.operating_point=sens80_lcb"])


def test_simulated_promise_holds_at_lcb_and_only_half_the_time_at_sens90() -> None:
    """Many validation sets from a known clustered score distribution: the true tile and
    patient sensitivity at sens90_lcb is >= 0.90 in >= ~95% of them, at sens90 about half."""
    rng = np.random.default_rng(7)
    spread = math.sqrt(1.0 + 0.5**2)  # a positive tile's latent: patient N(1.5, 1) + N(0, 0.5)
    hits = {"tile": [0, 0], "patient": [0, 0]}
    draws = 150
    for _ in range(draws):
        labels, scores, groups = _clustered(rng, 80, 4)  # 40 HER2+ patients, 160 tiles
        one = labels[::4], scores[::4]  # one tile a patient: the patient level's plain bound
        for level, (lab, sc, grp) in {
            "tile": (labels, scores, groups),
            "patient": (*one, None),
        }.items():
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # 40 patients can make the promise: no warning
                chosen = (
                    metrics.threshold_for_sensitivity(lab, sc, 0.9),
                    metrics.threshold_for_sensitivity_lcb(lab, sc, 0.9, 0.95, grp),
                )
            for k, t in enumerate(chosen):
                hits[level][k] += norm.sf((logit(t) - 1.5) / spread) >= 0.9
    for level, (plain, promised) in hits.items():
        assert promised / draws >= 0.93, (level, promised)
        assert 0.3 <= plain / draws <= 0.7, (level, plain)


def test_site_with_one_class_gets_nan_auc_and_a_note_not_an_error() -> None:
    rng = np.random.default_rng(8)
    labels, scores, groups = _clustered(rng, 30, 2)
    sites = np.where(np.arange(labels.size) < 8, "lab/one", "b")
    labels[:8] = 1  # site "lab/one": HER2+ only
    levels = {"tile": {"p50": 0.5}, "patient": {"p50": 0.5}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = metrics.evaluate_split(
            labels, scores, {"p50": 0.5}, groups, level_thresholds=levels, site_ids=sites
        )
        single = metrics.evaluate_split(labels, scores, {"p50": 0.5}, site_ids=np.full(60, "a"))
    assert single.sites == {}
    one = ev.sites["lab/one"]
    assert math.isnan(one.evaluation.auc.auc) and "HER2+ only" in one.note
    keep = sites == "b"
    alone = metrics.evaluate_split(
        labels[keep], scores[keep], {"p50": 0.5}, groups[keep], level_thresholds=levels
    )
    assert ev.sites["b"].evaluation.reports == alone.reports
    assert ev.sites["b"].evaluation.patient.auc == alone.patient.auc
    flat = ev.as_flat_dict("test_")
    name = metrics.SiteEvaluation("lab/one", one.evaluation).metric_name
    assert name.startswith("lab_one-") and math.isnan(flat[f"test_site_{name}_auc"])
    assert flat["test_site_b_patient_p50_sensitivity_low"] == (
        alone.patient.reports["p50"].sensitivity_low
    )


def test_smoke_run_reports_each_site_and_what_validation_can_promise(smoke_run: SmokeRun) -> None:
    """The smoke data has two sites: summary.md, best.json and reports/metrics.csv carry each
    site's AUC and rates at the pooled frozen thresholds, equal to evaluating that site's rows
    alone; summary.md states per level the validation positives, the number needed and the
    verdict."""
    reports = smoke_run.run_dir / "reports"
    best = json.loads((reports / "best.json").read_text())
    frozen = best["thresholds"]
    rows = pd.read_csv(reports / "predictions_test.csv", dtype={"patient_id": str, "slide_id": str})
    assert rows["site"].nunique() == 2
    # per-site numbers are rows of reports/metrics.csv (tracking/schema.py), not MLflow metrics
    table = pd.read_csv(reports / "metrics.csv", keep_default_na=False, na_values=[""])
    logged = table.set_index("metric")["value"]
    summary = (reports / "summary.md").read_text()
    assert "### test: per site (the pooled frozen thresholds)" in summary
    for site, part in rows.groupby("site"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            alone = metrics.evaluate_split(
                part["label"].to_numpy(),
                part["prob_her2_pos"].to_numpy(),
                frozen["tile"],
                part["patient_id"].to_numpy(),
                slide_ids=part["slide_id"].to_numpy(),
                level_thresholds=frozen,
            )
        stored = best["splits"]["test"]["sites"][site]
        assert stored["reports"]["sens90_lcb"]["tp"] == alone.reports["sens90_lcb"].tp
        assert stored["patient"]["reports"]["youden"]["fn"] == alone.patient.reports["youden"].fn
        want = alone.patient.reports["sens90"].specificity
        key = f"test_site_{site}_patient_sens90_specificity"
        got = logged[key]
        row = table[table["metric"] == key].iloc[0]
        assert (row["site"], row["level"], row["operating_point"]) == (site, "patient", "sens90")
        assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want)
        assert f"| {site} | patient | {alone.patient.n} ({alone.patient.n_pos}) |" in summary
    val = pd.read_csv(reports / "predictions_patients_val.csv")
    n_pos = int(val["label"].sum())
    verdict = "can be made" if n_pos >= 29 else "cannot be made"
    assert "## Promised sensitivity (`sens90_lcb`)" in summary
    assert f"| patient | {n_pos} | {n_pos:.1f} | 29 |" in summary
    assert verdict in summary.split("| patient | ")[-1].splitlines()[0]


def test_promise_bench_counts_the_runs_that_reach_the_target() -> None:
    """The measurement's table from given runs (the training part is what the smoke run
    covers; a real run of the bench takes minutes)."""
    runs = [
        bench.SeedResult(k, 37, 36, 0.9, {"sens90": s, "sens90_lcb": lcb}, {"sens90": 0.8})
        for k, (s, lcb) in enumerate([(0.85, 0.95), (0.92, 1.0), (math.nan, 0.9)])
    ]
    for r in runs:
        r.specificity["sens90_lcb"] = 0.5
    text = bench.table(runs, 0.9)
    assert "| sens90 | 1/3 (0.33) | 0.885 | 0.850 | 0.800 |" in text
    assert "| sens90_lcb | 3/3 (1.00) | 0.950 | 0.900 | 0.500 |" in text
    with pytest.raises(SystemExit):
        bench.main(["--seeds", "0"])
