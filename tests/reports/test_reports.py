"""The clinical report: every figure is a real PNG, summary.md labels its tables and judges the
checklist from the numbers, best.json is strict JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from her2exp import metrics, reports


def _split(n: int, seed: int, shift: float = 1.5):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(int)
    scores = 1.0 / (1.0 + np.exp(-rng.normal(shift * labels - 0.7, 1.0)))
    patients = np.arange(n) // 5 * 2 + labels
    return labels, scores, patients


def _evaluations(external: bool = False):
    vl, vs, vp = _split(300, 0)
    levels = metrics.operating_points_by_level(vl, vs, None, vp)  # as final.py chooses them
    ops = levels["tile"]
    out = {"val": metrics.evaluate_split(vl, vs, ops, patient_ids=vp, level_thresholds=levels)}
    tl, ts, tp = _split(300, 1)
    out["test"] = metrics.evaluate_split(
        tl, ts, ops, patient_ids=tp, n_boot=100, level_thresholds=levels
    )
    if external:
        el, es, ep = _split(200, 2, shift=0.8)
        out["external"] = metrics.evaluate_split(
            el, es, ops, patient_ids=ep, level_thresholds=levels
        )
    images = np.random.default_rng(3).integers(0, 256, (tl.size, 16, 16, 3), dtype=np.uint8)
    return out, {"test": (images, tl, ts, ops["youden"])}, (tl, ts, ops["youden"])


HEADER = {
    "model": "resnet18",
    "best_epoch": 7,
    "seed": 42,
    "git_commit": "abc123",
    "data_fingerprint": "f00d",
}


def test_every_file_is_written_and_every_png_is_valid(tmp_path: Path) -> None:
    evaluations, galleries, _ = _evaluations()
    paths = reports.write_clinical_report(tmp_path / "reports", evaluations, galleries, HEADER)
    names = {p.name for p in paths}
    expected = {
        "roc.png",
        "roc_patient.png",  # the patient level (the helpers give patient ids)
        "precision_recall.png",
        "reliability.png",
        "decision_curve.png",
        "confusion_val.png",
        "confusion_test.png",
        "false_negatives_test.png",
        "false_positives_test.png",
        "summary.md",
        "best.json",
    }
    assert names == expected
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
        if p.suffix == ".png":
            with Image.open(p) as im:
                assert im.format == "PNG" and im.size[0] > 100
                im.verify()
    assert not [p for p in (tmp_path / "reports").iterdir() if p.name.startswith(".")]


def test_figures_off_writes_the_numbers_and_says_what_was_not_drawn(tmp_path: Path) -> None:
    """evaluation.figures=false (experiment=smoke): no PNG; summary.md, best.json and the
    checklist still come, and the checklist names the switch instead of claiming a gallery."""
    evaluations, galleries, _ = _evaluations()
    paths = reports.write_clinical_report(tmp_path, evaluations, galleries, HEADER, figures=False)
    assert sorted(p.name for p in paths) == ["best.json", "summary.md"]
    assert not list(tmp_path.glob("*.png"))
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["figures"] == [] and best["test_auc"] == evaluations["test"].auc.auc
    text = (tmp_path / "summary.md").read_text()
    rows = _checklist_rows(text)
    assert rows["False-negative analysis present"] == "FAIL"
    assert rows["Decision curve analysis present"] == "FAIL"
    assert text.count("figures off (evaluation.figures=false)") == 2


def test_summary_labels_both_tables_and_renders_the_checklist(tmp_path: Path) -> None:
    evaluations, galleries, _ = _evaluations()
    reports.write_clinical_report(tmp_path, evaluations, galleries, HEADER)
    text = (tmp_path / "summary.md").read_text()
    assert "## validation (thresholds chosen here)" in text
    assert "## test (frozen thresholds)" in text
    assert text.index("validation (thresholds chosen here)") < text.index("test (frozen")
    assert "## Clinical Evaluation Checklist" in text
    ev = evaluations["test"]
    r = ev.reports["sens90"]
    # The test sens90 row with Wilson CIs and counts, as computed by metrics.
    counts = f"{r.tp}/{r.fn}/{r.fp}/{r.tn}"
    rows = text.splitlines()
    row = next(s for s in rows if s.startswith("| sens90 |") and counts in s)
    assert f"{r.sensitivity:.3f} [{r.sensitivity_low:.3f}, {r.sensitivity_high:.3f}]" in row
    assert f"{ev.auc.auc:.3f} [{ev.auc.low:.3f}, {ev.auc.high:.3f}]" in text
    assert "patient level" in text and "Brier" in text and "ECE" in text
    checklist = _checklist_rows(text)
    assert checklist["External cohort evaluated"] == "FAIL"
    assert checklist["False-negative analysis present"] == "PASS"
    assert checklist["Decision curve analysis present"] == "PASS"
    assert checklist["Threshold tuned on validation and documented"] == "PASS"
    assert checklist["Seed and git commit recorded"] == "PASS"
    val_auc = evaluations["val"].auc.auc
    want = "PASS" if val_auc >= 0.95 else "FAIL"
    assert checklist["AUC >= 0.95 on validation"] == want
    sens = evaluations["test"].reports["youden"].sensitivity
    want = "PASS" if sens >= 0.90 else "FAIL"
    assert checklist["HER2+ recall >= 0.90 (test, val-chosen operating point)"] == want


def _checklist_rows(text: str) -> dict[str, str]:
    block = text.split("## Clinical Evaluation Checklist", 1)[1].split("##", 1)[0]
    rows = [line.split("|")[1:3] for line in block.splitlines() if line.startswith("| ")]
    return {item.strip(): status.strip() for item, status in rows if item.strip() != "item"}


def test_checklist_follows_the_numbers(tmp_path: Path) -> None:
    evaluations, _, _ = _evaluations(external=True)
    header = {**HEADER, "git_commit": "", "operating_point": "sens90"}
    reports.write_clinical_report(tmp_path, evaluations, {}, header)
    rows = _checklist_rows((tmp_path / "summary.md").read_text())
    assert rows["External cohort evaluated"] == "PASS"
    assert rows["False-negative analysis present"] == "FAIL"
    assert rows["Seed and git commit recorded"] == "FAIL"
    sens = evaluations["test"].reports["sens90"].sensitivity
    assert rows["HER2+ recall >= 0.90 (test, val-chosen operating point)"] == (
        "PASS" if sens >= 0.9 else "FAIL"
    )
    assert "## external cohort (frozen thresholds)" in (tmp_path / "summary.md").read_text()


def test_thresholds_retuned_on_test_fail_the_checklist(tmp_path: Path) -> None:
    evaluations, _, _ = _evaluations()
    tl, ts, _ = _split(300, 1)
    evaluations["test"] = metrics.evaluate_split(tl, ts, metrics.operating_points(tl, ts))
    reports.write_clinical_report(tmp_path, evaluations, {}, HEADER)
    rows = _checklist_rows((tmp_path / "summary.md").read_text())
    assert rows["Threshold tuned on validation and documented"] == "FAIL"


def test_thresholds_tuned_on_test_fail_even_when_every_split_is_scored_at_them(
    tmp_path: Path,
) -> None:
    # report_cohorts scores every split at the one dict it is given and records that dict in
    # the header, so the splits always agree with each other: only re-deriving what val
    # chooses catches thresholds tuned on test.
    vl, vs, _ = _split(300, 0)
    tl, ts, _ = _split(300, 1)
    from_val, from_test = metrics.operating_points(vl, vs), metrics.operating_points(tl, ts)
    assert from_test["youden"] != from_val["youden"]
    for thresholds, want in ((from_val, "PASS"), (from_test, "FAIL")):
        evaluations = {
            "val": metrics.evaluate_split(vl, vs, thresholds),
            "test": metrics.evaluate_split(tl, ts, thresholds),
        }
        header = {**HEADER, "thresholds": thresholds}
        reports.write_clinical_report(tmp_path / want, evaluations, {}, header)
        rows = _checklist_rows((tmp_path / want / "summary.md").read_text())
        assert rows["Threshold tuned on validation and documented"] == want, thresholds


def test_external_only_report_checks_the_checkpoint_thresholds(tmp_path: Path) -> None:
    el, es, _ = _split(200, 2)
    frozen = metrics.operating_points(*_split(300, 0)[:2])
    evaluations = {"external": metrics.evaluate_split(el, es, frozen)}
    shifted = {**frozen, "youden": frozen["youden"] + 0.01}
    for header_thresholds, want in ((frozen, "PASS"), (shifted, "FAIL"), (None, "FAIL")):
        header = {**HEADER, "thresholds": header_thresholds}
        reports.write_clinical_report(tmp_path / want, evaluations, {}, header)
        rows = _checklist_rows((tmp_path / want / "summary.md").read_text())
        assert rows["Threshold tuned on validation and documented"] == want


def test_best_json_is_strict_json_with_flat_and_nested_metrics(tmp_path: Path) -> None:
    evaluations, galleries, _ = _evaluations()
    reports.write_clinical_report(tmp_path, evaluations, galleries, HEADER)
    text = (tmp_path / "best.json").read_text()
    best = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert best["seed"] == 42 and best["git_commit"] == "abc123"
    assert best["test_auc"] == pytest.approx(evaluations["test"].auc.auc)
    assert best["val_youden_threshold"] == evaluations["val"].thresholds["youden"]
    assert (
        best["splits"]["test"]["reports"]["sens90"]["tp"]
        == evaluations["test"].reports["sens90"].tp
    )
    assert len(best["splits"]["test"]["decision_curve"]["net_benefit"]) == 99
    assert len(best["checklist"]) == 8


def test_nan_metrics_become_null_in_best_json(tmp_path: Path) -> None:
    labels = np.zeros(30, dtype=int)
    scores = np.linspace(0.01, 0.99, 30)
    with pytest.warns(UserWarning, match="single class"):
        ev = metrics.evaluate_split(labels, scores, {"p50": 0.5})
    paths = reports.write_clinical_report(tmp_path, {"external": ev}, {}, HEADER)
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["external_auc"] is None and best["external_p50_sensitivity"] is None
    for p in paths:
        if p.suffix == ".png":
            with Image.open(p) as im:
                im.verify()


def test_galleries_show_false_negatives_lowest_score_first() -> None:
    labels = np.array([1, 1, 1, 0, 0, 0, 1])
    scores = np.array([0.4, 0.9, 0.1, 0.8, 0.2, 0.95, 0.3])
    fn, fp = metrics.misclassified(labels, scores, 0.5)
    assert list(fn) == [2, 6, 0]  # scores .1, .3, .4
    assert list(fp) == [5, 3]  # scores .95, .8


def test_gallery_with_wrong_image_shape_is_named(tmp_path: Path) -> None:
    evaluations, _, (tl, ts, t) = _evaluations()
    bad = np.zeros((tl.size, 16, 16), dtype=np.uint8)
    with pytest.raises(ValueError, match="gallery 'test'"):
        reports.write_clinical_report(tmp_path, evaluations, {"test": (bad, tl, ts, t)}, HEADER)


def test_best_json_is_strict_json(tmp_path: Path) -> None:
    labels, scores, _ = _split(100, 4)
    rep = metrics.at_threshold(labels, scores, 0.5)
    summary = {
        "model": "m",
        "best_epoch": 1,
        "tables": {"test @ 0.5": rep.as_dict()},
        "x": float("nan"),
        "where": tmp_path,
        "arr": np.array([1.0, np.inf]),
    }
    reports.write_best_json(tmp_path / "best.json", summary)
    loaded = json.loads((tmp_path / "best.json").read_text())
    assert loaded["x"] is None
    assert loaded["where"] == str(tmp_path) and loaded["arr"] == [1.0, None]
    assert loaded["tables"]["test @ 0.5"]["n"] == 100
