"""Issue 17, item 3: results at the tile, slide and patient level, operating points chosen on
validation at each level and frozen into best.pt keyed by level, the decision level as the
headline (her2exp/metrics/levels.py, evaluation.py, final.py, predict.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf, open_dict
from PIL import Image

from conftest import SmokeRun
from her2exp import evaluation, metrics
from her2exp.cli.common import compose
from her2exp.config import ConfigError
from her2exp.config import commands as schemas
from her2exp.core import checkpoint
from her2exp.data import synthetic


def cohort(n_patients: int, seed: int, slides: int = 3) -> pd.DataFrame:
    """Tiles of several slides per patient, uneven tile counts, one label per patient."""
    rng = np.random.default_rng(seed)
    label = (np.arange(n_patients) % 3 == 0).astype(int)
    rows = []
    for p in range(n_patients):
        for s in range(int(rng.integers(1, slides + 1))):
            n = int(rng.integers(1, 20))
            score = 1 / (1 + np.exp(-rng.normal(1.2 * label[p] - 0.5, 1.2, n)))
            rows += [(f"P{p}", f"P{p}-S{s}", label[p], v) for v in score]
    return pd.DataFrame(rows, columns=["patient_id", "slide_id", "label", "prob"])


def by_pandas(df: pd.DataFrame, key: str, how: str, k: int) -> pd.Series:
    g = df.groupby(key)["prob"]
    if how == "mean":
        return g.mean()
    if how == "max":
        return g.max()
    return g.apply(lambda s: s.nlargest(k).mean())


@pytest.mark.parametrize("how", ["mean", "max", "topk_mean"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_aggregation_equals_a_pandas_groupby(how: str, k: int) -> None:
    df = cohort(40, seed=k)
    for key in ("slide_id", "patient_id"):
        got = metrics.aggregate_by_group(df[key], df["label"], df["prob"], how, k)
        want = by_pandas(df, key, how, k)
        assert list(got.ids) == list(want.index)
        np.testing.assert_allclose(got.scores, want.to_numpy(), rtol=1e-12)
        np.testing.assert_array_equal(got.n_tiles, df.groupby(key).size().to_numpy())
        np.testing.assert_array_equal(got.labels, df.groupby(key)["label"].max().to_numpy())


def test_topk_mean_of_a_group_with_fewer_tiles_is_its_mean_and_k1_is_max() -> None:
    ids, labels = np.array(["a", "a", "b", "b", "b"]), np.zeros(5, dtype=int)
    scores = np.array([0.2, 0.6, 0.1, 0.9, 0.5])
    got = metrics.aggregate_by_group(ids, labels, scores, "topk_mean", topk=2)
    np.testing.assert_allclose(got.scores, [0.4, 0.7])
    one = metrics.aggregate_by_group(ids, labels, scores, "topk_mean", topk=1)
    np.testing.assert_allclose(one.scores, [0.6, 0.9])
    with pytest.raises(ValueError, match=r"1 slide\(s\) have both HER2\+ and HER2- patches: b"):
        metrics.aggregate_by_group(ids, [0, 0, 0, 1, 0], scores, "max", what="slide")


def test_a_slide_id_shared_by_two_patients_is_named() -> None:
    with pytest.raises(ValueError, match="1 slide id.* more than one patient: S0"):
        metrics.level_scores([0, 0], [0.1, 0.2], np.array(["S0", "S0"]), np.array(["a", "b"]))


def test_thresholds_at_each_level_are_operating_points_on_that_levels_aggregates() -> None:
    df = cohort(60, seed=1)
    with pytest.warns(UserWarning, match="patient level of validation: sens90_lcb cannot"):
        chosen = metrics.operating_points_by_level(
            df["label"], df["prob"], df["slide_id"], df["patient_id"], 0.9, "topk_mean", "max", 4
        )
    slides = metrics.aggregate_by_group(df["slide_id"], df["label"], df["prob"], "topk_mean", 4)
    patients = metrics.aggregate_by_group(df["patient_id"], df["label"], df["prob"], "max")
    # The promised point's bound counts the patients behind the tiles and slides.
    slide_owner = metrics.level_groups("slide", df["slide_id"], df["patient_id"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # too few positives for the promise: warned above
        tile = metrics.operating_points(df["label"], df["prob"], 0.9, 0.95, df["patient_id"])
        slide = metrics.operating_points(slides.labels, slides.scores, 0.9, 0.95, slide_owner)
        patient = metrics.operating_points(patients.labels, patients.scores, 0.9)
    assert (chosen["tile"], chosen["slide"], chosen["patient"]) == (tile, slide, patient)
    assert chosen["slide"]["youden"] != chosen["tile"]["youden"]  # a level of its own


def test_one_class_validation_warns_naming_each_level_and_falls_back() -> None:
    df = cohort(12, seed=2).assign(label=0)
    with pytest.warns(UserWarning, match="patient level of validation: Youden threshold"):
        chosen = metrics.operating_points_by_level(
            df["label"], df["prob"], df["slide_id"], df["patient_id"]
        )
    assert chosen["patient"]["youden"] == chosen["slide"]["youden"] == 0.5


def ecfg(**changes: object):
    from her2exp.config import EvaluationConfig

    cfg = OmegaConf.structured(EvaluationConfig)
    cfg.merge_with({"n_boot": 0, **changes})
    return cfg


def test_test_split_is_scored_at_the_frozen_thresholds_of_each_level() -> None:
    """Thresholds frozen on val are the ones every level of test is scored at: perturbing the
    test scores moves the calls, never the thresholds."""
    val, test = cohort(60, seed=3), cohort(50, seed=4)
    e = ecfg(slide_aggregation="topk_mean", patient_aggregation="max", topk=3)
    frozen = metrics.operating_points_by_level(
        val["label"], val["prob"], val["slide_id"], val["patient_id"], 0.9, "topk_mean", "max", 3
    )
    for shift in (0.0, 0.2):
        rows = test.assign(prob=np.clip(test["prob"] + shift, 0, 1))
        split = evaluation.ScoredSplit("test", rows, rows["prob"].to_numpy())
        ev = evaluation.evaluate_scored(split, frozen, e, seed=0)
        for level in metrics.LEVELS:
            got = {k: r.threshold for k, r in ev.level_reports(level).items()}
            assert got == frozen[level], (shift, level)
        assert ev.slide.how == "topk_mean" and ev.patient.how == "max"
        flat = ev.as_flat_dict("test_")
        assert {"test_slide_auc", "test_slide_youden_sensitivity", "test_patient_auc"} <= set(flat)
        assert flat["test_slide_n"] == test["slide_id"].nunique()


def test_old_flat_thresholds_are_the_tile_level() -> None:
    flat = {"youden": 0.3, "sens90": 0.2, "p50": 0.5}
    assert metrics.as_level_thresholds(flat) == {"tile": flat}
    keyed = {"tile": flat, "patient": {"youden": 0.4}}
    assert metrics.as_level_thresholds(keyed) == keyed
    with pytest.raises(ValueError, match="unknown level"):
        metrics.as_level_thresholds({"tiles": flat})


@pytest.mark.parametrize(
    "override, key",
    [
        ("evaluation.slide_aggregation=median", "evaluation.slide_aggregation='median'"),
        ("evaluation.patient_aggregation=sum", "evaluation.patient_aggregation='sum'"),
        ("evaluation.decision_level=case", "evaluation.decision_level='case'"),
        ("evaluation.topk=0", "evaluation.topk=0"),
    ],
)
def test_config_refuses_bad_level_settings_in_one_line(override: str, key: str) -> None:
    for command, extra in (("train", []), ("eval", ["run_id=abc"])):
        with pytest.raises(ConfigError) as info:
            schemas.validate_only(command, [*extra, override])
        message = str(info.value)
        assert f"{key} is not allowed" in message and "\n" not in message, message
    cfg = schemas.validate_only("train", ["evaluation.patient_aggregation=topk_mean"])
    assert cfg.evaluation.topk == 8 and cfg.evaluation.decision_level == "tile"


# -- the real end-of-training path (the shared smoke run) ----------------------------------------
def test_best_pt_of_a_trained_run_holds_thresholds_keyed_by_level(smoke_run: SmokeRun) -> None:
    state = checkpoint.load(smoke_run.run_dir / "checkpoints" / "best.pt")
    assert set(state["thresholds"]) == set(metrics.LEVELS) and state["decision_level"] == "tile"
    val = pd.read_csv(smoke_run.run_dir / "reports" / "predictions_val.csv")
    chosen = metrics.operating_points_by_level(
        val["label"], val["prob_her2_pos"], val["slide_id"], val["patient_id"]
    )
    for level in metrics.LEVELS:
        assert state["thresholds"][level] == pytest.approx(chosen[level], abs=1e-12)
    reports = smoke_run.run_dir / "reports"
    patients = pd.read_csv(reports / "predictions_patients_test.csv")
    slides = pd.read_csv(reports / "predictions_slides_test.csv")
    t = state["thresholds"]["patient"]["youden"]
    assert (patients["called_her2_pos_youden"] == (patients["prob_her2_pos"] >= t)).all()
    assert {"slide_id", "patient_id", "n_tiles", "called_her2_pos_sens90"} <= set(slides)
    best = json.loads((reports / "best.json").read_text())
    assert best["decision_level"] == "tile" and best["thresholds"] == state["thresholds"]
    assert best["splits"]["test"]["slide"]["thresholds"] == pytest.approx(
        state["thresholds"]["slide"]
    )
    summary = (reports / "summary.md").read_text()
    assert "decides at the **tile level**" in summary and "slide level (mean" in summary
    assert {"roc_slide.png", "roc_patient.png"} <= {p.name for p in reports.iterdir()}


def eval_cfg(overrides: list[str], out: Path):
    cfg = compose("eval", ["tracking.backend=off", *overrides])
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


def old_checkpoint(smoke_run: SmokeRun, path: Path) -> Path:
    """The smoke run's best.pt as a run trained before levels: flat thresholds, no level keys."""
    state = checkpoint.load(smoke_run.run_dir / "checkpoints" / "best.pt")
    state["thresholds"] = state["thresholds"]["tile"]
    state.pop("decision_level")
    cfg = OmegaConf.create(state["config"])
    for key in ("slide_aggregation", "topk", "decision_level"):
        cfg.evaluation.pop(key)
    state["config"] = OmegaConf.to_yaml(cfg)
    return checkpoint.save(state, path)


def test_an_old_flat_checkpoint_still_evaluates(smoke_run: SmokeRun, tmp_path: Path) -> None:
    ckpt = old_checkpoint(smoke_run, tmp_path / "old.pt")
    small = [f"checkpoint={ckpt}", "data.n_patients=8", "data.patches_per_patient=4"]
    out = evaluation.evaluate_cohort(eval_cfg(small, tmp_path / "a"))
    ev = out["evaluation"]
    tile = checkpoint.load(ckpt)["thresholds"]
    assert ev.thresholds == pytest.approx(tile) and ev.patient.reports == {}
    assert np.isfinite(ev.patient.auc.auc) and ev.slide.n == 8
    summary = (tmp_path / "a" / "reports" / "summary.md").read_text()
    assert "No thresholds were frozen at the patient level" in summary
    with pytest.raises(ConfigError) as info:
        evaluation.prepare_evaluation(
            eval_cfg([*small, "evaluation.decision_level=patient"], tmp_path / "b")
        )
    assert "evaluation.decision_level=patient:" in str(info.value)
    assert "tile level only" in str(info.value) and "\n" not in str(info.value)


def test_eval_at_the_patient_level_and_a_changed_aggregation_refused(
    smoke_run: SmokeRun, tmp_path: Path
) -> None:
    ckpt = smoke_run.run_dir / "checkpoints" / "best.pt"
    small = [f"checkpoint={ckpt}", "data.n_patients=8", "data.patches_per_patient=4"]
    run, settings, _ = evaluation.prepare_evaluation(
        eval_cfg([*small, "evaluation.decision_level=patient"], tmp_path)
    )
    assert settings.decision_level == "patient"
    assert (
        run.thresholds
        == checkpoint.load(smoke_run.run_dir / "checkpoints" / "best.pt")["thresholds"]["patient"]
        == pytest.approx(run.levels["patient"])
    )
    with pytest.raises(ConfigError, match="froze its slide-level thresholds on mean aggregates"):
        evaluation.prepare_evaluation(
            eval_cfg([*small, "evaluation.slide_aggregation=max"], tmp_path)
        )


def test_predict_at_the_patient_level_writes_a_patient_table(
    smoke_run: SmokeRun, tmp_path: Path
) -> None:
    from her2exp.apps.predict import predict_folder

    data = synthetic.generate(n_patients=4, patches_per_patient=3, image_size=32, seed=5)
    folder = tmp_path / "tiles"
    folder.mkdir()
    names = []
    for i, img in enumerate(data.images):
        Image.fromarray(img).save(folder / f"t{i}.png")
        names.append((f"t{i}.png", f"P{i // 3}-S0", f"P{i // 3}"))
    groups = tmp_path / "groups.csv"
    pd.DataFrame(names, columns=["path", "slide_id", "patient_id"]).to_csv(groups, index=False)
    ckpt = smoke_run.run_dir / "checkpoints" / "best.pt"
    base = [f"checkpoint={ckpt}", f"input={folder}", f"out={tmp_path / 'p.csv'}"]
    with pytest.raises(ConfigError, match="decision level patient: give groups="):
        predict_folder(compose("predict", [*base, "decision_level=patient"]))
    got = predict_folder(compose("predict", [*base, "decision_level=patient", f"groups={groups}"]))
    assert got.level == "patient" and len(got.groups) == 4
    t = checkpoint.load(ckpt)["thresholds"]["patient"]
    mean = got.tiles.groupby("patient_id")["prob_her2_pos"].mean()
    np.testing.assert_allclose(got.groups.set_index("patient_id")["prob_her2_pos"], mean)
    for name, value in t.items():
        want = (got.tiles["patient_id"].map(mean) >= value).astype(int)
        assert (got.tiles[f"called_her2_pos_{name}"] == want).all()
        assert (got.groups[f"called_her2_pos_{name}"] == (mean.to_numpy() >= value)).all()
